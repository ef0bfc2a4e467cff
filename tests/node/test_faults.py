"""Faults the engine must ride through: restarts mid-call, a fresh ledger, a changed
key, a thread that dies, timeouts in a chunk. Real processes on 127.0.0.1."""

import collections
import json
import signal
import subprocess
import threading

import pytest

from node import PROTOCOL, server, wire
from node.errors import Incompatible

from conftest import PYTHON, ROOT, TEST_TASKS, base_env, check_exactly_once, wait_for, write_key


def _start_submit(agents, tmp_path, count: int) -> subprocess.Popen:
    args = tmp_path / "args.jsonl"
    args.write_text("".join(f"[{n}]\n" for n in range(count)))
    return subprocess.Popen([PYTHON, "-m", "node", "submit", "square", "--args-file", str(args), "--master",
                             agents.master_address, "--authkey-file", str(agents.key)], cwd=str(ROOT), env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_master_restart_during_a_submit_loses_no_task(agents, tmp_path, sig):
    """The submit either completes with every task, or fails plainly with nothing
    half-stored: never exit 0 with tasks missing."""
    count = 100_000  # 20 chunks
    master = agents.start_master()
    submit = _start_submit(agents, tmp_path, count)
    wait_for(lambda: agents.try_status() and agents.try_status()["tasks"]["queued"] > 0, 60,
             "the first chunks to be stored")
    master.kill_group(sig)
    master.wait(30)
    agents.start_master()
    try:
        out, err = submit.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        submit.kill()
        raise AssertionError("submit hung across the master restart") from None
    assert "Traceback" not in err, err
    agents.start_worker(concurrency=2)
    with agents.client() as client:
        if submit.returncode == 0:
            job = client.job(int(out.strip()))
            assert job.info["total"] == count and job.info["sealed"]
            results = job.wait()
            check_exactly_once(results, count)
            assert all(r.value == r.index * r.index for r in results)
        else:
            assert submit.returncode in (2, 3) and err.count("\n") == 1, err
            wait_for(lambda: client.status()["tasks"]["open_jobs"] == 0, 30, "the partial job to be withdrawn")


def test_a_submit_spans_several_master_restarts(agents, tmp_path):
    """Each chunk is idempotent: a submit in flight through two restarts completes."""
    master = agents.start_master()
    submit = _start_submit(agents, tmp_path, 100_000)
    wait_for(lambda: agents.try_status() and agents.try_status()["tasks"]["queued"] > 0, 60,
             "the first chunks to be stored")
    for _ in range(2):
        master.kill_group(signal.SIGKILL)
        master.wait(10)
        master = agents.start_master()
    out, err = submit.communicate(timeout=120)
    assert submit.returncode == 0, err
    with agents.client() as client:
        assert client.job(int(out)).info["total"] == 100_000


def test_a_fresh_ledger_does_not_wedge_a_worker_holding_prefetched_tasks(agents, tmp_path):
    """The worker held many prefetched tasks of the old ledger; the new ledger issues
    the same ids again: every new task must still get its result."""
    master = agents.start_master()
    worker = agents.start_worker(concurrency=1)
    agents.wait_workers(1)
    with agents.client() as client:
        client.submit("sleep", [[0.001]] * 200).wait()  # the worker learns tasks are quick: big prefetch
        client.submit("sleep", [[0.2]] * 60)
        wait_for(lambda: client.status()["tasks"]["leased"] >= 10, 30, "tasks prefetched")
    master.kill_group(signal.SIGKILL)
    master.wait(10)
    agents.start_master(state_dir=tmp_path / "fresh")
    agents.wait_workers(1)
    with agents.client() as client:  # ids 1..260 again: the old job's 201..260 were prefetched
        results = client.submit("square", [[n] for n in range(260)]).wait()
    check_exactly_once(results, 260)
    assert all(r.ok and r.value == r.index ** 2 for r in results)
    assert worker.alive()


def test_a_job_of_a_lost_ledger_answers_plainly(agents, tmp_path):
    master = agents.start_master()
    with agents.client(retry_for=30) as client:
        job = client.submit("square", [[1]])
        master.kill_group(signal.SIGKILL)
        master.wait(10)
        agents.start_master(state_dir=tmp_path / "fresh")
        client.submit("square", [[2]])
        with pytest.raises(LookupError, match="no job"):  # a new ledger's ids start elsewhere
            list(job.results(wait=False))
        job.id = client.submit("square", [[3]]).id  # even if an id did name a job there:
        with pytest.raises(LookupError, match="new ledger"):
            list(job.results(wait=False))


def test_one_client_shared_by_threads_survives_a_master_restart(agents):
    master = agents.start_master()
    agents.start_worker(concurrency=2)
    errors, done = [], collections.Counter()
    stop = threading.Event()
    with agents.client(retry_for=30) as client:
        def use():
            try:
                while not stop.is_set():
                    assert [r.value for r in client.submit("square", [[3], [4]]).wait()] == [9, 16]
                    done[threading.current_thread().name] += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=use, name=f"t{n}") for n in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(done) == 4, 30, "every thread to finish a job")
        master.kill_group(signal.SIGKILL)
        master.wait(10)
        agents.start_master()
        before = dict(done)
        wait_for(lambda: all(done[t] > before[t] for t in before) or errors, 60, "every thread to go on")
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not errors, errors


