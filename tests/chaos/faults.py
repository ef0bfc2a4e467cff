"""The chaos tier's faults. A fault is `fn(round)`: it draws its points from `round.rng`
(up front, so a seed replays the same choices), brings the fleet up, injects the fault,
and leaves a master serving and workers alive for `Round.check()`. What it observes
that breaks an invariant on the spot (a stop that is not clean, a master that stops
answering) it records with `round.violate`.

The seed picks the fault (`fault_of`); FAULTS maps each name to (description, fn).
"""

from __future__ import annotations

import random
import re
import signal
import time
from functools import partial

import pytest

from harness import HERE, MAX_TASKS, MIN_TASKS, WORKERS, Round, fill_disk, submit_seconds

SERVED_WITHIN = 10.0  # a status call while hostile peers are connected
JOB_WITHIN = 30.0  # a job submitted while hostile peers are connected: id back and every result in


def later_job(r: Round) -> None:
    """After every fault: a new job must be accepted (and, in check(), complete)."""
    r.submit(r.rng.randint(1_000, 5_000))


def master_during_submit(how: str, r: Round) -> None:
    """Stop the master (kill -9 or SIGTERM) while a big submit is in flight; restart it
    on the same port and state dir after a pause."""
    n = r.rng.randint(MIN_TASKS, MAX_TASKS)
    point, pause = r.rng.uniform(0.1, submit_seconds(n)), r.rng.uniform(0.1, 3.0)
    r.fleet_up()
    sub = r.submit(n, wait=False)
    time.sleep(point)
    r.note(f"fault point: {point:.2f} s into submit {sub.k}" + (" (it had exited already)" if sub.finished else ""))
    r.restart_master(how, pause)
    r.finish_submission(sub)
    later_job(r)


def master_during_lease(how: str, r: Round) -> None:
    """Stop the master just after a big job is stored, while workers lease its first tasks."""
    n = r.rng.randint(MIN_TASKS, MAX_TASKS)
    point, pause = r.rng.uniform(0.0, 0.3), r.rng.uniform(0.1, 3.0)
    r.fleet_up()
    r.submit(n)
    time.sleep(point)
    r.note(f"fault point: {point:.2f} s after the job was stored")
    r.restart_master(how, pause)
    later_job(r)


def master_during_flush(how: str, r: Round) -> None:
    """Stop the master once a running job has some of its results stored."""
    n = r.rng.randint(MIN_TASKS, MAX_TASKS)
    fraction, pause = r.rng.uniform(0.05, 0.9), r.rng.uniform(0.1, 3.0)
    r.fleet_up()
    r.submit(n)
    status = r.progress(int(fraction * n))
    r.note(f"fault point: {status['tasks'] if status else 'no progress'} (target {fraction:.0%} done)")
    r.restart_master(how, pause)
    later_job(r)


def workers_during_job(how: str, r: Round) -> None:
    """Stop one or two workers (kill -9 of the group, or SIGTERM) while a job runs; each
    gets a replacement after a pause."""
    n = r.rng.randint(MIN_TASKS, MAX_TASKS)
    count = r.rng.randint(1, 2)
    points = sorted(r.rng.uniform(0.0, 1.2) for _ in range(count))
    picks = [r.rng.randrange(WORKERS) for _ in range(count)]
    pauses = [r.rng.uniform(0.0, 2.0) for _ in range(count)]
    r.fleet_up()
    r.submit(n)
    start = time.monotonic()
    for point, pick, pause in zip(points, picks, pauses):
        time.sleep(max(0.0, start + point - time.monotonic()))
        live = r.live_workers()
        r.stop_worker(live[pick % len(live)], how)
        time.sleep(pause)
        r.start_worker()
    later_job(r)


