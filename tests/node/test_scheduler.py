"""Unit tests of node.store.Store and node.scheduler.Scheduler together: real SQLite
files in tmp dirs (a small tmpfs for a full disk), no processes."""

import os
import pickle
import shutil
import sqlite3
import subprocess

import pytest

from node import PROTOCOL
from node.errors import RejectedJob, StorageError
from node.master import Master
from node.scheduler import Scheduler
from node.store import Store
from node.tasks import Registry


def blobs(*args):
    return [pickle.dumps((a,)) for a in args]


def ok(task_id, value):
    return (task_id, True, pickle.dumps(value), None, 0.01)


def bad(task_id, error="boom"):
    return (task_id, False, None, error, 0.01)


def ids_of(rows):
    return [r[0] for r in rows]


@pytest.fixture
def store(tmp_path):
    st = Store(tmp_path / "state")
    yield st
    st.close()


@pytest.fixture
def sched(store):
    sc = Scheduler(store)
    sc.join("w1", "h1", 1, 1, held=[])
    sc.join("w2", "h2", 2, 1, held=[])
    return sc


# -- ported from the Ledger's tests ---------------------------------------------------

def test_lease_hands_out_each_task_once(store, sched):
    """Each task is leased once, oldest first, with its task name, arguments and timeout."""
    job = sched.submit("k", "square", 10.0, 1, 0, blobs(1, 2, 3), 3)
    first = sched.lease("w1", 2)
    second = sched.lease("w2", 5)
    assert ids_of(first + second) == [1, 2, 3]
    assert sched.lease("w1", 5) == []
    assert first[0][1:] == ("square", pickle.dumps((1,)), 10.0)
    assert store.job(job)["total"] == 3 and sched.queued == 0


def test_first_result_wins(store, sched):
    """A task's first result is kept; late duplicates and late failures add nothing."""
    job = sched.submit("k", "square", 10.0, 1, 0, blobs(7), 1)
    (task_id, *_), = sched.lease("w1", 1)
    assert sched.complete("w1", "h1", [ok(task_id, 49)]) == 1
    assert sched.complete("w2", "h2", [ok(task_id, -1)]) == 0
    assert sched.complete("w1", "h1", [bad(task_id)]) == 0
    rows = store.results(job, 0, 10)
    assert len(rows) == 1 and pickle.loads(rows[0][3]) == 49 and rows[0][5] == "h1"
    info = store.job(job)
    assert (info["done"], info["failed"], info["finished"]) == (1, 0, True)


def test_duplicate_outcomes_in_one_batch_count_once(store, sched):
    """Two outcomes of one task in one report (it ran twice) make one result, counted once."""
    job = sched.submit("k", "square", 10.0, 1, 0, blobs(1, 2), 2)
    ids = ids_of(sched.lease("w1", 2))
    assert sched.complete("w1", "h1", [ok(ids[0], 1), ok(ids[0], 1)]) == 1
    info = store.job(job)
    assert (info["done"], info["finished"]) == (1, False)
    assert sched.queued == 0 and sched.counts()["leased"] == 1
    assert sched.complete("w1", "h1", [ok(ids[1], 4)]) == 1
    assert store.job(job)["finished"] and sched.outstanding == 0


def test_failure_retries_then_final_failure(store, sched):
    """A failure with attempts left is retried; the last failure is the task's result."""
    job = sched.submit("k", "fail", 10.0, 2, 0, blobs("x"), 1)
    (task_id, *_), = sched.lease("w1", 1)
    assert sched.complete("w1", "h1", [bad(task_id, "first")]) == 0
    assert store.job(job)["finished"] is False and sched.queued == 1
    assert ids_of(sched.lease("w2", 1)) == [task_id]
    assert sched.complete("w2", "h2", [bad(task_id, "second")]) == 1
    (row,) = store.results(job, 0, 10)
    _seq, idx, ok_, value, error, host, attempts, _ = row
    assert (idx, ok_, value, error, host, attempts) == (0, 0, None, "second", "h2", 2)
    info = store.job(job)
    assert (info["done"], info["failed"], info["finished"]) == (0, 1, True)
    assert sched.lease("w1", 1) == []