def test_a_worker_keeps_retrying_when_the_key_changes_and_rejoins_with_the_new_one(agents, tmp_path):
    master = agents.start_master()
    worker_key = write_key(tmp_path / "worker-key", agents.key.read_bytes())
    worker = agents.start_worker(key=worker_key)
    agents.wait_workers(1)
    write_key(agents.key, b"the-rotated-key")  # the master restarts with a new key
    master.popen.send_signal(signal.SIGTERM)
    master.wait(30)
    agents.start_master()
    wait_for(lambda: "authentication failed" in worker.text(), 30, "the worker to say its key is refused")
    assert worker.alive(), "a worker whose key was refused on reconnect must keep trying"
    wait_for(lambda: agents.status()["rejected"], 10, "the master to show the refused peer")
    write_key(worker_key, b"the-rotated-key")  # the deploy brings the new key
    agents.wait_workers(1, timeout=60)
    with agents.client() as client:
        assert [r.value for r in client.submit("square", [[5]]).wait()] == [25]


class _BrokenHello:
    def hello(self, *args):
        return {"unexpected": "reply"}  # a master bug: the worker cannot use this


def test_a_fatal_error_in_the_link_thread_ends_the_worker_non_zero(agents):
    """A dead link thread must not leave a live, useless process: exit 1 (systemd restarts)."""
    key = agents.key.read_bytes()
    fake = server.Server(("127.0.0.1", 0), key, [server.Service("master", _BrokenHello(), frozenset({"hello"}))])
    fake.start()
    try:
        agents.port = fake.address[1]
        worker = agents.start_worker()
        assert worker.wait(30) == 1
        assert "link to the master failed" in worker.text()
    finally:
        fake.stop(grace=1)


def test_a_timeout_keeps_the_outcomes_finished_before_it_in_its_chunk(agents, tmp_path):
    """Tasks finished (not yet reported) before a task that times out are not run again."""
    agents.start_master("--tasks-module", str(TEST_TASKS))
    worker = agents.start_worker("--tasks-module", str(TEST_TASKS), concurrency=1)
    agents.wait_workers(1)
    tally = tmp_path / "tally"
    with agents.client() as client:
        client.submit("square", [[n] for n in range(300)]).wait()  # learn: tasks are quick, chunks grow
        # One job, leased and sent to the one process as one chunk: 30 quick tasks, then one that hangs.
        results = client.submit("tally", [[str(tally), n, 30 if n == 30 else 0] for n in range(31)], timeout=1,
                                retries=0).wait()
    assert all(r.ok for r in results[:30])
    assert not results[30].ok and "timed out" in results[30].error
    runs = collections.Counter(tally.read_text().split())
    assert sorted(runs) == sorted(str(n) for n in range(31)) and set(runs.values()) == {1}, runs
    assert worker.alive()


def test_a_peer_speaking_another_protocol_is_refused_plainly(agents):
    agents.start_master()
    caller = wire.Caller(("127.0.0.1", agents.port), agents.key.read_bytes())
    try:
        served = f"serves worker protocol {PROTOCOL - 1} to {PROTOCOL}"
        with pytest.raises(Incompatible, match=f"{served}, the worker speaks 1: upgrade the worker"):
            caller.call("hello", "w", "h", 1, 1, [], None, 1)
        assert caller.call("status")["workers"] == []
    finally:
        caller.close()


def test_fast_durability_is_a_choice_and_status_says_which(agents):
    agents.start_master("--durability", "fast")
    assert agents.status()["master"]["durability"] == "fast"
    out = agents.cli("status", "--json")
    assert json.loads(out.stdout)["master"]["durability"] == "fast"
