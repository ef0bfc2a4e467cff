"""The master's state: jobs, tasks and results durable in SQLite; leases in memory.

What must survive `kill -9` is on disk before the call that made it returns: every
accepted task, every stored result, every counted failed attempt. WAL with
synchronous=NORMAL: a committed call survives the process dying (the WAL is in the
OS's hands); a power cut may lose the last moments, never consistency.

Leases live in memory only, bounded by what workers hold. After a restart every task
without a result is pending again; workers re-claim what they still hold when they
say hello (see FleetService), and a task that does run twice still gets exactly one
result: `results` is keyed by task id and the first result wins.

Pending tasks are found by a cursor over task ids (new tasks always get higher ids)
plus a small in-memory queue of tasks handed back or due for a retry, so a million
queued tasks cost disk, not RAM, and leasing needs no write at all.
"""

from __future__ import annotations

import collections
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs(
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE,
    task TEXT NOT NULL,
    timeout REAL NOT NULL,
    max_attempts INTEGER NOT NULL,
    first_task INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    sealed INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks(  -- which parts of a job arrived: a re-sent chunk adds nothing
    job_id INTEGER NOT NULL,
    first_index INTEGER NOT NULL,
    PRIMARY KEY(job_id, first_index)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks(
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    args BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,  -- failed attempts so far
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS results(
    task_id INTEGER PRIMARY KEY,  -- one result per task: the first one wins
    seq INTEGER NOT NULL,  -- completion order, for streaming a job's results
    job_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    value BLOB,
    error TEXT,
    host TEXT,
    worker TEXT,
    attempts INTEGER NOT NULL,
    duration REAL,
    finished REAL NOT NULL
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

_LEASE_SQL = (
    "SELECT t.id, j.task, t.args, j.timeout FROM tasks t JOIN jobs j ON j.id = t.job_id"
    " WHERE {where} AND NOT EXISTS (SELECT 1 FROM results r WHERE r.task_id = t.id)"
)


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
        self.db.execute("CREATE TEMP TABLE incoming(n INTEGER PRIMARY KEY, task_id INTEGER, value BLOB, duration REAL)")
        self.lock = threading.RLock()
        # Clients' reads (results, job progress) go through their own connection: under
        # WAL they see the last commit and never wait for the writer's lock.
        self.reader = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.read_lock = threading.Lock()
        self.leases: dict[int, str] = {}  # task id -> worker
        self.held: dict[str, set] = collections.defaultdict(set)  # worker -> task ids
        self.retry: collections.deque = collections.deque()  # task ids to lease before the cursor's
        first = self.db.execute("SELECT min(first_task) FROM jobs WHERE sealed = 0 OR done + failed < total")
        self.cursor = (first.fetchone()[0] or self._scalar("SELECT coalesce(max(id), 0) + 1 FROM tasks")) - 1
        self.seq = self._scalar("SELECT coalesce(max(seq), 0) FROM results")
        self.outstanding = self._scalar("SELECT count(*) FROM tasks") - self._scalar("SELECT count(*) FROM results")

    def close(self) -> None:
        with self.lock, self.read_lock:
            self.db.close()
            self.reader.close()
            self.reader = _Stopped()
            # Server threads may still be in a call while the master stops: they get an
            # OSError, which clients and workers treat as "master away, retry", instead of
            # sqlite3.ProgrammingError, which they would not retry.
            self.db = _Stopped()

    def _scalar(self, sql: str, *params):
        return self.db.execute(sql, params).fetchone()[0]

    def transaction(self):
        return _Transaction(self)

    @property
    def queued(self) -> int:
        return self.outstanding - len(self.leases)

    # -- jobs and tasks -------------------------------------------------------------

    def add_tasks(self, key: str, task: str, timeout: float, max_attempts: int, first_index: int,
                  blobs: list[bytes], final: bool) -> int:
        """Append tasks to the job named by `key` (created on first use). Re-sending a
        chunk (same key and first_index) after a lost reply adds nothing twice."""
        with self.transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE key = ?", (key,)).fetchone()
            if row:
                job_id = row[0]
            else:
                job_id = db.execute(
                    "INSERT INTO jobs(key, task, timeout, max_attempts, created) VALUES (?, ?, ?, ?, ?)",
                    (key, task, timeout, max_attempts, time.time()),
                ).lastrowid
            if db.execute("INSERT OR IGNORE INTO chunks VALUES (?, ?)", (job_id, first_index)).rowcount:
                cur = db.executemany(
                    "INSERT INTO tasks(job_id, idx, args) VALUES (?, ?, ?)",
                    ((job_id, first_index + i, blob) for i, blob in enumerate(blobs)),
                )
                last = db.execute("SELECT last_insert_rowid()").fetchone()[0]
                db.execute(
                    "UPDATE jobs SET total = total + ?, first_task = coalesce(first_task, ?) WHERE id = ?",
                    (len(blobs), last - len(blobs) + 1, job_id),
                )
                self.outstanding += cur.rowcount
            if final:
                db.execute("UPDATE jobs SET sealed = 1 WHERE id = ?", (job_id,))
        return job_id

    def lease(self, worker: str, limit: int) -> list[tuple]:
        """Up to `limit` pending tasks, retries first, then oldest first:
        (task_id, task, args_blob, timeout)."""
        with self.lock:
            rows, taken = [], set()  # a handed-back task may be queued twice, or also lie ahead of the cursor
            while self.retry and len(rows) < limit:
                task_id = self.retry.popleft()
                if task_id not in self.leases and task_id not in taken:
                    rows += self.db.execute(_LEASE_SQL.format(where="t.id = ?"), (task_id,)).fetchall()
                    taken.add(task_id)
            if len(rows) < limit:
                fresh = self.db.execute(
                    _LEASE_SQL.format(where="t.id > ?") + " ORDER BY t.id LIMIT ?", (self.cursor, limit - len(rows))
                ).fetchall()
                if fresh:
                    self.cursor = fresh[-1][0]
                rows += [row for row in fresh if row[0] not in self.leases and row[0] not in taken]
            for row in rows:
                self.leases[row[0]] = worker
            self.held[worker].update(row[0] for row in rows)
        return rows

    def claim(self, worker: str, task_ids) -> int:
        """A worker that reconnects still holds these: lease them to it again
        (unless they have a result or another worker holds them)."""
        with self.lock:
            # Only tasks this ledger issued: a master restarted on another (or a wiped) state
            # dir must not lease out ids it never had, nor count them as leased.
            pending = self._pending(task_ids)
            claimed = [t for t in task_ids if t in pending and t not in self.leases]
            for task_id in claimed:
                self.leases[task_id] = worker
            self.held[worker].update(claimed)
        return len(claimed)

    def _pending(self, task_ids) -> set:
        """Those of `task_ids` that are tasks of this ledger without a result."""
        return {row[0] for row in self.db.execute(
            f"SELECT id FROM tasks t WHERE id IN ({','.join('?' * len(task_ids))})"
            " AND NOT EXISTS (SELECT 1 FROM results r WHERE r.task_id = t.id)", list(task_ids)
        )} if task_ids else set()

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
            first_seq = self.seq
            # Set-based: stage the successes, then one statement (per-row SQL is ~5x slower).
            db.executemany(
                "INSERT INTO incoming(task_id, value, duration) VALUES (?, ?, ?)",
                ((task_id, value, duration) for task_id, ok, value, _error, duration in outcomes if ok),
            )
            db.execute(
                "INSERT OR IGNORE INTO results(task_id, seq, job_id, idx, ok, value, host, worker, attempts,"
                " duration, finished) SELECT t.id, ? + i.n, t.job_id, t.idx, 1, i.value, ?, ?, t.attempts + 1,"
                " i.duration, ? FROM incoming i JOIN tasks t ON t.id = i.task_id",
                (first_seq, host, worker, now),
            )
            self.seq += len(outcomes)
            tally = collections.Counter(dict(db.execute(  # DISTINCT: a task may come twice in one batch
                "SELECT r.job_id, count(DISTINCT r.task_id) FROM incoming i JOIN results r ON r.task_id = i.task_id"
                " WHERE r.seq > ? GROUP BY r.job_id", (first_seq,)
            )))
            db.execute("DELETE FROM incoming")
            failed = collections.Counter()
            for task_id, ok, _value, error, duration in outcomes:
                if ok:
                    self._drop_lease(task_id)
                elif self.leases.get(task_id) == worker:
                    failed.update(self._failed_attempt(db, task_id, error, worker, host, duration, now))
            stored = self._tally(db, tally, failed)
            db.execute("UPDATE workers SET done = done + ? WHERE id = ?", (sum(tally.values()), worker))
        return stored

    def _failed_attempt(self, db, task_id, error, worker, host, duration, now) -> list:
        """Count a failed attempt (durably); retry, or record the failure as the task's
        result. Returns [job_id] if a result was recorded, else []."""
        self._drop_lease(task_id)
        db.execute("UPDATE tasks SET attempts = attempts + 1, last_error = ? WHERE id = ?", (error, task_id))
        attempts, max_attempts, job_id = db.execute(
            "SELECT t.attempts, j.max_attempts, j.id FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.id = ?",
            (task_id,),
        ).fetchone()
        if attempts < max_attempts:
            self.retry.append(task_id)
            return []
        self.seq += 1
        stored = db.execute(
            "INSERT OR IGNORE INTO results(task_id, seq, job_id, idx, ok, error, host, worker, attempts, duration,"
            " finished) SELECT id, ?, job_id, idx, 0, ?, ?, ?, ?, ?, ? FROM tasks WHERE id = ?",
            (self.seq, error, host, worker, attempts, duration, now, task_id),
        ).rowcount
        return [job_id] * stored

    def lose_worker(self, worker: str, now: float) -> int:
        """The worker stopped answering: each task it held counts a failed attempt.
        Returns how many tasks it held."""
        with self.transaction() as db:
            held = sorted(self.held.pop(worker, ()))
            failed = collections.Counter()
            for task_id in held:
                failed.update(self._failed_attempt(
                    db, task_id, f"worker {worker} was lost while holding this task", worker, None, None, now
                ))
            self._tally(db, collections.Counter(), failed)
            self.held.pop(worker, None)
        return len(held)

    def _tally(self, db, done: collections.Counter, failed: collections.Counter) -> int:
        """Add newly stored results to their jobs' counters; returns how many."""
        for job_id in set(done) | set(failed):
            db.execute("UPDATE jobs SET done = done + ?, failed = failed + ? WHERE id = ?",
                       (done[job_id], failed[job_id], job_id))
        stored = sum(done.values()) + sum(failed.values())
        self.outstanding -= stored
        return stored

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
        """(seq, index, ok, value_blob, error, host, attempts, duration), in completion order."""
        with self.read_lock:
            return self.reader.execute(
                "SELECT seq, idx, ok, value, error, host, attempts, duration FROM results"
                " WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after_seq, limit),
            ).fetchall()

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