def test_failure_from_a_worker_without_the_lease_is_ignored(sched):
    """Only the worker holding a task's lease can fail it."""
    sched.submit("k", "fail", 10.0, 1, 0, blobs("x"), 1)
    (task_id, *_), = sched.lease("w1", 1)
    assert sched.complete("w2", "h2", [bad(task_id)]) == 0
    assert sched.leases == {task_id: "w1"}


def test_lose_worker_requeues_with_an_attempt_counted(store, sched):
    """A lost worker's tasks are pending again with an attempt counted; with none left the loss is the result."""
    job = sched.submit("k", "square", 10.0, 2, 0, blobs(1, 2), 2)
    ids = ids_of(sched.lease("w1", 2))
    assert sched.lose("w1") == 2
    assert sched.queued == 2 and sched.counts()["leased"] == 0
    assert sorted(ids_of(sched.lease("w2", 5))) == ids
    attempts = [store.failed_attempts(t) for t in ids]
    assert [a for a, _ in attempts] == [1, 1] and "lost" in attempts[0][1]
    assert sched.lose("w2") == 2
    info = store.job(job)
    assert (info["failed"], info["finished"]) == (2, True)
    assert all("was lost" in row[4] for row in store.results(job, 0, 10))


def test_release_does_not_count_an_attempt(store, sched):
    """Handed-back tasks are leased first, in order, with no attempt counted."""
    job = sched.submit("k", "square", 10.0, 1, 0, blobs(1, 2, 3), 3)
    ids = ids_of(sched.lease("w1", 3))
    assert sched.release("w1", ids[1:]) == 2
    assert sched.release("w2", ids[:1]) == 0  # not w2's to release
    assert sched.queued == 2
    assert ids_of(sched.lease("w2", 5)) == ids[1:]
    assert [store.failed_attempts(t)[0] for t in ids] == [0, 0, 0]
    sched.complete("w2", "h2", [ok(ids[1], 4), ok(ids[2], 9)])
    sched.complete("w1", "h1", [ok(ids[0], 1)])
    assert store.job(job)["finished"]
    assert [r[6] for r in store.results(job, 0, 10)] == [1, 1, 1]


def test_restart_keeps_tasks_and_results_and_leases_pending_again(tmp_path):
    """After a restart results and attempts are kept and every task without a result is pending."""
    store = Store(tmp_path)
    sched = Scheduler(store)
    job = sched.submit("k", "square", 10.0, 3, 0, blobs(*range(5)), 5)
    ids = ids_of(sched.lease("w1", 5))
    sched.complete("w1", "h1", [ok(ids[0], 0), ok(ids[1], 1), bad(ids[2])])
    store.close()  # what the process had in memory (leases, retry queue) is gone

    store = Store(tmp_path)
    try:
        sched = Scheduler(store)
        assert sched.queued == 3 and sched.outstanding == 3
        # kept: one results row (sequence number 1) for the two results of that report
        assert [(r[0], r[1]) for r in store.results(job, 0, 10)] == [(1, 0), (1, 1)]
        assert sorted(ids_of(sched.lease("w2", 10))) == ids[2:]
        assert store.failed_attempts(ids[2])[0] == 1
        sched.complete("w2", "h2", [ok(t, 0) for t in ids[2:]])
        info = store.job(job)
        assert (info["done"], info["finished"]) == (5, True)
        assert store.results(job, 1, 10)[0][0] > 1  # new results come after the old ones
    finally:
        store.close()


def test_restart_claimed_and_released_tasks_are_not_leased_twice(tmp_path):
    """Tasks re-claimed after a restart and handed back are not leased twice in one call."""
    store = Store(tmp_path)
    sched = Scheduler(store)
    sched.submit("k", "square", 10.0, 1, 0, blobs(*range(6)), 6)
    held = ids_of(sched.lease("w1", 3))
    store.close()
    store = Store(tmp_path)
    try:
        sched = Scheduler(store)
        assert sched.claim("w1", held) == 3
        assert sched.release("w1", held) == 3
        leased = ids_of(sched.lease("w2", 10))
        assert sorted(leased) == list(range(1, 7)), leased
        assert sched.lease("w2", 10) == []
    finally:
        store.close()