def master_fresh_state(r: Round) -> None:
    """The master comes back on a new, empty state dir (kill -9 or SIGTERM first), while a
    job runs or while it is submitted. Jobs of the lost ledger must fail plainly when asked
    for (checked in Round.check); one to three jobs submitted afterwards must complete."""
    how = r.rng.choice(["kill", "term"])
    in_submit = r.rng.random() < 0.5
    n1, n2 = r.rng.randint(MIN_TASKS, 40_000), r.rng.randint(MIN_TASKS, MAX_TASKS)
    point = r.rng.uniform(0.1, submit_seconds(n2)) if in_submit else r.rng.uniform(0.0, 0.8)
    pause = r.rng.uniform(0.1, 2.0)
    later = [r.rng.randint(MIN_TASKS, 40_000) for _ in range(r.rng.randint(1, 3))]
    r.fleet_up()
    r.submit(n1)
    second = r.submit(n2, wait=not in_submit)
    if not in_submit and second.job_id is not None:
        r.follow(second)
    time.sleep(point)
    r.note(f"fault point: {point:.2f} s into {'the submit' if in_submit else 'the job'} of submit {second.k}")
    r.restart_master(how, pause, fresh=True)
    for n in later:
        r.submit(n)


DISK_FULL_LOG = re.compile(r"no space|disk is full|disk full|ENOSPC", re.IGNORECASE)


def disk_full(r: Round) -> None:
    """The master's state dir is on a small tmpfs, filled up while a job runs and another
    is submitted; the master must keep serving, say so plainly in its log, and lose
    nothing once the filler is deleted."""
    size = r.rng.choice([48, 64, 96])
    n1, n2 = r.rng.randint(MIN_TASKS, 60_000), r.rng.randint(MIN_TASKS, 40_000)
    point, hold = r.rng.uniform(0.05, 0.8), r.rng.uniform(1.0, 4.0)
    mount = r.mount_tmpfs(size)
    if mount is None:
        pytest.skip(f"disk-full fault needs a tmpfs mount (root, mount permitted): {r.timeline[-1]}")
    r.state_dir = mount / "state-0"
    r.fleet_up()
    r.submit(n1, wait=False)
    time.sleep(point)
    filler = mount / "filler"
    r.note(f"disk full: {fill_disk(filler)} bytes of filler")
    r.submit(n2, wait=False)
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        if r.try_status(SERVED_WITHIN) is None:
            r.violate(f"the master did not answer status within {SERVED_WITHIN:g} s while its disk was full")
            break
        time.sleep(0.3)
    filler.unlink()
    r.note("filler deleted: space is back")
    for sub in r.submissions:
        r.finish_submission(sub)
    later_job(r)
    text = r.master.text()
    if not DISK_FULL_LOG.search(text):
        said = [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line][:1]
        r.violate("the master's log does not report the full disk (no 'disk is full' / 'No space' line); "
                  f"it said: {said[0][:300] if said else 'nothing at WARNING or ERROR'}")
    if "Traceback" in text:
        r.violate("the master's log has a traceback, not a plain report of the full disk")


