"""The master's scheduling state, in memory: the queue, leases, retries, workers' TTLs.

The rule between this module and the store: **memory follows the database**. Every
call that changes what is durable first works out its effect as a `_Plan` without
touching memory, has the store commit it, and only then applies it. A store failure
(disk full, a row too large, the master stopping) raises and leaves memory as it was:
no task is ever marked done without its stored result.

Kept in memory for unfinished jobs only: which of their tasks have a result (a bitmap
per job: the first result wins), the batches' place in the id space, leases, failed
attempt counts. A million queued tasks cost disk and a 125 KB bitmap, not RAM.

Leases are memory only, bounded by what workers hold. After a restart every task
without a result is pending again; workers re-claim what they still hold when they say
hello, and nothing is leased until they have (or a TTL has passed). A task that does
run twice still gets exactly one result.
"""

from __future__ import annotations

import bisect
import collections
import math
import threading
import time
from dataclasses import dataclass, field

from node.store import Batch, JobRow, Store


class _Job:
    """What leasing and recording need of an unfinished job."""

    __slots__ = ("task", "timeout", "max_attempts", "total", "sealed", "settled", "done", "batches", "touched")

    def __init__(self, row: JobRow):
        self.task, self.timeout, self.max_attempts = row.task, row.timeout, row.max_attempts
        self.total, self.sealed, self.settled = row.total, row.sealed, 0
        self.done = bytearray((row.total + 7) // 8)  # bit i: task index i has its result
        self.batches: list[int] = []  # first_task of each of its batches
        self.touched = time.monotonic()  # last chunk received (unsealed jobs expire)

    def has(self, index: int) -> bool:
        return index < len(self.done) * 8 and bool(self.done[index >> 3] >> (index & 7) & 1)

    def mark(self, index: int) -> None:
        if index >= len(self.done) * 8:
            self.done.extend(bytes(index // 8 + 1 - len(self.done)))
        self.done[index >> 3] |= 1 << (index & 7)
        self.settled += 1

    @property
    def finished(self) -> bool:
        return self.sealed and self.settled >= self.total


@dataclass
class _Plan:
    """The effect of one report (or of losing a worker), worked out before the store
    commits it; applied to memory only afterwards."""

    rows: dict = field(default_factory=lambda: collections.defaultdict(list))  # job id -> result rows
    attempts: list = field(default_factory=list)  # (task id, failed attempts, error): to retry
    marks: list = field(default_factory=list)  # (job id, index): tasks that get their result
    drops: list = field(default_factory=list)  # task ids whose lease ends
    settled: collections.Counter = field(default_factory=collections.Counter)  # job id -> results added
    seen: set = field(default_factory=set)  # task ids decided in this plan (first outcome wins)
    failed: list = field(default_factory=list)  # (job id, index, attempts, max attempts, error): failed attempts
    finished: list = field(default_factory=list)  # job ids this plan finished (set once committed)


class Scheduler:
    def __init__(self, store: Store, worker_ttl: float = 10.0):
        self.store = store
        self.worker_ttl = worker_ttl
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # new tasks, results or workers
        self.jobs: dict[int, _Job] = {}  # unfinished jobs
        self.starts: list[int] = []  # first_task of every batch of an unfinished job, sorted
        self.batches: dict[int, Batch] = {}  # first_task -> batch
        self.leases: dict[int, str] = {}  # task id -> worker
        self.held: dict[str, set] = collections.defaultdict(set)  # worker -> task ids
        self.retry: collections.deque = collections.deque()  # task ids to lease before the cursor's
        self.failures: dict[int, int] = {}  # task id -> failed attempts (tasks with any)
        self.cursor = 0  # id of the last batch the lease cursor entered
        self.current: tuple | None = None  # (batch, its args blobs, next offset)
        self.loaded: tuple | None = None  # (batch id, args blobs) last read for a retry
        self.outstanding = 0  # tasks of unfinished jobs without a result
        self.seen: dict[str, float] = {}  # live worker -> monotonic time last heard from
        self.halted = False  # the master is stopping: long polls return
        self.changes = 0  # counts notifications of `changed`: a waiter sees one it was not yet waiting for
        self.retried = 0  # failed attempts queued again, ever (a counter for metrics)
        # Told f(host, failed, finished) (see _Plan) after a report is stored, lock released.
        self.on_report = None
        self._load()
        # Workers alive when the master last stopped: until they are back (or a TTL has
        # passed) nothing is leased, so tasks they still run are not handed out twice.
        self.expected = {w["id"] for w in store.workers("alive")}
        self.reclaim_until = time.monotonic() + worker_ttl

    def _load(self) -> None:
        jobs, batches, done, failures = self.store.unfinished()
        for row in jobs:
            job = self.jobs[row.id] = _Job(row)
            for index in done[row.id]:
                if not job.has(index):
                    job.mark(index)
        for batch in batches:
            self._remember(batch)
        first = min((b.id for b in self.batches.values()), default=None)
        self.cursor = first - 1 if first is not None else 0
        self.failures = failures
        self.outstanding = sum(job.total - job.settled for job in self.jobs.values())

    def _remember(self, batch: Batch) -> None:
        bisect.insort(self.starts, batch.first_task)
        self.batches[batch.first_task] = batch
        self.jobs[batch.job_id].batches.append(batch.first_task)

    def _forget(self, job_id: int) -> None:
        """A finished (or withdrawn) job leaves memory; late outcomes of its tasks find nothing."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        for start in job.batches:
            self.batches.pop(start, None)
            i = bisect.bisect_left(self.starts, start)
            if i < len(self.starts) and self.starts[i] == start:
                del self.starts[i]

    def _locate(self, task_id: int):
        """(batch, job) of a task of an unfinished job, or (None, None)."""
        i = bisect.bisect_right(self.starts, task_id) - 1
        if i < 0:
            return None, None
        batch = self.batches[self.starts[i]]
        if task_id >= batch.first_task + batch.count:
            return None, None
        return batch, self.jobs.get(batch.job_id)

    @property
    def queued(self) -> int:
        return self.outstanding - len(self.leases)

    def _notify(self) -> None:
        self.changes += 1
        self.changed.notify_all()

    # -- jobs ------------------------------------------------------------------------

    def submit(self, key: str, task: str, timeout: float, max_attempts: int, first_index: int, blobs: list,
               seal_total: int | None) -> int:
        """Store a chunk (see Store.store_chunk), then queue what it added. Returns the job id."""
        finished = []
        with self.lock:
            row, added, sealed = self.store.store_chunk(key, task, timeout, max_attempts, first_index, blobs,
                                                        seal_total, time.time())
            job = self.jobs.get(row.id)
            if job is None and (added or not row.sealed):
                job = self.jobs[row.id] = _Job(row)
            if job is not None:
                for batch in added:
                    self._remember(batch)
                count = sum(b.count for b in added)
                job.total = row.total  # the stored total, this chunk included (a new job's row counts it)
                self.outstanding += count
                job.sealed = row.sealed
                job.touched = time.monotonic()
                if job.finished:  # an empty job, or one whose tasks all ran before it was sealed
                    self._forget(row.id)
                    finished = [row.id]
            self._notify()
        if self.on_report is not None and finished:
            self.on_report(None, [], finished)
        return row.id

    def withdraw(self, job_id: int) -> int:
        """Delete an unsealed job (a refused chunk, or abandoned by its client). Returns
        how many tasks it had."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or job.sealed:
                return 0
            self.store.withdraw(job_id)
            for start in job.batches:
                for task_id in range(start, start + self.batches[start].count):
                    self._drop_lease(task_id)
            self.outstanding -= job.total - job.settled
            self._forget(job_id)
            return job.total

    def expire_unsealed(self, idle_for: float) -> list:
        """Withdraw unsealed jobs that received no chunk for `idle_for` seconds (their
        client died mid-upload). Returns their ids."""
        limit = time.monotonic() - idle_for
        with self.lock:
            stale = [job_id for job_id, job in self.jobs.items() if not job.sealed and job.touched < limit]
            for job_id in stale:
                self.withdraw(job_id)
        return stale

    # -- leasing ---------------------------------------------------------------------

    def _args(self, batch: Batch) -> list:
        if self.current and self.current[0] is batch:
            return self.current[1]
        if not self.loaded or self.loaded[0] != batch.id:
            self.loaded = (batch.id, self.store.batch_args(batch.id))
        return self.loaded[1]

    def _pending(self, task_id: int, batch: Batch, job: _Job, taken: set) -> bool:
        return not (task_id in self.leases or task_id in taken or job.has(batch.index(task_id)))

    def fair_share(self, limit: int) -> int:
        return max(1, min(limit, math.ceil(self.queued / max(1, len(self.seen)))))

    def lease(self, worker: str, limit: int) -> list:
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
                if job is None:  # finished or withdrawn meanwhile
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
        """Move the lease cursor into the next stored batch of an unfinished job."""
        while True:
            found = self.store.next_batch(self.cursor)
            if found is None:
                return False
            batch_id, first_task, blobs = found
            self.cursor = batch_id
            batch = self.batches.get(first_task)
            if batch is not None and batch.id == batch_id:
                self.current = (batch, blobs, 0)
                return True

    def claim(self, worker: str, task_ids) -> int:
        """A reconnecting worker still holds these: lease them to it again (unless they
        have a result, another worker holds them, or this ledger never issued them)."""
        with self.lock:
            claimed = []
            for task_id in task_ids:
                batch, job = self._locate(task_id)
                if job is not None and self._pending(task_id, batch, job, set()):
                    self.leases[task_id] = worker
                    claimed.append(task_id)
            self.held[worker].update(claimed)
        return len(claimed)

    def _drop_lease(self, task_id: int) -> None:
        worker = self.leases.pop(task_id, None)
        if worker is not None:
            self.held[worker].discard(task_id)

    def release(self, worker: str, task_ids) -> int:
        """Hand tasks back unrun: pending again at the front, no attempt counted."""
        with self.lock:
            mine = [t for t in task_ids if self.leases.get(t) == worker]
            for task_id in mine:
                self._drop_lease(task_id)
            self.retry.extendleft(reversed(mine))
            self._notify()
        return len(mine)

    # -- outcomes --------------------------------------------------------------------

    def complete(self, worker: str, host, outcomes: list) -> int:
        """Store outcomes (task_id, ok, value_blob, error, duration) from a worker.

        A success is stored unless the task already has its result (the first one
        wins, even from a worker whose lease has gone). A failure counts only while
        that worker holds the lease: with attempts left the task is pending again,
        else the failure is its result. Returns how many results were stored."""
        with self.lock:
            plan = _Plan()
            for task_id, ok, value, error, duration in outcomes:
                batch, job = self._locate(task_id)
                if job is None or task_id in plan.seen:
                    continue
                index = batch.index(task_id)
                if job.has(index):
                    plan.drops.append(task_id)
                elif ok:
                    plan.seen.add(task_id)
                    plan.drops.append(task_id)
                    self._settle(plan, batch, task_id, index,
                                 (task_id, index, True, value, None, self.failures.get(task_id, 0) + 1, duration))
                elif self.leases.get(task_id) == worker:
                    self._plan_failure(plan, batch, job, task_id, error, duration)
            stored = self._commit(plan, host, worker)
        if self.on_report is not None and (plan.failed or plan.finished):
            self.on_report(host, plan.failed, plan.finished)
        return stored

    def _settle(self, plan: _Plan, batch: Batch, task_id: int, index: int, row: tuple) -> None:
        plan.rows[batch.job_id].append(row)
        plan.marks.append((batch.job_id, index))
        plan.settled[batch.job_id] += 1

    def _plan_failure(self, plan: _Plan, batch: Batch, job: _Job, task_id: int, error, duration) -> None:
        """A failed attempt: retry while attempts are left, else the failure is the result."""
        plan.seen.add(task_id)
        plan.drops.append(task_id)
        attempts = self.failures.get(task_id, 0) + 1
        plan.failed.append((batch.job_id, batch.index(task_id), attempts, job.max_attempts, error))
        if attempts < job.max_attempts:
            plan.attempts.append((task_id, attempts, error))
        else:
            index = batch.index(task_id)
            self._settle(plan, batch, task_id, index, (task_id, index, False, None, error, attempts, duration))

    def _commit(self, plan: _Plan, host, worker) -> int:
        """Have the store commit the plan, then apply it to memory (lock held)."""
        finished = [job_id for job_id, n in plan.settled.items()
                    if self.jobs[job_id].sealed and self.jobs[job_id].settled + n >= self.jobs[job_id].total]
        if plan.rows or plan.attempts:
            stored = self.store.record(plan.rows, plan.attempts, finished, host, worker, time.time())
        else:
            stored = 0
        # Committed: now memory.
        plan.finished = finished
        self.retried += len(plan.attempts)
        for task_id in plan.drops:
            self._drop_lease(task_id)
        for task_id, attempts, _error in plan.attempts:
            self.failures[task_id] = attempts
            self.retry.append(task_id)
        for job_id, index in plan.marks:
            self.jobs[job_id].mark(index)
        for rows in plan.rows.values():
            for row in rows:
                self.failures.pop(row[0], None)
        self.outstanding -= stored
        for job_id in finished:
            self._forget(job_id)
        if stored or plan.attempts:
            self._notify()
        return stored

    # -- workers ---------------------------------------------------------------------

    def touch(self, worker: str) -> bool:
        """Note that a worker was heard from; False if it is not known (say hello)."""
        if worker not in self.seen:
            return False
        self.seen[worker] = time.monotonic()
        return True

    def join(self, worker: str, host: str, pid: int, concurrency: int, held) -> int:
        """A worker (re)joins, still holding `held`. Returns how many it re-claimed."""
        self.store.upsert_worker(worker, host, pid, concurrency, time.time())
        with self.lock:
            self.seen[worker] = time.monotonic()
            self.expected.discard(worker)
            self._notify()
        return self.claim(worker, held)

    def reclaiming(self) -> bool:
        """Just restarted: workers that held tasks get to re-claim them before any lease."""
        return bool(self.expected) and time.monotonic() < self.reclaim_until

    def leave(self, worker: str) -> None:
        """A worker said goodbye (it holds nothing by now; anything left is retried)."""
        self.lose(worker, "left")

    def lose(self, worker: str, state: str = "lost") -> int:
        """The worker is gone: each task it held counts a failed attempt (and is pending
        again, or failed). Returns how many it held. Raises StorageError, leaving the
        worker as it was (the next reap tries again)."""
        with self.lock:
            plan = _Plan()
            held = sorted(self.held.get(worker, ()))
            for task_id in held:
                batch, job = self._locate(task_id)
                if job is None:
                    plan.drops.append(task_id)
                else:
                    self._plan_failure(plan, batch, job, task_id,
                                       f"worker {worker} was lost while holding this task", None)
            self._commit(plan, None, worker)
            self.store.set_worker_state(worker, state, time.time())
            self.seen.pop(worker, None)
            self.held.pop(worker, None)
            self._notify()
        if self.on_report is not None and plan.finished:  # its failed attempts: one line in the master's log
            self.on_report(None, [], plan.finished)
        return len(held)

    def silent(self) -> list:
        """(worker, seconds silent) of live workers past their TTL."""
        now = time.monotonic()
        with self.lock:
            return [(w, now - t) for w, t in self.seen.items() if now - t > self.worker_ttl]

    def end_reclaim(self) -> None:
        """Workers expected back after a restart that did not come within a TTL are lost."""
        with self.lock:
            if not self.expected or time.monotonic() < self.reclaim_until:
                return
            for worker in list(self.expected):
                self.store.set_worker_state(worker, "lost", time.time())
                self.expected.discard(worker)

    # -- reading ---------------------------------------------------------------------

    def counts(self) -> dict:
        with self.lock:
            counts = {"queued": self.queued, "leased": len(self.leases), "done": self.store.done_total,
                      "failed": self.store.failed_total, "open_jobs": len(self.jobs)}
        counts["jobs"] = self.store.job_count()  # kept in the ledger (bounded by retention)
        return counts

    def wait_for_work(self, timeout: float) -> None:
        with self.lock:
            self.changed.wait_for(lambda: self.queued > 0 or self.halted, timeout=timeout)

    def halt(self) -> None:
        """The master is stopping: wake every long poll."""
        with self.lock:
            self.halted = True
            self._notify()
