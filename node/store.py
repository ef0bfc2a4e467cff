"""The master's durable state: jobs, tasks, results and workers in SQLite.

The contract: what a write call returns is committed; what it raises (StorageError)
changed nothing. Durability (`--durability`):

- `full` (the default): WAL with synchronous=FULL. Every acknowledged submit and stored
  result survives a power cut: the commit is fsynced before the call returns.
- `fast`: WAL with synchronous=NORMAL. A committed call survives the process dying
  (`kill -9`); a power cut may lose the last commits, never consistency.

Ids (jobs, tasks, result sequence numbers) are never reused, not even after a power
cut loses the WAL's tail in `fast` mode: they are handed out from blocks whose upper
bound is committed and fsynced before the first id of the block is used.

Rows are batches, not tasks: a chunk's tasks are stored as batches of up to BATCH_TASKS
tasks, and the outcomes of one report as one results row per job, since SQLite's cost
is per row. Task ids are consecutive within a batch (`first_task .. first_task+count-1`).

This module knows nothing of leases or queues (see scheduler.py): it stores what it
is given and reads back what was stored.
"""

from __future__ import annotations

import os
import pickle
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from node.config import ConfigError
from node.errors import StorageError
from node.metrics import WRITE_BUCKETS, Histogram

BATCH_TASKS = 1024  # tasks in one stored batch at most
BATCH_BYTES = 1024 * 1024  # and about this many bytes of arguments (a larger task is a batch alone)
RESULTS_BYTES = 8 * 1024 * 1024  # one page of results carries about this many bytes at most
ID_BLOCKS = {"job": 1000, "task": 1 << 20, "seq": 10000}  # ids reserved durably at a time
DURABILITY = {"full": "FULL", "fast": "NORMAL"}
FIRST_JOB = 10**9  # a new ledger's first job id lies between this and 9 times it

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
CREATE TABLE IF NOT EXISTS attempts(  -- failed attempts of tasks still without a result
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

JOB_FIELDS = ("id", "task", "total", "sealed", "timeout", "max_attempts", "created", "done", "failed", "finished")
WORKER_FIELDS = ("id", "host", "pid", "concurrency", "started", "last_seen", "done", "state")


@dataclass
class Batch:
    """Where a stored batch sits: its tasks' ids and their indexes in the job."""

    id: int
    job_id: int
    first_index: int
    first_task: int
    count: int

    def index(self, task_id: int) -> int:
        """The task's index in its job."""
        return self.first_index + task_id - self.first_task


@dataclass
class JobRow:
    """A job as the scheduler needs it."""

    id: int
    task: str
    timeout: float
    max_attempts: int
    total: int
    sealed: bool


class Store:
    def __init__(self, state_dir: str | Path, durability: str = "full"):
        if durability not in DURABILITY:
            raise ConfigError(f"durability must be one of {', '.join(DURABILITY)}, not {durability!r}")
        folder = Path(state_dir)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"state dir {folder} is not a directory")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / "ledger.sqlite3"
            self.db = self._open()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot use state dir {folder}: {getattr(exc, 'strerror', None) or exc}") from None
        self.durability = durability
        self.sync = DURABILITY[durability]
        self.db.execute(f"PRAGMA synchronous={self.sync}")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        if "finished" not in columns:  # a ledger written by 0.1: its finished jobs date from their creation
            self.db.execute("ALTER TABLE jobs ADD COLUMN finished REAL")
            self.db.execute("UPDATE jobs SET finished = created WHERE sealed = 1 AND done + failed = total")
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished) WHERE finished IS NOT NULL")
        # Names this ledger: task ids mean nothing to another one (a fresh state dir).
        if self._meta("instance") is None:
            # A new ledger's job ids start at a random 10-digit number, so a job id from a
            # lost ledger (a master moved to a fresh state dir) names no job here.
            first = str(FIRST_JOB + secrets.randbelow(FIRST_JOB * 8))
            self.db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("instance", uuid.uuid4().hex), ("reserved_job", first), ("first_job", first)])
        self.instance = self._meta("instance")
        self.first_job = int(self._meta("first_job") or 1)
        self.lock = threading.RLock()  # the writer connection
        # Clients' reads (results, job progress) use their own connection: under WAL
        # they see the last commit and never wait for the writer.
        self.reader = self._open()
        self.read_lock = threading.Lock()
        self.next_id, self.reserved = {}, {}
        for kind, sql in (("job", "SELECT max(id) FROM jobs"),
                          ("task", "SELECT max(first_task + count - 1) FROM batches"),
                          ("seq", "SELECT max(seq) FROM results")):
            highest = self.db.execute(sql).fetchone()[0] or 0
            mark = int(self._meta(f"reserved_{kind}") or 0)
            self.next_id[kind] = self.reserved[kind] = max(highest + 1, mark)
        self.done_total = int(self._meta("done_total") or 0)
        self.failed_total = int(self._meta("failed_total") or 0)
        # Jobs in the ledger, kept up to date in memory: counting rows costs per job kept.
        self.jobs_kept = self.db.execute("SELECT count(*) FROM jobs").fetchone()[0]
        self.write_seconds = Histogram(WRITE_BUCKETS)  # each write transaction's time, lock wait excluded

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA wal_autocheckpoint=10000")  # checkpoint every ~40 MB, not 4
        return db

    def _meta(self, key: str):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        with self.lock, self.read_lock:
            self.db.close()
            self.reader.close()
            self.db = self.reader = _Closed()

    # -- writing ---------------------------------------------------------------------

    def _transaction(self, what: str, needs: dict | None = None):
        return _Transaction(self, what, needs or {})

    def _reserve(self, needs: dict) -> None:
        """Make sure the next ids asked for lie in durably reserved blocks (lock held,
        no transaction open): fsynced before any of them is handed out."""
        short = {k: n for k, n in needs.items() if self.next_id[k] + n > self.reserved[k]}
        if not short:
            return
        self.db.execute("PRAGMA synchronous=FULL")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for kind, n in short.items():
                    mark = self.next_id[kind] + n + ID_BLOCKS[kind]
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"reserved_{kind}", str(mark)))
                self.db.execute("COMMIT")
            except BaseException:
                _rollback(self.db)
                raise
        finally:
            self.db.execute(f"PRAGMA synchronous={self.sync}")
        for kind, n in short.items():
            self.reserved[kind] = self.next_id[kind] + n + ID_BLOCKS[kind]

    def _take(self, kind: str, n: int = 1) -> int:
        """The first of `n` fresh ids (reserved by the transaction's `needs`)."""
        first = self.next_id[kind]
        if first + n > self.reserved[kind]:
            raise RuntimeError(f"{kind} ids used without a reservation")
        self.next_id[kind] = first + n  # a rolled-back call leaves a gap: ids are never reused
        return first

    def store_chunk(self, key: str, task: str, timeout: float, max_attempts: int, first_index: int,
                    blobs: list, seal_total: int | None, now: float) -> tuple:
        """Add one chunk of the job named by `key` (created on first use). Re-sending a
        chunk (same key and first_index) adds nothing. With `seal_total` the job is
        sealed, if and only if it then holds exactly that many tasks.

        Returns (job row, batches added, whether this call sealed it); raises
        LookupError (the job was sealed with other tasks) or StorageError."""
        parts = list(_split(blobs))
        with self._transaction("the job", {"job": 1, "task": len(blobs)}) as db:
            row = db.execute("SELECT id, task, timeout, max_attempts, total, sealed FROM jobs WHERE key = ?",
                             (key,)).fetchone()
            if row is None:
                job_id = self._take("job")
                db.execute("INSERT INTO jobs(id, key, task, timeout, max_attempts, created) VALUES (?, ?, ?, ?, ?, ?)",
                           (job_id, key, task, timeout, max_attempts, now))
                self._after.append(lambda: self._add_jobs(1))
                row = (job_id, task, timeout, max_attempts, 0, 0)
            job = JobRow(row[0], row[1], row[2], row[3], row[4], bool(row[5]))
            added = []
            known = db.execute("SELECT 1 FROM batches WHERE job_id = ? AND first_index = ?",
                               (job.id, first_index)).fetchone()
            if not known and not job.sealed and blobs:
                first_task = self._take("task", len(blobs))
                for offset, part in parts:
                    batch_id = db.execute(
                        "INSERT INTO batches(job_id, first_index, first_task, count, args) VALUES (?, ?, ?, ?, ?)",
                        (job.id, first_index + offset, first_task + offset, len(part), pickle.dumps(part)),
                    ).lastrowid
                    added.append(Batch(batch_id, job.id, first_index + offset, first_task + offset, len(part)))
                job.total += len(blobs)
                db.execute("UPDATE jobs SET total = ? WHERE id = ?", (job.total, job.id))
            sealing = seal_total is not None and not job.sealed
            if sealing:
                end = db.execute("SELECT coalesce(max(first_index + count), 0) FROM batches WHERE job_id = ?",
                                 (job.id,)).fetchone()[0]
                if job.total != seal_total or end != seal_total:
                    raise LookupError(f"job {job.id} is incomplete: the master holds {job.total} of its "
                                      f"{seal_total} tasks (a chunk went missing); submit it again")
                # A job whose tasks all have results (none, or all run while it uploaded) is finished now.
                db.execute("UPDATE jobs SET sealed = 1, finished = CASE WHEN done + failed = total THEN ? END"
                           " WHERE id = ?", (now, job.id))
                job.sealed = True
        return job, added, sealing

    def record(self, rows: dict, attempts: list, finished: list, host, worker, now: float) -> int:
        """Store results and failed attempts of one report in one transaction.

        rows: job id -> [(task_id, index, ok, value_blob, error, attempts, duration)];
        attempts: [(task_id, failed attempts so far, last error)] of tasks to retry;
        finished: ids of jobs these results complete. Returns how many results."""
        stored = sum(len(r) for r in rows.values())
        failed = sum(1 for job_rows in rows.values() for row in job_rows if not row[2])
        with self._transaction("results", {"seq": len(rows)}) as db:
            for job_id, job_rows in rows.items():
                db.execute(
                    "INSERT INTO results(seq, job_id, host, worker, finished, rows) VALUES (?, ?, ?, ?, ?, ?)",
                    (self._take("seq"), job_id, host, worker, now, pickle.dumps(job_rows)),
                )
                bad = sum(1 for row in job_rows if not row[2])
                db.execute("UPDATE jobs SET done = done + ?, failed = failed + ? WHERE id = ?",
                           (len(job_rows) - bad, bad, job_id))
                retried = [(row[0],) for row in job_rows if row[5] > 1]
                if retried:
                    db.executemany("DELETE FROM attempts WHERE task_id = ?", retried)
            if attempts:
                db.executemany("INSERT OR REPLACE INTO attempts VALUES (?, ?, ?)", attempts)
            if finished:
                db.executemany("UPDATE jobs SET finished = ? WHERE id = ?", [(now, j) for j in finished])
            if stored:
                self._bump_totals(db, stored - failed, failed)
            if worker is not None and stored - failed:
                db.execute("UPDATE workers SET done = done + ? WHERE id = ?", (stored - failed, worker))
        return stored

    def _bump_totals(self, db, done: int, failed: int) -> None:
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                       [("done_total", str(self.done_total + done)), ("failed_total", str(self.failed_total + failed))])
        # After COMMIT only (see _Transaction.after): memory follows the database.
        self._after.append(lambda: self._add_totals(done, failed))

    def _add_totals(self, done: int, failed: int) -> None:
        self.done_total += done
        self.failed_total += failed

    def _add_jobs(self, n: int) -> None:
        self.jobs_kept += n

    def withdraw(self, job_id: int) -> None:
        """Delete an unsealed job and all it holds."""
        with self._transaction("the withdrawal") as db:
            for table, column in (("results", "job_id"), ("batches", "job_id"), ("jobs", "id")):
                gone = db.execute(f"DELETE FROM {table} WHERE {column} = ?", (job_id,)).rowcount
            self._after.append(lambda: self._add_jobs(-gone))  # the jobs table's rows, deleted last

    def prune(self, older_than: float, keep: int, limit: int = 500) -> list:
        """Delete up to `limit` finished jobs: those finished before `older_than`, and
        the oldest beyond the newest `keep`. Returns their ids."""
        with self._transaction("the pruning") as db:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM jobs WHERE finished IS NOT NULL AND finished < ? ORDER BY finished LIMIT ?",
                (older_than, limit))]
            excess = db.execute("SELECT count(*) FROM jobs WHERE finished IS NOT NULL").fetchone()[0] - keep
            if excess > len(ids):
                ids = [r[0] for r in db.execute(
                    "SELECT id FROM jobs WHERE finished IS NOT NULL ORDER BY finished LIMIT ?",
                    (min(limit, excess),))]
            for table, column in (("results", "job_id"), ("batches", "job_id"), ("jobs", "id")):
                gone = db.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(j,) for j in ids]).rowcount
            self._after.append(lambda: self._add_jobs(-gone))  # the jobs table's rows, deleted last
        return ids

    def upsert_worker(self, worker: str, host: str, pid: int, concurrency: int, now: float) -> None:
        with self._transaction("the worker") as db:
            db.execute(
                "INSERT INTO workers(id, host, pid, concurrency, started, last_seen, state)"
                " VALUES (?, ?, ?, ?, ?, ?, 'alive') ON CONFLICT(id) DO UPDATE SET"
                " host = excluded.host, pid = excluded.pid, concurrency = excluded.concurrency,"
                " last_seen = excluded.last_seen, state = 'alive'",
                (worker, host, pid, concurrency, now, now),
            )

    def set_worker_state(self, worker: str, state: str, now: float) -> None:
        with self._transaction("the worker") as db:
            db.execute("UPDATE workers SET state = ?, last_seen = ? WHERE id = ?", (state, now, worker))

    def forget_workers(self, before: float) -> int:
        """Drop workers that left or were lost before `before`: status stays small."""
        with self._transaction("the workers") as db:
            return db.execute("DELETE FROM workers WHERE state != 'alive' AND last_seen < ?", (before,)).rowcount

    # -- reading (the scheduler's, under its own lock) --------------------------------

    def unfinished(self) -> tuple:
        """Everything the scheduler rebuilds at start: (jobs, batches, {job id: result
        indexes}, {task id: failed attempts})."""
        with self.lock:
            jobs = [JobRow(*row[:5], bool(row[5])) for row in self.db.execute(
                "SELECT id, task, timeout, max_attempts, total, sealed FROM jobs WHERE finished IS NULL"
                " AND (sealed = 0 OR done + failed < total)")]
            ids = {job.id for job in jobs}
            done = {job_id: [] for job_id in ids}
            for job_id in ids:
                for (blob,) in self.db.execute("SELECT rows FROM results WHERE job_id = ?", (job_id,)):
                    done[job_id].extend(row[1] for row in pickle.loads(blob))
            batches = [Batch(*row) for row in self.db.execute(
                "SELECT id, job_id, first_index, first_task, count FROM batches ORDER BY first_task") if row[1] in ids]
            failures = dict(self.db.execute("SELECT task_id, count FROM attempts"))
        return jobs, batches, done, failures

    def next_batch(self, after_id: int):
        """(batch id, first task id, its tasks' pickled arguments) of the first batch
        stored after batch `after_id`, or None."""
        with self.lock:
            row = self.db.execute("SELECT id, first_task, args FROM batches WHERE id > ? ORDER BY id LIMIT 1",
                                  (after_id,)).fetchone()
        return (row[0], row[1], pickle.loads(row[2])) if row else None

    def batch_args(self, batch_id: int) -> list:
        """The pickled arguments of a batch's tasks."""
        with self.lock:
            row = self.db.execute("SELECT args FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise LookupError(f"no batch {batch_id}")
        return pickle.loads(row[0])

    def workers(self, state: str | None = None) -> list:
        with self.read_lock:
            rows = self.reader.execute(
                f"SELECT {', '.join(WORKER_FIELDS)} FROM workers WHERE ?1 IS NULL OR state = ?1 ORDER BY host, started",
                (state,)).fetchall()
        return [dict(zip(WORKER_FIELDS, row)) for row in rows]

    # -- reading (clients') ------------------------------------------------------------

    def job(self, job_id: int) -> dict | None:
        with self.read_lock:
            row = self.reader.execute(f"SELECT {', '.join(JOB_FIELDS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = dict(zip(JOB_FIELDS, row))
        job["sealed"] = bool(job["sealed"])
        job["finished"] = job["sealed"] and job["done"] + job["failed"] == job["total"]
        return job

    def results(self, job_id: int, after_seq: int, limit: int, max_bytes: int = RESULTS_BYTES) -> list:
        """(seq, index, ok, value_blob, error, host, attempts, duration) in completion
        order after `after_seq`: whole stored rows, about `limit` results or
        `max_bytes` of values at most (always at least one row)."""
        out, size = [], 0
        with self.read_lock:
            cursor = self.reader.execute(
                "SELECT seq, host, rows FROM results WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after_seq))
            for seq, host, blob in cursor:
                if out and (len(out) >= limit or size + len(blob) > max_bytes):
                    break
                size += len(blob)
                out += [(seq, index, ok, value, error, host, attempts, duration)
                        for _task, index, ok, value, error, attempts, duration in pickle.loads(blob)]
            cursor.close()
        return out

    def failed_attempts(self, task_id: int) -> tuple:
        """(failed attempts so far, the last error) of a task without its result yet."""
        with self.read_lock:
            row = self.reader.execute("SELECT count, last_error FROM attempts WHERE task_id = ?",
                                      (task_id,)).fetchone()
        return tuple(row) if row else (0, None)

    def job_id(self, key: str) -> int | None:
        with self.read_lock:
            row = self.reader.execute("SELECT id FROM jobs WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def job_count(self) -> int:
        if isinstance(self.reader, _Closed):  # like every read: a call cut short by the master stopping
            raise ConnectionAbortedError("the ledger is closed: the master is stopping")
        return self.jobs_kept

    def highest_job(self) -> int:
        return self.next_id["job"] - 1

    def jobs_overview(self, ids, finished: int = 0) -> list[dict]:
        """For the dashboard: the jobs with these ids, then the `finished` most recently
        finished ones: {id, task, total, done, failed, sealed, created, finished (time or None)}."""
        ids = [int(i) for i in ids]
        fields = "id, task, total, done, failed, sealed, created, finished"
        with self.read_lock:
            rows = self.reader.execute(f"SELECT {fields} FROM jobs WHERE id IN ({', '.join('?' * len(ids))})"
                                       " ORDER BY id", ids).fetchall() if ids else []
            if finished:
                rows += self.reader.execute(f"SELECT {fields} FROM jobs WHERE finished IS NOT NULL"
                                            " ORDER BY finished DESC LIMIT ?", (finished,)).fetchall()
        return [dict(zip(("id", "task", "total", "done", "failed", "sealed", "created", "finished"), row))
                for row in rows]

    def size(self) -> int:
        """Bytes on disk: the ledger and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                pass
        return total


def _split(blobs: list):
    """(offset, part): consecutive parts of at most BATCH_TASKS tasks and about BATCH_BYTES."""
    start, size = 0, 0
    for i, blob in enumerate(blobs):
        if i > start and (i - start >= BATCH_TASKS or size + len(blob) > BATCH_BYTES):
            yield start, blobs[start:i]
            start, size = i, 0
        size += len(blob)
    if start < len(blobs):
        yield start, blobs[start:]


def _rollback(db) -> None:
    """Roll back, keeping the error that caused it: after a full disk or an I/O error
    SQLite may have rolled back by itself, and ROLLBACK then fails with its own error."""
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


class _Closed:
    """Stands in for the closed database. ConnectionAbortedError: the server sends no
    reply to a call cut short this way, and the peer retries."""

    def __getattr__(self, name):
        raise ConnectionAbortedError("the ledger is closed: the master is stopping")


class _Transaction:
    """`with store._transaction(what, needs) as db:` one locked transaction. Ids in
    `needs` are reserved first; work queued on `store._after` runs only after COMMIT;
    any failure rolls back and is raised as StorageError (or as the LookupError or
    ValueError the body raised)."""

    def __init__(self, store: Store, what: str, needs: dict):
        self.store, self.what, self.needs = store, what, needs

    def __enter__(self):
        store = self.store
        store.lock.acquire()
        self.started = time.perf_counter()
        try:
            store._reserve(self.needs)
            store.db.execute("BEGIN IMMEDIATE")
        except BaseException as exc:  # __exit__ will not run: don't leave the lock held
            store.lock.release()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"the master could not store {self.what}: {exc}") from None
            raise
        store._after = []
        return store.db

    def __exit__(self, exc_type, exc, tb):
        store = self.store
        try:
            if exc_type is None:
                try:
                    store.db.execute("COMMIT")
                except sqlite3.Error as error:
                    exc_type, exc = type(error), error
            if exc_type is not None:
                _rollback(store.db)
                if issubclass(exc_type, sqlite3.Error):
                    raise StorageError(f"the master could not store {self.what}: {exc}") from None
                return False
            for work in store._after:
                work()
        finally:
            store._after = []
            store.write_seconds.observe(time.perf_counter() - self.started)
            store.lock.release()
        return False