def hostile_peers(r: Round) -> None:
    """Many connections to the master's port that send nothing, trickle a byte a second, or
    send garbage, and a client with the key that stops reading its replies; the master may
    have fewer file descriptors than there are peers. While they are connected, status, a
    worker replacement, and a whole job must be served in bounded time."""
    silent, trickle, garbage = r.rng.randint(50, 600), r.rng.randint(50, 600), r.rng.randint(10, 100)
    settle, pick, n = r.rng.uniform(0.5, 2.0), r.rng.randrange(WORKERS), r.rng.randint(MIN_TASKS, MAX_TASKS)
    r.nofile = r.rng.choice([None, 512, 1024])
    r.fleet_up()
    peers = r.spawn("hostile", [str(HERE / "hostile.py"), str(r.port), str(silent), str(trickle), str(garbage),
                                str(r.seed)])
    r.others.append(peers)
    r.wait_for(lambda: "peers connected" in peers.text(), 30, "the hostile peers to connect")
    r.note(peers.text().splitlines()[0])
    time.sleep(settle)
    status = r.command("status", ["status"], SERVED_WITHIN)
    if status.rc != 0:
        r.violate(f"`status` was not served within {SERVED_WITHIN:g} s with hostile peers connected "
                  f"(exit {status.rc}): {status.stderr[-300:]}")
    r.stop_worker(r.live_workers()[pick], "kill")
    fresh = r.start_worker(wait=False)
    r.expect(lambda: fresh.pid in r.joined_pids(), JOB_WITHIN,
             f"replacement worker pid {fresh.pid} to join while hostile peers are connected")
    sub = r.submit(n)
    if sub.job_id is not None:
        r.stall(sub.job_id)
        r.expect(lambda: (info := r.job_info(sub.job_id)) and info.get("finished"), JOB_WITHIN,
                 f"job {sub.job_id} to finish while hostile peers are connected")
    if sub.rc != 0:
        r.violate(f"submit {sub.k} was not served with hostile peers connected: exit {sub.rc}, "
                  f"{(sub.stderr.strip() or '-').splitlines()[-1][:200]}")
    elif sub.finished is not None and sub.finished - sub.started > JOB_WITHIN:
        r.violate(f"submit {sub.k} took {sub.finished - sub.started:.1f} s with hostile peers connected")
    r.note(f"hostile peers: {peers.text().splitlines()[-1]}")
    later_job(r)  # still under pressure
    peers.signal(signal.SIGKILL)
    peers.wait(10)


def mixed(r: Round) -> None:
    """Two or three of: master kill -9, master SIGTERM, worker kill -9, worker SIGTERM, at
    random points while a big job is submitted and runs."""
    n = r.rng.randint(MIN_TASKS, MAX_TASKS)
    events = r.rng.sample(["master kill", "master term", "worker kill", "worker term"], r.rng.randint(2, 3))
    points = sorted(r.rng.uniform(0.0, 1.5) for _ in events)
    pauses = [r.rng.uniform(0.1, 1.5) for _ in events]
    picks = [r.rng.randrange(WORKERS) for _ in events]
    r.fleet_up()
    sub = r.submit(n, wait=False)
    start = time.monotonic()
    for event, point, pause, pick in zip(events, points, pauses, picks):
        time.sleep(max(0.0, start + point - time.monotonic()))
        who, how = event.split()
        r.note(f"fault point: {event} at {point:.2f} s")
        if who == "master":
            r.restart_master(how, pause)
        else:
            live = r.live_workers()
            r.stop_worker(live[pick % len(live)], how)
            time.sleep(pause)
            r.start_worker()
    r.finish_submission(sub)
    later_job(r)


FAULTS = {
    "master-kill9-submit": ("master kill -9 during a submit", partial(master_during_submit, "kill")),
    "master-term-submit": ("master SIGTERM during a submit", partial(master_during_submit, "term")),
    "master-kill9-lease": ("master kill -9 while workers lease", partial(master_during_lease, "kill")),
    "master-term-lease": ("master SIGTERM while workers lease", partial(master_during_lease, "term")),
    "master-kill9-flush": ("master kill -9 while results are stored", partial(master_during_flush, "kill")),
    "master-term-flush": ("master SIGTERM while results are stored", partial(master_during_flush, "term")),
    "worker-kill9": ("worker kill -9 (its group) mid-job, then a replacement", partial(workers_during_job, "kill")),
    "worker-term": ("worker SIGTERM (drain) mid-job, then a replacement", partial(workers_during_job, "term")),
    "master-fresh-state": ("master back on a fresh, empty state dir", master_fresh_state),
    "disk-full": ("the master's disk fills up mid-job, then frees", disk_full),
    "hostile-peers": ("silent, trickling and garbage peers on the master's port", hostile_peers),
    "mixed": ("master and worker kills and SIGTERMs at random points", mixed),
}


def fault_of(seed: int) -> str:
    """The fault a seed picks."""
    return random.Random(seed).choice(sorted(FAULTS))
