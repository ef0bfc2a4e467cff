"""Integration tests: a real master and real worker processes on 127.0.0.1."""

import os
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, TEST_TASKS, check_exactly_once, wait_for


def test_tasks_spread_across_workers(agents):
    agents.start_master()
    for _ in range(3):
        agents.start_worker(concurrency=1)
    agents.wait_workers(3)
    with agents.client() as client:
        job = client.submit("sleep", [[0.05]] * 60)
        results = job.wait()
    check_exactly_once(results, 60)
    assert all(r.ok and r.value == 0.05 and r.attempts == 1 for r in results)
    done = agents.done_by_worker()
    assert sum(done.values()) == 60
    assert sum(1 for n in done.values() if n > 0) >= 2, done
    status = agents.status()
    assert status["tasks"]["done"] == 60 and status["tasks"]["queued"] == 0 and status["tasks"]["leased"] == 0


def test_kill_9_of_a_worker_mid_job_loses_nothing(agents):
    agents.start_master(ttl=2)
    victim = agents.start_worker(concurrency=2)
    agents.wait_workers(1)
    with agents.client() as client:
        job = client.submit("sleep", [[0.1]] * 40, retries=3)
        wait_for(lambda: client.status()["tasks"]["done"] >= 4, 30, "the victim to finish a few tasks")
        assert client.status()["tasks"]["leased"] > 0
        victim.kill_group(signal.SIGKILL)  # the agent and its pool processes
        victim.wait(10)
        survivor = agents.start_worker(concurrency=2)
        results = job.wait()
    check_exactly_once(results, 40)
    assert all(r.ok and r.value == 0.1 for r in results)
    assert any(r.attempts > 1 for r in results), "the victim's leases should have expired with an attempt counted"
    workers = {w["pid"]: w for w in agents.status()["workers"]}
    assert workers[survivor.pid]["done"] > 0 and workers[survivor.pid]["alive"]
    assert victim.pid not in workers or not workers[victim.pid]["alive"]
    victim_id = victim.text().split(" as ")[1].split()[0]
    assert f"worker {victim_id} lost: silent for" in agents.procs[0].text()


def test_kill_9_of_the_master_mid_job_loses_nothing(agents):
    master = agents.start_master(ttl=2)
    workers = [agents.start_worker(concurrency=2) for _ in range(2)]
    agents.wait_workers(2)
    client = agents.client(retry_for=60)
    try:
        job = client.submit("sleep", [[0.05]] * 120)
        seen = []
        for result in job.results():
            seen.append(result)
            if len(seen) == 20:
                master.kill_group(signal.SIGKILL)
                master.wait(10)
                agents.start_master(ttl=2)  # same port, same state dir
        check_exactly_once(seen, 120)
        assert all(r.ok for r in seen)
        assert job.progress()["finished"] and job.info["done"] == 120
    finally:
        client.close()
    assert all(w.alive() for w in workers), "workers carry on after a master restart"
    agents.wait_workers(2)
    assert agents.status()["tasks"]["done"] == 120


def test_task_timeout_fails_the_task_and_the_worker_carries_on(agents):
    agents.start_master()
    worker = agents.start_worker(concurrency=1)
    agents.wait_workers(1)
    with agents.client() as client:
        (result,) = client.submit("sleep", [[5]], timeout=0.5, retries=0).wait()
        assert not result.ok and "timed out" in result.error and result.attempts == 1
        later = client.submit("square", [[n] for n in range(5)]).wait()
    assert [r.value for r in later] == [0, 1, 4, 9, 16]
    assert worker.alive()


def test_a_task_that_kills_its_process_fails_after_its_retries(agents):
    agents.start_master("--tasks-module", str(TEST_TASKS))
    worker = agents.start_worker("--tasks-module", str(TEST_TASKS), concurrency=1)
    agents.wait_workers(1)
    with agents.client() as client:
        (result,) = client.submit("crash", [[]], retries=1).wait()
        assert not result.ok and "worker process died" in result.error and result.attempts == 2
        later = client.submit("square", [[3], [4]]).wait()
    assert [r.value for r in later] == [9, 16]
    assert worker.alive()


def _master_and_worker_with_test_tasks(agents, tmp_path, drain_timeout: str, concurrency: int):
    """A master and one worker that know the tests' tasks (`nap` leaves a marker file in
    the returned folder when it starts). Returns (markers folder, worker)."""
    markers = tmp_path / "started"
    markers.mkdir()
    agents.start_master("--tasks-module", str(TEST_TASKS))
    worker = agents.start_worker("--drain-timeout", drain_timeout, "--tasks-module", str(TEST_TASKS),
                                concurrency=concurrency)
    agents.wait_workers(1)
    return markers, worker


