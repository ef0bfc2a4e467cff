"""The master's state: jobs, tasks and results durable in SQLite; leases in memory.

What must survive `kill -9` is on disk before the call that made it returns: every
accepted task, every stored result, every counted failed attempt. WAL with
synchronous=NORMAL: a committed call survives the process dying (the WAL is in the
OS's hands); a power cut may lose the last moments, never consistency.

Rows are batches, not tasks: a submitted chunk is stored as batches of up to
BATCH_TASKS tasks, and the outcomes of one report as one results row per job. SQLite's
cost is per row, so this is what makes tiny tasks cheap. Task ids are still
consecutive integers (a batch holds `first_task .. first_task + count - 1`).

In memory, for unfinished jobs only: which of their tasks have a result (a bitmap per
job: the first result wins), the batches' place in the id space, and the leases. A
million queued tasks cost disk and a 125 KB bitmap, not RAM.

Leases live in memory only, bounded by what workers hold. After a restart every task
without a result is pending again; workers re-claim what they still hold when they say
hello (see FleetService). A task that does run twice still gets exactly one result.
"""

from __future__ import annotations

import bisect
import collections
import pickle
import sqlite3
import threading
import time
import uuid
from pathlib import Path

BATCH_TASKS = 1024  # tasks in one stored batch at most
BATCH_BYTES = 1024 * 1024  # and about this many bytes of arguments (a larger task is a batch alone)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs(
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE,
    task TEXT NOT NULL,
    timeout REAL NOT NULL,
    max_attempts INTEGER NOT NULL,
    total INTEGER NOT NULL DEFAULT 0,
    sealed INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batches(
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    first_index INTEGER NOT NULL,  -- the first task's index in its job
    first_task INTEGER NOT NULL,  -- the first task's id
    count INTEGER NOT NULL,
    args BLOB NOT NULL,  -- pickled list of each task's pickled arguments
    UNIQUE(job_id, first_index)  -- a re-sent chunk adds nothing
);
CREATE TABLE IF NOT EXISTS attempts(  -- failed attempts, for the few tasks that have some
    task_id INTEGER PRIMARY KEY,
    count INTEGER NOT NULL,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS results(
    seq INTEGER PRIMARY KEY,  -- completion order, for streaming a job's results
    job_id INTEGER NOT NULL,
    host TEXT,
    worker TEXT,
    finished REAL NOT NULL,
    rows BLOB NOT NULL  -- pickled list of (task_id, index, ok, value_blob, error, attempts, duration)
);
CREATE INDEX IF NOT EXISTS results_job ON results(job_id, seq);
CREATE TABLE IF NOT EXISTS workers(
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER,
    concurrency INTEGER,
    started REAL,
    last_seen REAL,
    done INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL
);
"""


class _Batch:
    __slots__ = ("id", "job_id", "first_index", "first_task", "count")

    def __init__(self, id, job_id, first_index, first_task, count):
        self.id, self.job_id, self.first_index, self.first_task, self.count = (
            id, job_id, first_index, first_task, count)

    def index(self, task_id: int) -> int:
        """The task's index in its job."""
        return self.first_index + task_id - self.first_task


class _Job:
    """What leasing and recording need of an unfinished job, kept in memory."""

    __slots__ = ("task", "timeout", "max_attempts", "total", "sealed", "settled", "done")

    def __init__(self, task, timeout, max_attempts, total, sealed, settled):
        self.task, self.timeout, self.max_attempts = task, timeout, max_attempts
        self.total, self.sealed, self.settled = total, sealed, settled
        self.done = bytearray((total + 7) // 8)  # bit i: task index i has its result

    def has(self, index: int) -> bool:
        return index < len(self.done) * 8 and self.done[index >> 3] >> (index & 7) & 1

    def mark(self, index: int) -> None:
        if index >= len(self.done) * 8:
            self.done.extend(bytes(index // 8 + 1 - len(self.done)))
        self.done[index >> 3] |= 1 << (index & 7)
        self.settled += 1

    @property
    def finished(self) -> bool:
        return self.sealed and self.settled >= self.total


class Ledger:
    def __init__(self, state_dir: str | Path):
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "ledger.sqlite3"
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA wal_autocheckpoint=10000")  # checkpoint (and fsync) every ~40 MB, not 4
        self.db.executescript(SCHEMA)
        # Names this ledger: task ids mean nothing to another one (a fresh state dir).
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('instance', ?)", (uuid.uuid4().hex,))
        self.instance = self._scalar("SELECT value FROM meta WHERE key = 'instance'")
        self.lock = threading.RLock()
        # Clients' reads (results, job progress) go through their own connection: under
        # WAL they see the last commit and never wait for the writer's lock.
        self.reader = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.read_lock = threading.Lock()
        self.leases: dict[int, str] = {}  # task id -> worker
        self.held: dict[str, set] = collections.defaultdict(set)  # worker -> task ids
        self.retry: collections.deque = collections.deque()  # task ids to lease before the cursor's
        self.jobs: dict[int, _Job] = {}  # unfinished jobs
        self.starts: list[int] = []  # first_task of the batches of unfinished jobs, sorted
        self.batches: dict[int, _Batch] = {}  # first_task -> batch
        self.cursor = 0  # id of the last batch the lease cursor entered
        self.current: tuple | None = None  # (batch, its args blobs, next offset)
        self.loaded: tuple | None = None  # (batch id, args blobs) last read for a retry
        self.failures: dict[int, int] = {}  # task id -> failed attempts (tasks with any)
        self._load()

    def _load(self) -> None:
        """Rebuild the in-memory view of unfinished jobs from the tables."""
        db = self.db
        for job_id, task, timeout, max_attempts, total, sealed in db.execute(
            "SELECT id, task, timeout, max_attempts, total, sealed FROM jobs"
            " WHERE sealed = 0 OR done + failed < total"
        ):
            self.jobs[job_id] = _Job(task, timeout, max_attempts, total, bool(sealed), 0)
        for job_id, job in self.jobs.items():
            for (blob,) in db.execute("SELECT rows FROM results WHERE job_id = ?", (job_id,)):
                for row in pickle.loads(blob):
                    job.mark(row[1])
        for row in db.execute(
            "SELECT id, job_id, first_index, first_task, count FROM batches ORDER BY first_task"
        ):
            if row[1] in self.jobs:
                self._remember(_Batch(*row))
        first = min((b.id for b in self.batches.values()), default=None)
        self.cursor = first - 1 if first is not None else self._scalar("SELECT coalesce(max(id), 0) FROM batches")
        self.failures = dict(db.execute("SELECT task_id, count FROM attempts"))
        self.seq = self._scalar("SELECT coalesce(max(seq), 0) FROM results")
        self.next_task = self._scalar("SELECT coalesce(max(first_task + count), 1) FROM batches")
        self.outstanding = sum(job.total - job.settled for job in self.jobs.values())

    def _remember(self, batch: _Batch) -> None:
        bisect.insort(self.starts, batch.first_task)
        self.batches[batch.first_task] = batch

    def _forget_job(self, job_id: int) -> None:
        """A finished job leaves memory; late duplicates of its tasks find nothing."""
        self.jobs.pop(job_id, None)
        gone = [start for start, batch in self.batches.items() if batch.job_id == job_id]
        for start in gone:
            del self.batches[start]
        if gone:
            self.starts = sorted(self.batches)

    def close(self) -> None:
        with self.lock, self.read_lock:
            self.db.close()
            self.reader.close()
            # Server threads may still be in a call while the master stops: they get an
            # OSError, which clients and workers treat as "master away, retry", instead of
            # sqlite3.ProgrammingError, which they would not retry.
            self.db = self.reader = _Stopped()

    def _scalar(self, sql: str, *params):
        return self.db.execute(sql, params).fetchone()[0]

    def transaction(self):
        return _Transaction(self)

    @property
    def queued(self) -> int:
        return self.outstanding - len(self.leases)

    def _locate(self, task_id: int):
        """(batch, job) of a task of an unfinished job, or (None, None)."""
        i = bisect.bisect_right(self.starts, task_id) - 1
        if i < 0:
            return None, None
        batch = self.batches[self.starts[i]]
        if task_id >= batch.first_task + batch.count:
            return None, None
        return batch, self.jobs.get(batch.job_id)

    # -- jobs and tasks -------------------------------------------------------------

    def add_tasks(self, key: str, task: str, timeout: float, max_attempts: int, first_index: int,
                  blobs: list[bytes], final: bool) -> int:
        """Append tasks (their pickled arguments) to the job named by `key`, created on
        first use. Re-sending a chunk (same key and first_index) after a lost reply adds
        nothing twice."""
        with self.transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE key = ?", (key,)).fetchone()
            if row:
                job_id = row[0]
            else:
                job_id = db.execute(
                    "INSERT INTO jobs(key, task, timeout, max_attempts, created) VALUES (?, ?, ?, ?, ?)",
                    (key, task, timeout, max_attempts, time.time()),
                ).lastrowid
                self.jobs[job_id] = _Job(task, timeout, max_attempts, 0, False, 0)
            job = self.jobs.get(job_id)
            fresh = db.execute(
                "SELECT 1 FROM batches WHERE job_id = ? AND first_index = ?", (job_id, first_index)
            ).fetchone() is None
            if fresh and job is not None:
                for offset, part in _split(blobs):
                    batch_id = db.execute(
                        "INSERT INTO batches(job_id, first_index, first_task, count, args) VALUES (?, ?, ?, ?, ?)",
                        (job_id, first_index + offset, self.next_task, len(part), pickle.dumps(part)),
                    ).lastrowid
                    self._remember(_Batch(batch_id, job_id, first_index + offset, self.next_task, len(part)))
                    self.next_task += len(part)
                db.execute("UPDATE jobs SET total = total + ? WHERE id = ?", (len(blobs), job_id))
                job.total += len(blobs)
                self.outstanding += len(blobs)
            if final:
                db.execute("UPDATE jobs SET sealed = 1 WHERE id = ?", (job_id,))
                if job is not None:
                    job.sealed = True
                    if job.finished:  # an empty job
                        self._forget_job(job_id)
        return job_id

    def abort(self, key: str) -> int:
        """Withdraw an unsealed job whose later chunk was refused: its tasks, results and
        leases go (a task already running finishes, its outcome finds nothing). Returns
        how many tasks the job had."""
        with self.transaction() as db:
            row = db.execute("SELECT id, total FROM jobs WHERE key = ? AND sealed = 0", (key,)).fetchone()
            if row is None:
                return 0
            job_id, total = row
            job = self.jobs.get(job_id)
            for batch in [b for b in self.batches.values() if b.job_id == job_id]:
                for task_id in range(batch.first_task, batch.first_task + batch.count):
                    self._drop_lease(task_id)
            for table, column in (("results", "job_id"), ("batches", "job_id"), ("jobs", "id")):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (job_id,))
            if job is not None:
                self.outstanding -= job.total - job.settled
            self._forget_job(job_id)
        return total

    def _args(self, batch: _Batch) -> list:
        if self.current and self.current[0] is batch:
            return self.current[1]
        if not self.loaded or self.loaded[0] != batch.id:
            blob = self.db.execute("SELECT args FROM batches WHERE id = ?", (batch.id,)).fetchone()[0]
            self.loaded = (batch.id, pickle.loads(blob))
        return self.loaded[1]

    def _pending(self, task_id: int, batch: _Batch, job: _Job, taken: set) -> bool:
        return not (task_id in self.leases or task_id in taken or job.has(batch.index(task_id)))

    def lease(self, worker: str, limit: int) -> list[tuple]:
        """Up to `limit` pending tasks, retries first, then oldest first:
        (task_id, task, args_blob, timeout)."""
        with self.lock:
            rows, taken = [], set()  # a handed-back task may be queued twice, or also lie ahead
            while self.retry and len(rows) < limit:
                task_id = self.retry.popleft()
                batch, job = self._locate(task_id)
                if job is not None and self._pending(task_id, batch, job, taken):
                    rows.append((task_id, job.task, self._args(batch)[task_id - batch.first_task], job.timeout))
                    taken.add(task_id)
            while len(rows) < limit:
                if self.current is None or self.current[2] >= self.current[0].count:
                    if not self._advance():
                        break
                batch, blobs, offset = self.current
                job = self.jobs.get(batch.job_id)
                if job is None:  # finished meanwhile
                    self.current = (batch, blobs, batch.count)
                    continue
                end = min(batch.count, offset + limit - len(rows))
                for i in range(offset, end):
                    task_id = batch.first_task + i
                    if self._pending(task_id, batch, job, taken):
                        rows.append((task_id, job.task, blobs[i], job.timeout))
                self.current = (batch, blobs, end)
            for row in rows:
                self.leases[row[0]] = worker
            self.held[worker].update(row[0] for row in rows)
        return rows

    def _advance(self) -> bool:
        """Move the lease cursor into the next batch of an unfinished job."""
        while True:
            row = self.db.execute(
                "SELECT id, first_task, args FROM batches WHERE id > ? ORDER BY id LIMIT 1", (self.cursor,)
            ).fetchone()
            if row is None:
                return False
            self.cursor = row[0]
            batch = self.batches.get(row[1])
            if batch is not None and batch.id == row[0]:
                self.current = (batch, pickle.loads(row[2]), 0)
                return True

    def claim(self, worker: str, task_ids) -> int:
        """A worker that reconnects still holds these: lease them to it again (unless
        they have a result, another worker holds them, or this ledger never issued them)."""
        with self.lock:
            claimed = []
            for task_id in task_ids:
                batch, job = self._locate(task_id)
                if job is not None and self._pending(task_id, batch, job, set()):
                    self.leases[task_id] = worker
                    claimed.append(task_id)
            self.held[worker].update(claimed)
        return len(claimed)

    def _drop_lease(self, task_id: int) -> str | None:
        worker = self.leases.pop(task_id, None)
        if worker is not None:
            self.held[worker].discard(task_id)
        return worker

    def release(self, worker: str, task_ids) -> int:
        """Hand tasks back unrun: pending again at the front, no attempt counted."""
        with self.lock:
            mine = [t for t in task_ids if self.leases.get(t) == worker]
            for task_id in mine:
                self._drop_lease(task_id)
            self.retry.extendleft(reversed(mine))
        return len(mine)

    def record(self, worker: str, host: str, outcomes: list[tuple], now: float) -> int:
        """Store outcomes (task_id, ok, value_blob, error, duration) from a worker.

        A success is stored unless the task already has its result (first one wins,
        even from a worker whose lease has gone). A failure counts only while that
        worker holds the lease: with attempts left the task is pending again, else its
        failure is the result. Returns how many results were stored."""
        with self.transaction() as db:
            rows = collections.defaultdict(list)  # job id -> result rows
            for task_id, ok, value, error, duration in outcomes:
                batch, job = self._locate(task_id)
                if job is None:
                    continue
                index = batch.index(task_id)
                if job.has(index):
                    self._drop_lease(task_id)
                    continue
                if ok:
                    self._drop_lease(task_id)
                    job.mark(index)
                    rows[batch.job_id].append(
                        (task_id, index, True, value, None, self.failures.get(task_id, 0) + 1, duration))
                elif self.leases.get(task_id) == worker:
                    row = self._failed_attempt(db, task_id, index, job, error, duration)
                    if row:
                        rows[batch.job_id].append(row)
            stored = self._store(db, rows, host, worker, now)
            succeeded = sum(1 for job_rows in rows.values() for row in job_rows if row[2])
            db.execute("UPDATE workers SET done = done + ? WHERE id = ?", (succeeded, worker))
        return stored

    def _failed_attempt(self, db, task_id: int, index: int, job: _Job, error, duration):
        """Count a failed attempt (durably); retry, or return the failure as the task's
        result row."""
        self._drop_lease(task_id)
        attempts = self.failures.get(task_id, 0) + 1
        self.failures[task_id] = attempts
        db.execute("INSERT OR REPLACE INTO attempts VALUES (?, ?, ?)", (task_id, attempts, error))
        if attempts < job.max_attempts:
            self.retry.append(task_id)
            return None
        job.mark(index)
        return (task_id, index, False, None, error, attempts, duration)

    def _store(self, db, rows: dict, host, worker, now: float) -> int:
        """One results row per job; counters; finished jobs leave memory. Returns how many."""
        stored = 0
        for job_id, job_rows in rows.items():
            self.seq += 1
            db.execute(
                "INSERT INTO results(seq, job_id, host, worker, finished, rows) VALUES (?, ?, ?, ?, ?, ?)",
                (self.seq, job_id, host, worker, now, pickle.dumps(job_rows)),
            )
            failed = sum(1 for row in job_rows if not row[2])
            db.execute("UPDATE jobs SET done = done + ?, failed = failed + ? WHERE id = ?",
                       (len(job_rows) - failed, failed, job_id))
            for row in job_rows:
                self.failures.pop(row[0], None)
            stored += len(job_rows)
            if self.jobs[job_id].finished:
                self._forget_job(job_id)
        self.outstanding -= stored
        return stored

    def lose_worker(self, worker: str, now: float) -> int:
        """The worker stopped answering: each task it held counts a failed attempt.
        Returns how many tasks it held."""
        with self.transaction() as db:
            held = sorted(self.held.pop(worker, ()))
            rows = collections.defaultdict(list)
            for task_id in held:
                batch, job = self._locate(task_id)
                if job is None:
                    self._drop_lease(task_id)
                    continue
                index = batch.index(task_id)
                row = self._failed_attempt(db, task_id, index, job,
                                           f"worker {worker} was lost while holding this task", None)
                if row:
                    rows[batch.job_id].append(row)
            self._store(db, rows, None, worker, now)
            self.held.pop(worker, None)
        return len(held)

    def failed_attempts(self, task_id: int) -> tuple:
        """(failed attempts so far, the last error) of a task without its result yet."""
        with self.lock:
            row = self.db.execute("SELECT count, last_error FROM attempts WHERE task_id = ?", (task_id,)).fetchone()
        return tuple(row) if row else (0, None)

    # -- reading ---------------------------------------------------------------------

    def job(self, job_id: int) -> dict | None:
        with self.read_lock:
            row = self.reader.execute(
                "SELECT id, task, total, sealed, timeout, max_attempts, created, done, failed FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        keys = ("id", "task", "total", "sealed", "timeout", "max_attempts", "created", "done", "failed")
        job = dict(zip(keys, row))
        job["sealed"] = bool(job["sealed"])
        job["finished"] = job["sealed"] and job["done"] + job["failed"] == job["total"]
        return job

    def results(self, job_id: int, after_seq: int, limit: int) -> list[tuple]:
        """(seq, index, ok, value_blob, error, host, attempts, duration), in completion
        order: the results rows after `after_seq`, whole rows, about `limit` of them."""
        out = []
        with self.read_lock:
            cursor = self.reader.execute(
                "SELECT seq, host, rows FROM results WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after_seq)
            )
            for seq, host, blob in cursor:
                out += [(seq, index, ok, value, error, host, attempts, duration)
                        for _task, index, ok, value, error, attempts, duration in pickle.loads(blob)]
                if len(out) >= limit:
                    break
            cursor.close()
        return out

    def counts(self) -> dict:
        with self.lock:
            done, failed, jobs = self.db.execute(
                "SELECT coalesce(sum(done), 0), coalesce(sum(failed), 0), count(*) FROM jobs"
            ).fetchone()
            return {"queued": self.queued, "leased": len(self.leases), "done": done, "failed": failed, "jobs": jobs}

    # -- workers ---------------------------------------------------------------------

    def upsert_worker(self, worker: str, host: str, pid: int, concurrency: int, now: float) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO workers(id, host, pid, concurrency, started, last_seen, state)"
                " VALUES (?, ?, ?, ?, ?, ?, 'alive') ON CONFLICT(id) DO UPDATE SET"
                " host = excluded.host, pid = excluded.pid, concurrency = excluded.concurrency,"
                " last_seen = excluded.last_seen, state = 'alive'",
                (worker, host, pid, concurrency, now, now),
            )

    def set_worker_state(self, worker: str, state: str, now: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE workers SET state = ?, last_seen = ? WHERE id = ?", (state, now, worker))

    def workers(self, state: str | None = None) -> list[dict]:
        with self.lock:
            rows = self.db.execute(
                "SELECT id, host, pid, concurrency, started, last_seen, done, state FROM workers"
                " WHERE ?1 IS NULL OR state = ?1 ORDER BY host, started",
                (state,),
            ).fetchall()
        keys = ("id", "host", "pid", "concurrency", "started", "last_seen", "done", "state")
        return [dict(zip(keys, row)) for row in rows]


def _split(blobs: list[bytes]):
    """(offset, part): consecutive parts of at most BATCH_TASKS tasks and about BATCH_BYTES."""
    start, size = 0, 0
    for i, blob in enumerate(blobs):
        if i > start and (i - start >= BATCH_TASKS or size + len(blob) > BATCH_BYTES):
            yield start, blobs[start:i]
            start, size = i, 0
        size += len(blob)
    if start < len(blobs):
        yield start, blobs[start:]


class _Stopped:
    """Stands in for the closed database."""

    def __getattr__(self, name):
        raise ConnectionAbortedError("the master is stopping")


class _Transaction:
    """`with ledger.transaction() as db:` one locked transaction, committed or rolled back."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def __enter__(self):
        self.ledger.lock.acquire()
        try:
            self.ledger.db.execute("BEGIN IMMEDIATE")
        except BaseException:  # __exit__ will not run: don't leave the lock held
            self.ledger.lock.release()
            raise
        return self.ledger.db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.ledger.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.ledger.lock.release()
        return False
