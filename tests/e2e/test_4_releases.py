"""Day-2 operations on releases, each under a running job: a rolling upgrade (each batch of
workers joined again on the new release before the next one stopped), a rollback to the
release kept on the hosts, and a new worker host brought in with `deploy --limit`.

Every test sets up the state it needs (a deploy of this tree first) and puts the fleet back
on this tree's release afterwards. A second release is a build of a copy of node/ with one
comment added: another digest, so another version.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from node.client import Client
from ops import artifact, inventory, localcluster
from ops.deploy import parse_recap
from ops.paths import LOCAL_INVENTORY, ROOT
from tests import waiting
from tests.e2e.conftest import INVOKE, host, play_runs, run_invoke

wait_for = partial(waiting.wait_for, interval=0.5)
TASK_SECONDS = 0.05  # `sleep` tasks: no CPU, so the rate measures slots, not this shared machine
# "joined" and "left" lines in the master's journal (node/master.py)
JOINED = re.compile(r"worker (?P<id>\S+) joined from (?P<host>\S+) \(taskfleet (?P<version>\S+), protocol")
LEFT = re.compile(r"worker (?P<id>\S+) left$")
LISTENING = re.compile(r"taskfleet master (?P<version>\S+) listening on")


def assert_exactly_one_result_each(results, total):
    assert sorted(r.index for r in results) == list(range(total)), "every task has exactly one result"
    failed = [r for r in results if not r.ok]
    assert not failed, failed[:3]


CANNOT_RUN_A_WORKER = 'raise SystemExit("e2e: this release cannot run a worker")\n'  # variant_build's worker_line


def plain_playbook(playbook: str, **extra_vars) -> subprocess.CompletedProcess:
    """Run playbooks/PLAYBOOK with ansible-playbook itself (not ./invoke) on the local
    inventory, each extra var as `-e KEY=VALUE`; echo the tail of its output."""
    cmd = [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(LOCAL_INVENTORY), f"playbooks/{playbook}",
           *(arg for key, value in extra_vars.items() for arg in ("-e", f"{key}={value}"))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-3000:])
    return proc


def variant_build(tmp_path, worker_line: str = "") -> str:
    """Build a second release (this tree plus a comment, and `worker_line` at the end of
    node/worker/__init__.py) into dist/; return its version."""
    node_dir = tmp_path / "node"
    shutil.copytree(artifact.NODE_DIR, node_dir, ignore=shutil.ignore_patterns("__pycache__"))
    with open(node_dir / "version.py", "a") as f:
        f.write(f"# e2e variant {time.time_ns()}\n")
    with open(node_dir / "worker" / "__init__.py", "a") as f:
        f.write(worker_line)
    built = artifact.build(node_dir=node_dir)
    version = (artifact.DIST / artifact.LATEST).read_text().strip()
    assert built.name == f"taskfleet-node-{version}.pyz" and version != artifact.version()
    return version


class Running:
    """A job of `sleep` tasks collected on a thread: when each result arrived, and from where."""

    def __init__(self, client: Client, tasks: int):
        self.total = tasks
        self.job = client.submit("sleep", [(TASK_SECONDS,)] * tasks)
        self.seen: list = []  # (monotonic, Result)
        self.thread = threading.Thread(target=lambda: self.seen.extend((time.monotonic(), r)
                                                                      for r in self.job.results()), daemon=True)
        self.thread.start()

    def rate(self, start: float, end: float) -> float:
        return sum(1 for t, _ in list(self.seen) if start <= t < end) / max(end - start, 1e-9)

    def slowest(self, start: float, end: float, window: float = 5.0) -> float:
        """The lowest rate over any `window` seconds (in steps of one) between start and end."""
        steps = range(max(1, int(end - start - window) + 1))
        return min(self.rate(start + i, start + i + window) for i in steps)

    def finish(self, timeout: float = 300) -> list:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the job did not finish within {timeout} s"
        results = [r for _, r in self.seen]
        assert_exactly_one_result_each(results, self.total)  # 0 lost, 0 failed
        retried = [r.index for r in results if r.attempts != 1]
        assert not retried, f"tasks run more than once: {retried[:10]}"
        return results


def fleet_versions(client: Client) -> tuple[str, dict]:
    status = client.status()
    return status["master"]["version"], {w["host"]: w["version"] for w in status["workers"] if w["alive"]}


def master_journal(since: float) -> list[str]:
    out = host("tf-master").check_output(f"journalctl -u taskfleet-master --since @{int(since) - 1} -o cat")
    return out.splitlines()


def current_release(names) -> dict:
    return {name: host(name).file("/opt/taskfleet/current").linked_to.rsplit("/", 1)[1] for name in names}


def timed(*args: str) -> float:
    started = time.monotonic()
    run_invoke(*args)
    return time.monotonic() - started


@pytest.fixture
def on_this_tree(first_deploy, fleet):
    """The fleet on this tree's release when the test starts, and again when it ends."""
    run_invoke("deploy")
    yield artifact.version()
    run_invoke("deploy")


