"""Unit tests of node.ledger.Ledger: a real SQLite file in a tmp dir, no processes."""

import pickle

import pytest

from node.ledger import Ledger


def blobs(*args):
    return [pickle.dumps((a,)) for a in args]


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path)
    led.upsert_worker("w1", "h1", 1, 1, 0.0)
    led.upsert_worker("w2", "h2", 2, 1, 0.0)
    yield led
    led.close()


def ok(task_id, value):
    return (task_id, True, pickle.dumps(value), None, 0.01)


def bad(task_id, error="boom"):
    return (task_id, False, None, error, 0.01)


def test_lease_hands_out_each_task_once(ledger):
    job = ledger.add_tasks("k", "square", 10.0, 1, 0, blobs(1, 2, 3), True)
    first = ledger.lease("w1", 2)
    second = ledger.lease("w2", 5)
    assert [r[0] for r in first + second] == [1, 2, 3]
    assert ledger.lease("w1", 5) == []
    assert first[0][1:] == ("square", pickle.dumps((1,)), 10.0)
    assert ledger.job(job)["total"] == 3 and ledger.queued == 0


def test_first_result_wins(ledger):
    job = ledger.add_tasks("k", "square", 10.0, 1, 0, blobs(7), True)
    (task_id, *_), = ledger.lease("w1", 1)
    assert ledger.record("w1", "h1", [ok(task_id, 49)], 1.0) == 1
    assert ledger.record("w2", "h2", [ok(task_id, -1)], 2.0) == 0  # a late duplicate adds nothing
    assert ledger.record("w1", "h1", [bad(task_id)], 3.0) == 0
    rows = ledger.results(job, 0, 10)
    assert len(rows) == 1 and pickle.loads(rows[0][3]) == 49 and rows[0][5] == "h1"
    info = ledger.job(job)
    assert (info["done"], info["failed"], info["finished"]) == (1, 0, True)


def test_duplicate_outcomes_in_one_batch_count_once(ledger):
    """A worker can end up running a task twice (lost by TTL, then leased again);
    both outcomes may arrive in one batch: one result, counted once."""
    job = ledger.add_tasks("k", "square", 10.0, 1, 0, blobs(1, 2), True)
    ids = [r[0] for r in ledger.lease("w1", 2)]
    assert ledger.record("w1", "h1", [ok(ids[0], 1), ok(ids[0], 1)], 1.0) == 1
    info = ledger.job(job)
    assert (info["done"], info["finished"]) == (1, False)
    assert ledger.queued == 0 and ledger.counts()["leased"] == 1
    assert ledger.record("w1", "h1", [ok(ids[1], 4)], 1.0) == 1
    assert ledger.job(job)["finished"] and ledger.outstanding == 0


def test_failure_retries_then_final_failure(ledger):
    job = ledger.add_tasks("k", "fail", 10.0, 2, 0, blobs("x"), True)  # 2 attempts
    (task_id, *_), = ledger.lease("w1", 1)
    assert ledger.record("w1", "h1", [bad(task_id, "first")], 1.0) == 0
    assert ledger.job(job)["finished"] is False and ledger.queued == 1
    again = ledger.lease("w2", 1)
    assert [r[0] for r in again] == [task_id]
    assert ledger.record("w2", "h2", [bad(task_id, "second")], 2.0) == 1
    (row,) = ledger.results(job, 0, 10)
    seq, idx, ok_, value, error, host, attempts, _ = row
    assert (idx, ok_, value, error, host, attempts) == (0, 0, None, "second", "h2", 2)
    info = ledger.job(job)
    assert (info["done"], info["failed"], info["finished"]) == (0, 1, True)
    assert ledger.lease("w1", 1) == []


def test_failure_from_a_worker_without_the_lease_is_ignored(ledger):
    ledger.add_tasks("k", "fail", 10.0, 1, 0, blobs("x"), True)
    (task_id, *_), = ledger.lease("w1", 1)
    assert ledger.record("w2", "h2", [bad(task_id)], 1.0) == 0
    assert ledger.counts()["leased"] == 1  # still w1's