def test_drain_on_sigterm_finishes_running_tasks_and_hands_back_the_rest(agents, tmp_path):
    markers, draining = _master_and_worker_with_test_tasks(agents, tmp_path, "20", concurrency=1)
    with agents.client() as client:
        # Short tasks first: the worker learns they are quick and prefetches many.
        assert all(r.ok for r in client.submit("sleep", [[0.01]] * 30).wait())
        job = client.submit("nap", [[0.6, str(markers)]] * 10)
        wait_for(lambda: any(markers.iterdir()), 30, "the first task to start")
        assert client.status()["tasks"]["leased"] == 10  # all prefetched by the one worker
        draining.popen.send_signal(signal.SIGTERM)
        assert draining.wait(30) == 0
        text = draining.text()
        assert "draining" in text and "handing" in text and "stopped" in text
        started_by_draining = len(list(markers.iterdir()))
        assert client.status()["tasks"]["done"] == 30 + started_by_draining  # what it started, it finished
        assert started_by_draining < 10
        other = agents.start_worker("--tasks-module", str(TEST_TASKS), concurrency=2)
        results = job.wait()
    check_exactly_once(results, 10)
    assert all(r.ok and r.attempts == 1 for r in results), "handed back, not lost: no attempt counted"
    workers = {w["pid"]: w for w in agents.status()["workers"]}
    assert draining.pid not in workers  # it said goodbye: no longer part of the agents
    assert workers[other.pid]["done"] == 10 - started_by_draining
    assert f"worker {draining.text().split(' as ')[1].split()[0]} left" in agents.procs[0].text()



def test_tasks_leased_as_the_drain_begins_go_back_unrun(agents):
    """SIGTERM while an idle worker's lease long-polls the master: the tasks that lease
    brings are handed straight back (the pool loop may have ended), never held until
    the drain timeout and then counted as a failed attempt."""
    agents.start_master()
    draining = agents.start_worker("--drain-timeout", "2s")
    agents.wait_workers(1)
    with agents.client() as client:
        draining.popen.send_signal(signal.SIGTERM)
        job = client.submit("square", [[i] for i in range(20)])
        assert draining.wait(30) == 0
        agents.start_worker()
        results = job.wait()
    assert sorted(r.index for r in results) == list(range(20))
    assert [r.attempts for r in results] == [1] * 20, "handed back unrun: no attempt counted"
    assert "never acknowledged" not in draining.text()

TUTORIAL_WORKER = '''
import queue, sys, time
from multiprocessing.managers import BaseManager

class QueueManager(BaseManager):
    pass

QueueManager.register('get_task_queue')
QueueManager.register('get_result_queue')

server_addr, port, key_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print('Connect to server %s...' % server_addr)
m = QueueManager(address=(server_addr, port), authkey=open(key_file, 'rb').read().strip())
m.connect()
task = m.get_task_queue()
result = m.get_result_queue()
idle = 0
while idle < 5:
    try:
        n = task.get(timeout=1)
        print('run task %d * %d...' % (n, n))
        r = n * n
        result.put(r)
        idle = 0
    except queue.Empty:
        print('task queue is empty.')
        idle += 1
print('worker exit.')
'''

TUTORIAL_PRODUCER = '''
import sys
from multiprocessing.managers import BaseManager

class QueueManager(BaseManager):
    pass

QueueManager.register('get_task_queue')
QueueManager.register('get_result_queue')
m = QueueManager(address=('127.0.0.1', int(sys.argv[1])), authkey=open(sys.argv[2], 'rb').read().strip())
m.connect()
task = m.get_task_queue()
result = m.get_result_queue()
for i in range(10):
    task.put(i)
print(sorted(result.get(timeout=30) for _ in range(10)))
'''