def workers_of(fleet) -> list[str]:
    return sorted(h.name for h in fleet.hosts if "workers" in h.groups)


def test_a_rolling_upgrade_goes_batch_by_batch_and_loses_nothing(on_this_tree, tmp_path, fleet, client):
    old, workers = on_this_tree, workers_of(fleet)
    new = variant_build(tmp_path)
    slots = sum(w["concurrency"] for w in client.status()["workers"] if w["alive"])
    running = Running(client, tasks=int(75 * slots / TASK_SECONDS))  # ~75 s of work at full rate
    wait_for(lambda: len(running.seen) > 0, 60, "the job's first results")
    time.sleep(8)
    started, wall = time.monotonic(), time.time()
    normal = running.rate(started - 8, started)
    took = timed("upgrade", "--no-build", "--batch", "1")
    ended = time.monotonic()
    during, slowest = running.rate(started, ended), running.slowest(started, ended)
    assert len(running.seen) < running.total, "the job ended before the upgrade did: make it longer"
    print(f"\nupgrade of {len(workers)} workers, batch 1: {took:.1f} s; throughput during it "
          f"{during:.1f}/s against {normal:.1f}/s before: {during / normal:.2f} of normal "
          f"(slowest 5 s: {slowest / normal:.2f})")
    assert fleet_versions(client) == (new, {w: new for w in workers})
    assert current_release(["tf-master", *workers]) == {h: new for h in ["tf-master", *workers]}

    # The master's journal: it restarted on the new release first; then, for each worker in
    # inventory order, its old process left only after the one before had joined on `new`.
    events = []
    for line in master_journal(wall):
        for kind, pattern in (("joined", JOINED), ("left", LEFT), ("listening", LISTENING)):
            m = pattern.search(line)
            if m:
                events.append((kind, m.groupdict()))
    names = [(kind, e.get("version") or e.get("id")) for kind, e in events]
    assert ("listening", new) in names, names
    master_back = names.index(("listening", new))
    left = {e["id"].rsplit("-", 2)[0]: i for i, (kind, e) in enumerate(events) if kind == "left"}
    joined_new = {e["host"]: i for i, (kind, e) in enumerate(events) if kind == "joined" and e["version"] == new}
    assert set(left) == set(joined_new) == set(workers), events
    for before, after in zip(workers, workers[1:]):
        assert joined_new[before] < left[after], f"{after} stopped before {before} was back on {new}: {names}"
    assert master_back < min(left.values()), "a worker restarted before the master was on the new release"
    running.finish()
    assert old != new


def test_a_failed_batch_stops_the_rollout_and_the_rest_keep_their_release(on_this_tree, tmp_path, fleet, client):
    """Plain ansible-playbook, a release whose worker cannot start: the master takes it, the
    first batch fails, and the workers after it are never touched; the job goes on."""
    old, workers = on_this_tree, workers_of(fleet)
    bad = variant_build(tmp_path, worker_line=CANNOT_RUN_A_WORKER)
    running = Running(client, tasks=600)
    wait_for(lambda: len(running.seen) > 0, 60, "the job's first results")
    proc = plain_playbook("upgrade.yml", taskfleet_worker_batch=1, taskfleet_rejoin_timeout=20)
    recap = parse_recap(proc.stdout)
    assert proc.returncode != 0 and recap[workers[0]]["failed"] == 1, proc.stdout[-3000:]
    assert all(recap[h]["failed"] == 0 for h in ["tf-master", *workers[1:]]), recap
    assert current_release(["tf-master", *workers]) == {"tf-master": bad, workers[0]: bad,
                                                        **{w: old for w in workers[1:]}}
    master_version, alive = fleet_versions(client)
    assert master_version == bad and alive == {w: old for w in workers[1:]}
    running.finish()