def test_lose_worker_requeues_with_an_attempt_counted(ledger):
    job = ledger.add_tasks("k", "square", 10.0, 2, 0, blobs(1, 2), True)
    ids = [r[0] for r in ledger.lease("w1", 2)]
    assert ledger.lose_worker("w1", 1.0) == 2
    assert ledger.queued == 2 and ledger.counts()["leased"] == 0
    assert sorted(r[0] for r in ledger.lease("w2", 5)) == ids
    attempts = [ledger.failed_attempts(t) for t in ids]
    assert [a for a, _ in attempts] == [1, 1] and "lost" in attempts[0][1]
    # lost again with no attempts left: the loss is the result
    assert ledger.lose_worker("w2", 2.0) == 2
    info = ledger.job(job)
    assert (info["failed"], info["finished"]) == (2, True)
    assert all("was lost" in row[4] for row in ledger.results(job, 0, 10))


def test_release_does_not_count_an_attempt(ledger):
    job = ledger.add_tasks("k", "square", 10.0, 1, 0, blobs(1, 2, 3), True)
    ids = [r[0] for r in ledger.lease("w1", 3)]
    assert ledger.release("w1", ids[1:]) == 2
    assert ledger.release("w2", ids[:1]) == 0  # not w2's to release
    assert ledger.queued == 2
    assert [r[0] for r in ledger.lease("w2", 5)] == ids[1:]  # handed back: leased first, in order
    assert [ledger.failed_attempts(t)[0] for t in ids] == [0, 0, 0]
    ledger.record("w2", "h2", [ok(ids[1], 4), ok(ids[2], 9)], 1.0)
    ledger.record("w1", "h1", [ok(ids[0], 1)], 1.0)
    assert ledger.job(job)["finished"]
    assert [r[6] for r in ledger.results(job, 0, 10)] == [1, 1, 1]


def test_restart_keeps_tasks_and_results_and_leases_pending_again(tmp_path):
    led = Ledger(tmp_path)
    job = led.add_tasks("k", "square", 10.0, 3, 0, blobs(*range(5)), True)
    ids = [r[0] for r in led.lease("w1", 5)]
    led.record("w1", "h1", [ok(ids[0], 0), ok(ids[1], 1), bad(ids[2])], 1.0)
    led.close()  # what the process had in memory (leases, retry queue) is gone

    led = Ledger(tmp_path)
    try:
        assert led.queued == 3 and led.outstanding == 3
        # kept: one results row (sequence number 1) for the two results of that report
        assert [(r[0], r[1]) for r in led.results(job, 0, 10)] == [(1, 0), (1, 1)]
        again = led.lease("w2", 10)
        assert sorted(r[0] for r in again) == ids[2:]
        assert led.failed_attempts(ids[2])[0] == 1
        led.record("w2", "h2", [ok(t, 0) for t in ids[2:]], 2.0)
        info = led.job(job)
        assert (info["done"], info["finished"]) == (5, True)
        assert led.results(job, 1, 10)[0][0] > 1  # new results come after the old ones
    finally:
        led.close()


def test_restart_claimed_and_released_tasks_are_not_leased_twice(tmp_path):
    """After a restart a worker re-claims what it held, then hands it back: another
    worker's single lease call must not get those tasks twice."""
    led = Ledger(tmp_path)
    led.add_tasks("k", "square", 10.0, 1, 0, blobs(*range(6)), True)
    held = [r[0] for r in led.lease("w1", 3)]
    led.close()
    led = Ledger(tmp_path)
    try:
        assert led.claim("w1", held) == 3
        assert led.release("w1", held) == 3
        leased = [r[0] for r in led.lease("w2", 10)]
        assert sorted(leased) == list(range(1, 7)), leased
        assert led.lease("w2", 10) == []
    finally:
        led.close()


def test_claim_skips_tasks_with_results_or_other_holders(ledger):
    ledger.add_tasks("k", "square", 10.0, 1, 0, blobs(1, 2, 3), True)
    ids = [r[0] for r in ledger.lease("w1", 3)]
    ledger.record("w1", "h1", [ok(ids[0], 1)], 1.0)
    assert ledger.claim("w2", ids) == 0  # one has a result, the others are w1's
    ledger.release("w1", ids[1:])
    assert ledger.claim("w2", ids) == 2