def test_claim_skips_tasks_with_results_or_other_holders(sched):
    """A claim takes only tasks without a result that no other worker holds."""
    sched.submit("k", "square", 10.0, 1, 0, blobs(1, 2, 3), 3)
    ids = ids_of(sched.lease("w1", 3))
    sched.complete("w1", "h1", [ok(ids[0], 1)])
    assert sched.claim("w2", ids) == 0  # one has a result, the others are w1's
    sched.release("w1", ids[1:])
    assert sched.claim("w2", ids) == 2


def test_resent_chunk_is_idempotent(store, sched):
    """Re-sending a chunk (its reply was lost) adds nothing; another key is another job."""
    job = sched.submit("key", "square", 10.0, 1, 0, blobs(1, 2), None)
    assert sched.submit("key", "square", 10.0, 1, 0, blobs(1, 2), None) == job
    assert sched.submit("key", "square", 10.0, 1, 2, blobs(3), 3) == job
    assert sched.submit("key", "square", 10.0, 1, 2, blobs(3), 3) == job
    info = store.job(job)
    assert (info["total"], info["sealed"]) == (3, True)
    assert sched.queued == 3
    assert [pickle.loads(r[2]) for r in sched.lease("w1", 10)] == [(1,), (2,), (3,)]
    other = sched.submit("other", "square", 10.0, 1, 0, blobs(4), 1)
    assert other != job and store.job(other)["total"] == 1


def test_unsealed_job_is_not_finished(store, sched):
    """A job whose tasks all ran is finished only once sealed (an empty final chunk)."""
    job = sched.submit("key", "square", 10.0, 1, 0, blobs(1), None)
    (task_id, *_), = sched.lease("w1", 1)
    sched.complete("w1", "h1", [ok(task_id, 1)])
    assert store.job(job)["finished"] is False  # more chunks may come
    sched.submit("key", "square", 10.0, 1, 1, [], 1)
    assert store.job(job)["finished"] is True
    assert sched.counts()["open_jobs"] == 0


def test_counts_and_worker_done(store, sched):
    """counts() reports the queue, leases, lifetime results and jobs; workers count their successes."""
    sched.submit("k", "square", 10.0, 1, 0, blobs(1, 2, 3), 3)
    ids = ids_of(sched.lease("w1", 2))
    sched.complete("w1", "h1", [ok(ids[0], 1), bad(ids[1])])
    assert sched.counts() == {"queued": 1, "leased": 0, "done": 1, "failed": 1, "open_jobs": 1, "jobs": 1}
    assert {w["id"]: w["done"] for w in store.workers()} == {"w1": 1, "w2": 0}


def test_claim_ignores_ids_this_ledger_never_issued(sched):
    """Ids this ledger never issued are neither claimed nor recorded."""
    sched.submit("k", "square", 10.0, 1, 0, blobs(1), 1)
    assert sched.claim("w1", [1, 99, 100]) == 1
    assert sched.counts()["leased"] == 1 and sched.queued == 0
    assert sched.complete("w1", "h1", [bad(99), ok(100, 0)]) == 0
    assert sched.counts()["done"] == 0


def test_calls_after_close_say_the_master_is_stopping(tmp_path):
    """Calls still running when the store closes fail with ConnectionAbortedError and free the locks."""
    store = Store(tmp_path)
    sched = Scheduler(store)
    job = sched.submit("k", "square", 10.0, 1, 0, blobs(1), 1)
    store.close()
    for call in (lambda: store.job(job), lambda: store.results(job, 0, 10), lambda: sched.lease("w1", 1),
                 lambda: sched.complete("w1", "h", [ok(1, 1)]), sched.counts):
        with pytest.raises(ConnectionAbortedError, match="stopping"):
            call()
    assert not store.lock._is_owned() and not sched.lock._is_owned()  # a failed call leaves the locks free