def test_a_failed_new_worker_stops_the_deploy_before_the_installed_workers_roll(on_this_tree, tmp_path, fleet,
                                                                                client):
    """A worker with no unit yet is installed with the new ones, all at once, before the
    installed workers roll: a release it cannot start on fails there, and the installed
    workers are never touched."""
    old, workers = on_this_tree, workers_of(fleet)
    new_one, installed = workers[0], workers[1:]
    host(new_one).run_test("systemctl disable --now taskfleet-worker.service"
                           " && rm /etc/systemd/system/taskfleet-worker.service && systemctl daemon-reload")
    bad = variant_build(tmp_path, worker_line=CANNOT_RUN_A_WORKER)
    proc = plain_playbook("upgrade.yml", taskfleet_rejoin_timeout=20)
    recap = parse_recap(proc.stdout)
    assert proc.returncode != 0 and recap[new_one]["failed"] == 1, proc.stdout[-3000:]
    assert play_runs(proc.stdout, "Install the new workers, all at once") == [{new_one}]
    assert play_runs(proc.stdout, "Deploy the installed workers, in batches") == [], "the rollout went on"
    assert current_release([new_one, *installed]) == {new_one: bad, **{w: old for w in installed}}
    assert fleet_versions(client) == (bad, {w: old for w in installed})


def test_in_a_batch_each_worker_is_judged_by_its_own_join(on_this_tree, fleet):
    """One batch of every worker, one of which starts but never joins: the master's status is
    read for the whole batch, and only that worker fails, named; the others pass."""
    workers = workers_of(fleet)
    broken = workers[0]
    dropin = "/etc/systemd/system/taskfleet-worker.service.d/e2e-never-joins.conf"
    host(broken).run_test(f"mkdir -p {os.path.dirname(dropin)} && printf '[Service]\\nType=simple\\nWatchdogSec=0"
                          f"\\nExecStart=\\nExecStart=/bin/sleep infinity\\n' > {dropin}"
                          " && systemctl daemon-reload && systemctl stop taskfleet-worker.service")
    try:
        proc = plain_playbook("site.yml", taskfleet_worker_batch="100%", taskfleet_rejoin_timeout=10,
                              taskfleet_skip_unchanged="false")
    finally:
        host(broken).run_test(f"rm -f {dropin} && systemctl daemon-reload"
                              " && systemctl restart taskfleet-worker.service")
    recap = parse_recap(proc.stdout)
    assert proc.returncode != 0 and recap[broken]["failed"] == 1, proc.stdout[-3000:]
    assert all(recap[h]["failed"] == 0 for h in ["tf-master", *workers[1:]]), recap
    assert play_runs(proc.stdout, "Deploy the installed workers, in batches") == [set(workers)]
    said = " ".join(proc.stdout.split())
    assert f"{broken}: the master did not show its worker on {on_this_tree} within 10 s" in said, said[-3000:]