def test_resent_chunk_is_idempotent(ledger):
    job = ledger.add_tasks("key", "square", 10.0, 1, 0, blobs(1, 2), False)
    assert ledger.add_tasks("key", "square", 10.0, 1, 0, blobs(1, 2), False) == job  # reply was lost: re-sent
    assert ledger.add_tasks("key", "square", 10.0, 1, 2, blobs(3), True) == job
    assert ledger.add_tasks("key", "square", 10.0, 1, 2, blobs(3), True) == job
    info = ledger.job(job)
    assert (info["total"], info["sealed"]) == (3, True)
    assert ledger.queued == 3
    assert [pickle.loads(r[2]) for r in ledger.lease("w1", 10)] == [(1,), (2,), (3,)]
    other = ledger.add_tasks("other", "square", 10.0, 1, 0, blobs(4), True)
    assert other != job and ledger.job(other)["total"] == 1


def test_unsealed_job_is_not_finished(ledger):
    job = ledger.add_tasks("key", "square", 10.0, 1, 0, blobs(1), False)
    (task_id, *_), = ledger.lease("w1", 1)
    ledger.record("w1", "h1", [ok(task_id, 1)], 1.0)
    assert ledger.job(job)["finished"] is False  # more chunks may come
    ledger.add_tasks("key", "square", 10.0, 1, 1, [], True)
    assert ledger.job(job)["finished"] is True


def test_counts_and_worker_done(ledger):
    ledger.add_tasks("k", "square", 10.0, 1, 0, blobs(1, 2, 3), True)
    ids = [r[0] for r in ledger.lease("w1", 2)]
    ledger.record("w1", "h1", [ok(ids[0], 1), bad(ids[1])], 1.0)
    assert ledger.counts() == {"queued": 1, "leased": 0, "done": 1, "failed": 1, "jobs": 1}
    done = {w["id"]: w["done"] for w in ledger.workers()}
    assert done == {"w1": 1, "w2": 0}


def test_claim_ignores_ids_this_ledger_never_issued(ledger):
    ledger.add_tasks("k", "square", 10.0, 1, 0, blobs(1), True)
    assert ledger.claim("w1", [1, 99, 100]) == 1
    assert ledger.counts()["leased"] == 1 and ledger.queued == 0
    assert ledger.record("w1", "h1", [bad(99), ok(100, 0)], 1.0) == 0
    assert ledger.counts()["done"] == 0


def test_calls_after_close_say_the_master_is_stopping(tmp_path):
    """Server threads still in a call when the master stops must fail with an OSError
    (clients and workers retry those), not sqlite3.ProgrammingError."""
    led = Ledger(tmp_path)
    job = led.add_tasks("k", "square", 10.0, 1, 0, blobs(1), True)
    led.close()
    for call in (lambda: led.job(job), lambda: led.results(job, 0, 10), lambda: led.lease("w1", 1),
                 lambda: led.record("w1", "h", [ok(1, 1)], 1.0), led.counts):
        with pytest.raises(ConnectionAbortedError, match="stopping"):
            call()
    assert not led.lock._is_owned()  # a failed call leaves the lock free


def test_a_refused_later_chunk_withdraws_the_whole_job(tmp_path):
    """A job is accepted whole or not at all, even when sent in chunks."""
    from node.master import FleetService, RejectedJob
    from node.tasks import Registry

    led = Ledger(tmp_path)
    try:
        service = FleetService(led, Registry())
        service.hello("w1", "h1", 1, 1)
        job = service.submit("key", "square", [[1], [2]], 0, False)
        assert len(service.lease("w1", 1)) == 1  # one task of the first chunk already runs
        with pytest.raises(RejectedJob, match="task 3: square.. takes 1 argument.*withdrawn"):
            service.submit("key", "square", [[3], [4, 5]], 2, True)
        assert led.job(job) is None
        assert led.counts() == {"queued": 0, "leased": 0, "done": 0, "failed": 0, "jobs": 0}
        assert service.lease("w1", 10) == []
    finally:
        led.close()