def test_a_refused_later_chunk_withdraws_the_whole_job(store):
    """A job is accepted whole or not at all, even when sent in chunks."""
    sched = Scheduler(store)
    master = Master(store, sched, Registry())
    master.hello("w1", "h1", 1, 1, protocol=PROTOCOL)
    job = master.submit("key", "square", [[1], [2]], 0, None)["job"]
    assert len(master.lease("w1", 1)) == 1  # one task of the first chunk already runs
    with pytest.raises(RejectedJob, match="task 3: square.. takes 1 argument.*withdrawn"):
        master.submit("key", "square", [[3], [4, 5]], 2, 4)
    assert store.job(job) is None
    assert sched.counts() == {"queued": 0, "leased": 0, "done": 0, "failed": 0, "open_jobs": 0, "jobs": 0}
    assert master.lease("w1", 10) == [] and sched.leases == {}


# -- memory follows the database ------------------------------------------------------

@pytest.fixture
def tight(tmp_path):
    """(store, scheduler, disk): the state dir on a 4 MB tmpfs that `disk.fill()` fills."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=30)
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs for a full disk: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full disk (needs root): {done.stderr.strip()}")
    store = None
    try:
        store = Store(mount / "state")
        sched = Scheduler(store)
        sched.join("w1", "h1", 1, 1, held=[])
        yield store, sched, Disk(mount / "filler")
    finally:
        if store is not None:
            store.close()
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30)


class Disk:
    def __init__(self, filler):
        self.filler = filler

    def fill(self) -> None:
        """Write the filler until the file system has no page left."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT)
        try:
            for size in (1 << 16, 4096, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError:
                        break
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()


def memory(sched, job):
    """What the scheduler holds in memory that a failed call must leave alone."""
    counts = sched.counts()
    return (dict(sched.leases), sched.queued, sched.outstanding, counts["done"], counts["failed"],
            counts["open_jobs"], job in sched.jobs, {w: set(t) for w, t in sched.held.items()},
            dict(sched.failures))


def test_complete_on_a_full_disk_changes_nothing_then_stores(tight):
    """A report the full disk refuses leaves memory as it was; once space is back the same report stores."""
    store, sched, disk = tight
    big = [os.urandom(20_000) for _ in range(8)]
    sched.submit("warm", "square", 10.0, 1, 0, blobs(0), 1)  # reserves the id blocks: the commit itself fails
    sched.complete("w1", "h1", [ok(t, 0) for t in ids_of(sched.lease("w1", 1))])
    job = sched.submit("k", "square", 10.0, 1, 0, blobs(*range(8)), 8)
    ids = ids_of(sched.lease("w1", 8))
    outcomes = [(t, True, value, None, 0.01) for t, value in zip(ids, big)]
    before = memory(sched, job)
    disk.fill()
    with pytest.raises(StorageError, match="could not store results"):
        sched.complete("w1", "h1", outcomes)
    assert memory(sched, job) == before
    assert all(sched.leases[t] == "w1" for t in ids) and not store.job(job)["finished"]
    assert store.results(job, 0, 100) == []
    disk.free()
    assert sched.complete("w1", "h1", outcomes) == 8
    assert store.job(job)["finished"] and job not in sched.jobs
    rows = store.results(job, 0, 100)
    assert sorted(r[1] for r in rows) == list(range(8)) and [r[3] for r in rows] == big
    assert sched.counts()["done"] == before[3] + 8 and sched.leases == {}


def test_submit_on_a_full_disk_changes_nothing_then_stores(tight):
    """A chunk the full disk refuses queues nothing; once space is back the same chunk is accepted."""
    store, sched, disk = tight
    sched.submit("warm", "square", 10.0, 1, 0, blobs(0), 1)  # reserves the id blocks
    chunk = blobs(*range(50))
    before = memory(sched, None)
    disk.fill()
    with pytest.raises(StorageError, match="could not store the job"):
        sched.submit("k", "square", 10.0, 1, 0, chunk, 50)
    assert memory(sched, None) == before and store.job_id("k") is None
    assert sched.counts()["open_jobs"] == 1 and sched.counts()["jobs"] == 1
    disk.free()
    job = sched.submit("k", "square", 10.0, 1, 0, chunk, 50)
    assert store.job(job)["total"] == 50 and job in sched.jobs
    assert sched.queued == 51 and sched.counts()["open_jobs"] == 2


def test_lose_on_a_full_disk_keeps_the_leases_then_requeues(tight):
    """A worker lost while the disk is full keeps its leases; a later loss with space back requeues them."""
    store, sched, disk = tight
    job = sched.submit("k", "square", 10.0, 2, 0, blobs(1, 2), 2)
    ids = ids_of(sched.lease("w1", 2))
    before = memory(sched, job)
    disk.fill()
    with pytest.raises(StorageError):
        sched.lose("w1")
    assert memory(sched, job) == before and sched.touch("w1")
    assert [w["state"] for w in store.workers()] == ["alive"]
    disk.free()
    assert sched.lose("w1") == 2
    assert sched.leases == {} and sched.queued == 2
    assert [store.failed_attempts(t)[0] for t in ids] == [1, 1]
    assert [w["state"] for w in store.workers()] == ["lost"]


class FailingCommit:
    """Stands in for the store's writer connection: every COMMIT fails as on an I/O error."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_failed_commit_in_complete_changes_nothing(store, sched, monkeypatch):
    """A COMMIT that fails inside complete raises StorageError, rolls back, and leaves memory as it was."""
    job = sched.submit("k", "fail", 10.0, 2, 0, blobs(1, 2, 3, 4), 4)
    ids = ids_of(sched.lease("w1", 4))
    sched.complete("w1", "h1", [ok(ids[3], 16)])  # reserves the seq ids: the report's own COMMIT fails
    before = memory(sched, job)
    monkeypatch.setattr(store, "db", FailingCommit(store.db))
    with pytest.raises(StorageError, match="disk I/O error"):
        sched.complete("w1", "h1", [ok(ids[0], 1), ok(ids[1], 4), bad(ids[2])])
    assert memory(sched, job) == before and store.done_total == 1
    assert len(store.results(job, 0, 10)) == 1 and store.failed_attempts(ids[2]) == (0, None)
    monkeypatch.undo()
    assert sched.complete("w1", "h1", [ok(ids[0], 1), ok(ids[1], 4), bad(ids[2])]) == 2
    assert store.job(job)["done"] == 3 and store.failed_attempts(ids[2])[0] == 1 and sched.queued == 1


# -- ids, sealing, retention ------------------------------------------------------------

def test_ids_are_never_reused_after_the_wal_tail_is_lost(tmp_path):
    """In fast durability, losing the WAL's unsynced tail never makes a job, task or result id come back."""
    state = tmp_path / "state"
    saved = tmp_path / "on-disk"
    saved.mkdir()
    store = Store(state, "fast")
    sched = Scheduler(store)
    sched.submit("a", "square", 10.0, 1, 0, blobs(1), 1)
    sched.complete("w1", "h1", [ok(t, 1) for t in ids_of(sched.lease("w1", 1))])  # a result: seq ids reserved
    for name in ("ledger.sqlite3", "ledger.sqlite3-wal"):  # what reached the disk (-shm is rebuilt)
        shutil.copy(state / name, saved / name)
    jobs = [sched.submit(key, "square", 10.0, 1, 0, blobs(2, 3), 2) for key in ("b", "c")]
    tasks = ids_of(sched.lease("w1", 10))
    sched.complete("w1", "h1", [ok(t, 0) for t in tasks])
    seqs = [r[0] for job in jobs for r in store.results(job, 0, 10)]
    assert len(tasks) == 4 and len(seqs) == 4
    store.close()
    for path in state.iterdir():  # the power cut: the tail after the copy is lost
        path.unlink()
    for path in saved.iterdir():
        shutil.copy(path, state / path.name)

    store = Store(state, "fast")
    try:
        sched = Scheduler(store)
        assert store.job(jobs[0]) is None  # the tail really was lost
        job = sched.submit("d", "square", 10.0, 1, 0, blobs(4), 1)
        (task,) = ids_of(sched.lease("w1", 10))
        sched.complete("w1", "h1", [ok(task, 16)])
        assert job > max(jobs) and task > max(tasks)
        assert store.results(job, 0, 10)[0][0] > max(seqs)
    finally:
        store.close()


def test_a_final_chunk_with_the_wrong_total_is_refused(store, sched):
    """A final chunk whose total differs from what the master holds is refused and seals nothing."""
    job = sched.submit("k", "square", 10.0, 1, 0, blobs(1, 2), None)
    with pytest.raises(LookupError, match="holds 3 of its 4 tasks"):
        sched.submit("k", "square", 10.0, 1, 3, blobs(4), 4)  # the chunk at index 2 went missing
    with pytest.raises(LookupError, match="holds 2 of its 1 tasks"):
        sched.submit("k", "square", 10.0, 1, 2, [], 1)
    info = store.job(job)
    assert (info["total"], info["sealed"]) == (2, False) and not sched.jobs[job].sealed
    assert sched.queued == 2 and sched.outstanding == 2
    assert sched.submit("k", "square", 10.0, 1, 0, blobs(1, 2), None) == job  # re-sent: adds nothing
    assert store.job(job)["total"] == 2 and sched.queued == 2
    sched.submit("k", "square", 10.0, 1, 2, blobs(3), None)
    sched.submit("k", "square", 10.0, 1, 3, blobs(4), 4)
    info = store.job(job)
    assert (info["total"], info["sealed"]) == (4, True) and sched.queued == 4


def finish(sched, key, n=1):
    """Submit a job of n tasks and run it to the end; returns its id."""
    job = sched.submit(key, "square", 10.0, 1, 0, blobs(*range(n)), n)
    sched.complete("w1", "h1", [ok(t, 0) for t in ids_of(sched.lease("w1", n))])
    return job


def test_prune_deletes_old_and_excess_finished_jobs_only(store, sched):
    """Pruning removes finished jobs past their age or beyond `keep`, never an unfinished one."""
    old, middle, new = (finish(sched, key) for key in ("old", "middle", "new"))
    open_job = sched.submit("open", "square", 10.0, 1, 0, blobs(1), 1)
    for job, finished in ((old, 100.0), (middle, 200.0), (new, 300.0)):
        store.db.execute("UPDATE jobs SET finished = ? WHERE id = ?", (finished, job))  # their ages
    assert store.prune(older_than=50.0, keep=10) == []
    assert store.prune(older_than=150.0, keep=10) == [old]
    assert store.prune(older_than=0.0, keep=1) == [middle]
    assert store.prune(older_than=1e12, keep=0) == [new]
    assert [store.job(j) for j in (old, middle, new)] == [None, None, None]
    assert store.results(old, 0, 10) == [] and store.job(open_job)["total"] == 1
    assert ids_of(sched.lease("w2", 10)) == [4]  # the open job still runs
    master = Master(store, sched, Registry())
    with pytest.raises(LookupError, match=f"job {middle} is no longer on this master.*--retention"):
        master.job(middle)
    with pytest.raises(LookupError, match="^no job 1000 on this master$"):
        master.job(1000)
    assert master.job(open_job)["id"] == open_job


def test_the_job_count_follows_the_ledger_without_counting_rows(store, sched, tmp_path):
    """status's count of jobs is kept in memory (counting rows would cost per job kept):
    it follows new jobs, re-sent chunks, withdrawals, pruning, and a reopened ledger."""
    def rows():
        return store.db.execute("SELECT count(*) FROM jobs").fetchone()[0]

    done = finish(sched, "done")
    sched.submit("k", "square", 10.0, 1, 0, blobs(1), None)
    sched.submit("k", "square", 10.0, 1, 0, blobs(1), None)  # re-sent: nothing new
    assert store.job_count() == rows() == 2
    assert sched.withdraw(store.job_id("k")) == 1
    assert store.job_count() == rows() == 1
    store.db.execute("UPDATE jobs SET finished = 1.0 WHERE id = ?", (done,))
    assert store.prune(older_than=10.0, keep=10) == [done]
    assert store.job_count() == rows() == 0
    sched.submit("again", "square", 10.0, 1, 0, blobs(1), 1)
    reopened = Store(tmp_path / "state")
    try:
        assert reopened.job_count() == 1
    finally:
        reopened.close()


def test_expire_unsealed_withdraws_paused_uploads_only(store, sched):
    """An unsealed job whose upload paused is withdrawn with its leases; a sealed one never."""
    paused = sched.submit("paused", "square", 10.0, 1, 0, blobs(1, 2), None)
    sealed = sched.submit("sealed", "square", 10.0, 1, 0, blobs(3), 1)
    leased = ids_of(sched.lease("w1", 10))
    assert sched.expire_unsealed(600.0) == []  # both just touched
    for job in (paused, sealed):
        sched.jobs[job].touched -= 700.0
    assert sched.expire_unsealed(600.0) == [paused]
    assert store.job(paused) is None and paused not in sched.jobs
    assert sched.leases == {leased[2]: "w1"} and sched.held["w1"] == {leased[2]}
    assert sched.outstanding == 1 and sched.counts()["open_jobs"] == 1
    assert sched.complete("w1", "h1", [ok(leased[0], 1)]) == 0  # a late result of a withdrawn task
    assert sched.complete("w1", "h1", [ok(leased[2], 9)]) == 1 and store.job(sealed)["finished"]


def test_results_pages_are_whole_rows_bounded_in_bytes(store, sched):
    """A page of results holds whole stored rows, at least one, and stops before max_bytes."""
    job = sched.submit("k", "square", 10.0, 1, 0, blobs(*range(8)), 8)
    ids = ids_of(sched.lease("w1", 8))
    for pair in (ids[0:2], ids[2:4], ids[4:6], ids[6:8]):  # four reports: four rows of two results
        sched.complete("w1", "h1", [(t, True, os.urandom(10_000), None, 0.01) for t in pair])
    everything = store.results(job, 0, 100, max_bytes=10**9)
    seqs = sorted({r[0] for r in everything})
    assert len(everything) == 8 and len(seqs) == 4
    assert store.results(job, 0, 100, max_bytes=1) == everything[:2]  # one row, though over the bound
    assert store.results(job, 0, 100, max_bytes=50_000) == everything[:4]  # a third row would pass 50 KB
    assert store.results(job, 0, 1) == everything[:2]  # a row is never split
    assert store.results(job, seqs[1], 100, max_bytes=50_000) == everything[4:8]
    assert store.results(job, seqs[3], 100) == []


def test_forget_workers_drops_left_and_lost_workers_only(store, sched):
    """Forgetting old workers drops those that left or were lost, never a live one."""
    sched.join("w3", "h3", 3, 1, held=[])
    sched.leave("w2")
    sched.lose("w3")
    assert store.forget_workers(before=0.0) == 0  # all seen just now
    assert store.forget_workers(before=1e12) == 2
    assert [(w["id"], w["state"]) for w in store.workers()] == [("w1", "alive")]


def test_malformed_outcomes_become_failed_attempts_or_are_ignored(store, sched):
    """A malformed outcome never marks a task done: it is a failed attempt saying so, or ignored."""
    master = Master(store, sched, Registry(), max_payload=1000)
    job = master.submit("k", "square", [[1], [2], [3], [4]], 0, 4, retries=1)["job"]
    ids = ids_of(sched.lease("w1", 4))
    outcomes = [
        (ids[0], True, pickle.dumps(1), None),  # four fields
        (ids[1], True, "1", None, 0.1),  # a value that is not bytes
        (ids[2], True, b"x" * 1001, None, 0.1),  # over max_payload
        (str(ids[3]), True, pickle.dumps(16), None, 0.1),  # an id that is not an int: names no task
        None,
        (ids[3], True, pickle.dumps(16), None, 0.1),
    ]
    assert master.complete("w1", "h1", outcomes) == 1
    info = store.job(job)
    assert (info["done"], info["failed"], info["finished"]) == (1, 0, False)
    assert [r[1] for r in store.results(job, 0, 10)] == [3]
    for task_id, problem in zip(ids, ("4 fields instead of 5", "type str", "over the master's limit")):
        count, error = store.failed_attempts(task_id)
        assert count == 1 and "malformed outcome from worker w1" in error and problem in error
    assert sched.queued == 3 and sched.leases == {}