def test_a_release_on_a_host_is_never_overwritten_with_other_bytes(on_this_tree, tmp_path, fleet):
    workers = workers_of(fleet)
    new = variant_build(tmp_path)
    h, path = host(workers[0]), f"/opt/taskfleet/releases/{new}/taskfleet-node.pyz"
    h.check_output(f"mkdir -p /opt/taskfleet/releases/{new} && echo not-the-build > {path}")
    try:
        proc = subprocess.run([str(INVOKE), "upgrade", "--no-build"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode != 0 and "a release is never overwritten" in proc.stdout, proc.stdout[-3000:]
        assert h.file(path).content_string == "not-the-build\n"
        assert current_release(workers) == {w: on_this_tree for w in workers}
    finally:
        h.run(f"rm -rf /opt/taskfleet/releases/{new}")


def test_a_rollback_goes_back_to_the_release_kept_on_the_hosts(on_this_tree, tmp_path, fleet, client):
    old, workers = on_this_tree, workers_of(fleet)
    new = variant_build(tmp_path)
    run_invoke("upgrade", "--no-build", "--batch", "50%")
    assert fleet_versions(client) == (new, {w: new for w in workers})

    refused = subprocess.run([str(INVOKE), "rollback", "--yes", "--to", "0.0.1+000000000000"], cwd=ROOT,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "0.0.1+000000000000 is not kept on tf-master" in refused.stdout, \
        refused.stdout[-2000:]
    assert fleet_versions(client) == (new, {w: new for w in workers})  # nothing changed

    running = Running(client, tasks=1200)
    wall = time.time()
    took = timed("rollback", "--yes")
    print(f"\nrollback of {len(workers)} workers, batch 25%: {took:.1f} s")
    assert fleet_versions(client) == (old, {w: old for w in workers})
    assert current_release(["tf-master", *workers]) == {h: old for h in ["tf-master", *workers]}
    names = [line for line in master_journal(wall) if JOINED.search(line) or LISTENING.search(line)]
    master_back = next(i for i, line in enumerate(names) if f"taskfleet master {old} listening" in line)
    rejoined = [i for i, line in enumerate(names) if f"(taskfleet {old}, protocol" in line]
    assert len(rejoined) >= len(workers) and min(rejoined) < master_back, \
        f"the workers go back before the master: {names}"
    running.finish()


def invoke_with(workers: int, *args: str) -> subprocess.CompletedProcess:
    """./invoke with TASKFLEET_WORKERS set (the local inventory follows it)."""
    env = {**os.environ, "TASKFLEET_WORKERS": str(workers)}
    proc = subprocess.run([str(INVOKE), *args], cwd=ROOT, capture_output=True, text=True, env=env)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    assert proc.returncode == 0, f"invoke {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}"
    return proc


def started_at(name: str, unit: str) -> str:
    return host(name).check_output(f"systemctl show {unit} -p ActiveEnterTimestampMonotonic -p MainPID")


def test_scale_out_brings_a_new_worker_in_and_changes_nothing_elsewhere(on_this_tree, fleet, client):
    version, workers = on_this_tree, workers_of(fleet)
    newcomer = f"tf-worker{len(workers) + 1}"
    units = {"tf-master": "taskfleet-master", **{w: "taskfleet-worker" for w in workers}}
    before = {name: started_at(name, unit) for name, unit in units.items()}
    try:
        grown = time.monotonic()
        invoke_with(len(workers) + 1, "cluster.up")
        up = time.monotonic() - grown
        running = Running(client, tasks=2000)
        wait_for(lambda: len(running.seen) > 0, 60, "the job's first results")
        started = time.monotonic()
        proc = invoke_with(len(workers) + 1, "deploy", "--limit", newcomer)
        print(f"\nscale-out: cluster.up {up:.1f} s, deploy --limit {newcomer} {time.monotonic() - started:.1f} s")
        assert set(parse_recap(proc.stdout)) == {newcomer}
        assert {name: started_at(name, unit) for name, unit in units.items()} == before, "another agent restarted"
        assert fleet_versions(client)[1] == {w: version for w in [*workers, newcomer]}
        results = running.finish()
        assert newcomer in {r.host for r in results}, "the new worker ran none of the job"
        again = parse_recap(invoke_with(len(workers) + 1, "deploy").stdout)
        assert {h: c["changed"] for h, c in again.items()} == {h: 0 for h in [*units, newcomer]}
    finally:
        # Let it drain and say goodbye (status then forgets it), then remove its container.
        grown = localcluster.nodes(dataclasses.replace(localcluster.settings(), workers=len(workers) + 1))
        subprocess.run(["lxc-attach", "-n", grown[-1].container, "--", "systemctl", "stop", "taskfleet-worker"],
                       capture_output=True, timeout=120)
        invoke_with(len(workers), "cluster.up")  # back to the cluster the other tests expect
    assert workers_of(inventory.load(LOCAL_INVENTORY)) == workers