def test_tutorial_worker_and_producer_against_the_master(agents, tmp_path):
    agents.start_master()
    (tmp_path / "tutorial_worker.py").write_text(TUTORIAL_WORKER)
    (tmp_path / "tutorial_producer.py").write_text(TUTORIAL_PRODUCER)
    worker = agents._spawn("tutorial-worker", [str(tmp_path / "tutorial_worker.py"), "127.0.0.1", str(agents.port),
                                              str(agents.key)])
    produced = subprocess.run([PYTHON, str(tmp_path / "tutorial_producer.py"), str(agents.port), str(agents.key)],
                              capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert produced.returncode == 0, produced.stderr
    assert produced.stdout.strip() == str(sorted(n * n for n in range(10)))
    assert worker.wait(30) == 0
    assert "run task 9 * 9" in worker.text()


def test_oversized_arguments_are_refused_and_nothing_is_queued(agents):
    agents.start_master("--max-payload", "2000")
    with agents.client() as client:
        with pytest.raises(ValueError, match="over the limit of 1000"):
            client.submit("square", [[1], ["x" * 5000]], max_payload=1000)  # the client's own check
        with pytest.raises(ValueError, match=r"task 1: arguments are \d+ bytes, over the master's limit of 2000"):
            client.submit("square", [[1], ["x" * 5000]], max_payload=10**6)  # the master's check
        status = client.status()
    assert status["tasks"]["queued"] == 0 and status["tasks"]["jobs"] == 0


def test_oversized_arguments_in_a_later_chunk_queue_nothing(agents):
    from node import client as client_module

    agents.start_master()
    with agents.client() as client:
        big = ["x" * 100] * 3
        items = [[1]] * (client_module.CHUNK_TASKS + 5) + [[big * 1000]]
        with pytest.raises(ValueError, match="over the limit"):
            client.submit("square", items, max_payload=5000)
        status = client.status()
    assert status["tasks"]["queued"] == 0 and status["tasks"]["jobs"] == 0


def test_a_result_over_the_limit_is_recorded_failed(agents):
    agents.start_master("--max-payload", "3000", "--tasks-module", str(TEST_TASKS))
    agents.start_worker("--tasks-module", str(TEST_TASKS), concurrency=1)
    agents.wait_workers(1)
    with agents.client() as client:
        small, big = client.submit("blob", [[100], [5000]], retries=0).wait()
    assert small.ok and small.value == b"x" * 100
    assert not big.ok and "over the limit of 3000" in big.error


@pytest.mark.parametrize("task, items, message", [
    ("nope", [[1]], "unknown task 'nope'"),
    ("square", [[1], [1, 2]], r"task 1: square\(\) takes 1 argument\(s\), got 2"),
    ("square", [[]], r"task 0: square\(\) takes 1 argument\(s\), got 0"),
    ("square", [[1], 5], "task 1: arguments must be a list"),
    ("square", [[1], "ab"], "task 1: arguments must be a list"),
])
def test_bad_submissions_are_rejected_and_nothing_is_queued(agents, task, items, message):
    agents.start_master()
    with agents.client() as client:
        with pytest.raises(ValueError, match=message):
            client.submit(task, items)
        status = client.status()
    assert status["tasks"]["queued"] == 0 and status["tasks"]["jobs"] == 0


def test_failing_task_reports_its_error_after_retries(agents):
    agents.start_master()
    agents.start_worker(concurrency=2)
    agents.wait_workers(1)
    with agents.client() as client:
        results = client.submit("fail", [["boom"], ["bang"]], retries=2).wait()
    assert [r.ok for r in results] == [False, False]
    assert "RuntimeError: boom" in results[0].error and "RuntimeError: bang" in results[1].error
    assert [r.attempts for r in results] == [3, 3]


def test_closing_one_client_leaves_another_working_across_a_master_restart(agents):
    master = agents.start_master()
    first, second = agents.client(retry_for=30), agents.client(retry_for=30)
    try:
        assert first.status()["master"]["pid"] == second.status()["master"]["pid"] == master.pid
        second.close()
        master.kill_group(signal.SIGKILL)
        master.wait(10)
        again = agents.start_master()
        assert first.status()["master"]["pid"] == again.pid  # reconnected, not a stale object id
    finally:
        first.close()


def test_busy_worker_rejoins_a_restarted_master_promptly(agents):
    """While the master is away the pool keeps finishing prefetched tasks; that must not
    run the reconnect backoff up to its 30 s maximum."""
    master = agents.start_master()
    worker = agents.start_worker(concurrency=2)
    agents.wait_workers(1)
    with agents.client() as client:
        job = client.submit("sleep", [[0.05]] * 150)
        wait_for(lambda: client.status()["tasks"]["done"] >= 20, 30, "some progress")
    master.kill_group(signal.SIGKILL)
    master.wait(10)
    time.sleep(1.5)  # an outage while the pool finishes what it prefetched
    agents.start_master()
    agents.wait_workers(1, timeout=15)  # the backoff stays small: 0.5, 1, 2, 4 s...
    with agents.client() as client:
        results = client.job(job.id).wait()
    check_exactly_once(results, 150)
    assert worker.alive()


@pytest.mark.parametrize("chunk, message", [
    (5, "a job's arguments must be a list of argument lists"),
    ([[1], 5], "task 1: arguments must be a list"),
    ([[1], [1, 2]], r"task 1: square\(\) takes 1 argument"),
])
def test_master_itself_rejects_malformed_chunks(agents, chunk, message):
    """What a client that skips its own checks sends: the master's checks hold."""
    agents.start_master()
    with agents.client() as client:
        with pytest.raises(ValueError, match=message):
            client.call("submit", "some-key", "square", chunk, 0, 2, None, None)
        with pytest.raises(ValueError, match="timeout must be > 0"):
            client.call("submit", "other-key", "square", [[1]], 0, 1, -1.0, None)
        assert client.status()["tasks"]["jobs"] == 0


def test_sigterm_master_restart_mid_job_loses_nothing(agents):
    master = agents.start_master(ttl=2)
    workers = [agents.start_worker(concurrency=2) for _ in range(2)]
    agents.wait_workers(2)
    with agents.client(retry_for=60) as client:
        job = client.submit("sleep", [[0.02]] * 300)
        for _ in range(2):
            wait_for(lambda: client.status()["tasks"]["done"] > 0 and client.status()["tasks"]["leased"] > 0,
                     30, "tasks in flight")
            master.popen.send_signal(signal.SIGTERM)
            assert master.wait(30) == 0
            assert "stopped; state kept" in master.text()
            master = agents.start_master(ttl=2)
        results = job.wait()
    check_exactly_once(results, 300)
    assert all(r.ok for r in results)
    assert all(w.alive() for w in workers)
    agents.wait_workers(2)


def test_drain_timeout_hands_back_the_running_tasks(agents, tmp_path):
    markers, slow = _master_and_worker_with_test_tasks(agents, tmp_path, "0.5", concurrency=2)
    with agents.client() as client:
        job = client.submit("nap", [[2, str(markers)]] * 4, retries=0)
        wait_for(lambda: len(list(markers.iterdir())) == 2, 30, "both pool processes to start a task")
        slow.popen.send_signal(signal.SIGTERM)
        assert slow.wait(20) == 0
        assert "drain timeout" in slow.text()
        assert client.status()["tasks"]["done"] == 0
        agents.start_worker("--tasks-module", str(TEST_TASKS), concurrency=4)
        results = job.wait()
    check_exactly_once(results, 4)
    assert all(r.ok and r.attempts == 1 for r in results), [(r.error, r.attempts) for r in results]


def _fresh_master_while_two_tasks_run(agents, tmp_path, seconds: float, timeout: float):
    """Two `sleep` tasks leased by a 2-process worker, then the master is killed and
    comes back on an empty state dir. Returns the worker."""
    master = agents.start_master()
    worker = agents.start_worker(concurrency=2)
    agents.wait_workers(1)
    with agents.client() as client:
        client.submit("sleep", [[seconds]] * 2, timeout=timeout, retries=0)
        wait_for(lambda: client.status()["tasks"]["leased"] == 2, 30, "both tasks leased")
    master.kill_group(signal.SIGKILL)
    master.wait(10)
    agents.start_master(state_dir=tmp_path / "fresh")
    agents.wait_workers(1)
    return worker


def test_worker_survives_a_master_restarted_on_a_fresh_state_dir(agents, tmp_path):
    """Operator error: the master comes back with an empty ledger while workers still
    hold (and then fail) tasks it never issued. The workers must not wedge."""
    worker = _fresh_master_while_two_tasks_run(agents, tmp_path, seconds=8, timeout=4)
    with agents.client() as client:
        status = client.status()
        assert status["tasks"]["queued"] == 0 and status["tasks"]["leased"] == 0, status["tasks"]
        assert status["tasks"]["open_jobs"] == 0, "the fresh ledger knows nothing of the old job"
        time.sleep(4)  # the old tasks time out on the worker and are reported
        results = client.submit("square", [[n] for n in range(5)]).wait()
    assert [r.value for r in results] == [0, 1, 4, 9, 16]
    assert worker.alive() and "Traceback" not in worker.text()


def test_results_from_a_lost_ledger_never_land_on_new_tasks(agents, tmp_path):
    """A master back on a fresh state dir issues task ids again from 1: a worker still
    running old tasks 1 and 2 must not report them as the new tasks 1 and 2."""
    worker = _fresh_master_while_two_tasks_run(agents, tmp_path, seconds=3, timeout=30)
    with agents.client() as client:
        results = client.submit("square", [[10], [11]]).wait()  # ids 1 and 2 again
    assert [(r.ok, r.value) for r in results] == [(True, 100), (True, 121)]
    assert worker.alive()
    wait_for(lambda: "ledger changed" in worker.text(), 10, "the worker to say it dropped the old tasks")


def test_pool_processes_exit_when_their_agent_is_killed(agents):
    """kill -9 of the agent alone (not its group): its idle pool processes must not linger."""
    agents.start_master()
    worker = agents.start_worker(concurrency=3)
    agents.wait_workers(1)
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert len(children) == 3
    os.kill(worker.pid, signal.SIGKILL)

    def gone(pid):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                return handle.read().split(")")[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_for(lambda: all(gone(pid) for pid in children), 15, "the orphaned pool processes to exit")
