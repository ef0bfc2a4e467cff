"""The worker agent: leases tasks from the master and runs them in a pool of processes.

Two threads. The *link* thread (link.py) talks to the master. The main thread runs
the *pool* (pool.py) and the agent's life: signals, drain, systemd's watchdog. They
share what the worker holds (this module): tasks leased and not yet run (`local`),
ids of tasks leased and without an outcome (`holding`), outcomes the master has not
acknowledged (`outbox`), task ids to hand back (`handback`), all of the ledger named
`epoch`. Tasks from another ledger never mix with these (see Worker.new_epoch).

Outcomes are kept until the master has acknowledged them, so a master restart loses
nothing; tasks the agent will not run are handed back (drain) or, if it dies, go back
to the queue when the master stops hearing from it (--worker-ttl). Any thread that
dies ends the process non-zero, and systemd restarts it.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from multiprocessing import connection as mpc

from node import systemd
from node.config import DEFAULT_MAX_PAYLOAD, describe_error, format_address
from node.tasks import Registry
from node.worker.link import (REPLY_TIMEOUT, REPORT_COUNT, REPORT_EVERY, REPORT_MAX, REPORT_TASKS, TARGET_SECONDS,
                              Link)
from node.worker.pool import PIPELINE_BYTES, Pool

log = logging.getLogger("taskfleet.worker")

DRAIN_TIMEOUT = 30.0  # seconds SIGTERM waits for running tasks before handing them back
CHUNK_SECONDS = 0.2  # about this much work goes to a pool process at a time (one wake-up here per chunk)
PREFETCH_TASKS = 2048  # tasks held ahead per slot at most (tiny tasks: the pool must not wait for a lease)
PREFETCH_BYTES = 64 * 1024 * 1024  # ... and about this many bytes of their arguments in all
LINK_STUCK = 2 * REPLY_TIMEOUT  # a link thread silent this long stops the watchdog pings


class Worker:
    def __init__(self, master: tuple[str, int], authkey_file: str, concurrency: int | None = None,
                 tasks_modules=(), drain_timeout: float = DRAIN_TIMEOUT, tls=None, name: str | None = None):
        self.master = master
        self.tls = tls  # node.tls.TLS, or None for plaintext
        self.concurrency = concurrency or os.cpu_count() or 1
        self.registry = Registry(tasks_modules)
        self.drain_timeout = drain_timeout
        self.host = name or socket.gethostname()
        self.id = f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        # The master's limit on a result, learned at hello: shared memory, because the pool
        # processes start before the link has reached the master (and outlive reconnects).
        self.max_payload = self.ctx.RawValue("q", DEFAULT_MAX_PAYLOAD)

        self.lock = threading.Lock()  # guards the seven below
        self.local: collections.deque = collections.deque()  # leased, not yet sent to a child
        self.outbox: list = []  # outcomes the master has not acknowledged
        self.outbox_since: float | None = None  # monotonic time its oldest outcome came in
        self.handback: list = []  # task ids to release
        self.holding: set = set()  # ids of leased tasks without an outcome yet
        self.epoch = None  # the master's ledger (instance) all of the above belong to
        self.hungry = True  # a pool slot has room for a chunk: new tasks wake the pool

        self.mean_seconds = None  # running mean of task durations: sizes leases and chunks
        self.arg_bytes = None  # running mean of a task's argument bytes: bounds the prefetch
        self.draining = threading.Event()
        self.fatal: str | None = None
        self.exit_code = 0
        self.link_done = threading.Event()
        self.link_wake = threading.Event()
        self.link_beat = time.monotonic()  # the link thread's last sign of life
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.link = Link(self, authkey_file)

    # -- shared state (called from both threads) --------------------------------------

    def held(self) -> list:
        with self.lock:
            return sorted(self.holding)

    def settled(self) -> bool:
        with self.lock:
            return not self.holding and not self.outbox and not self.handback

    def new_epoch(self, instance) -> int:
        """The master serves another ledger: forget everything held from the old one.
        Outcomes of its tasks still running are discarded when they come back."""
        with self.lock:
            dropped = len(self.holding) + len(self.outbox)
            self.holding.clear()
            self.local.clear()
            self.outbox.clear()
            self.outbox_since = None
            self.handback.clear()
            self.epoch = instance
        return dropped

    def take_reports(self, due: bool, max_bytes: int) -> tuple:
        """(outcomes to report now, up to about max_bytes of results; ids to hand
        back; the epoch they belong to)."""
        with self.lock:
            outcomes = []
            if due or len(self.outbox) >= REPORT_COUNT:
                size, n = 0, 0
                for outcome in self.outbox:
                    size += len(outcome[2] or b"")
                    if n and size > max_bytes:
                        break
                    n += 1
                outcomes, self.outbox = self.outbox[:n], self.outbox[n:]
                if not self.outbox:  # what is left (over max_bytes) is as late: due at once
                    self.outbox_since = None
            handback, self.handback = self.handback, []
            return outcomes, handback, self.epoch

    def report_in(self, now: float) -> float | None:
        """Seconds until the outcomes waiting are due to be reported (0.0: now; None:
        none waits). Due at once when the worker is idle or draining, or many wait."""
        with self.lock:
            if not self.outbox:
                return None
            if not self.holding or self.draining.is_set() or len(self.outbox) >= REPORT_COUNT:
                return 0.0
            return max(0.0, self.outbox_since + self.report_every() - now)

    def put_back(self, outcomes: list, handback: list, epoch) -> None:
        """Reports the master did not acknowledge: keep them (unless the ledger changed)."""
        with self.lock:
            if epoch == self.epoch:
                self.outbox[:0] = outcomes
                self.handback[:0] = handback
                if outcomes:
                    self.outbox_since = 0.0  # due as soon as the master answers again

    def add_tasks(self, tasks: list, epoch) -> None:
        """Tasks from a lease. Leased while draining (the lease was under way as SIGTERM
        came): handed straight back, as the pool loop may have ended already."""
        with self.lock:
            if epoch != self.epoch:  # leased just before the ledger changed: not ours to run
                return
            draining = self.draining.is_set()
            if draining:
                self.handback.extend(task[0] for task in tasks)
                self.link_wake.set()
            else:
                self.local.extend(tasks)
                self.holding.update(task[0] for task in tasks)
                size = sum(len(task[2]) for task in tasks) / len(tasks)
                self.arg_bytes = size if self.arg_bytes is None else 0.9 * self.arg_bytes + 0.1 * size
            wake = self.hungry and not draining
        if draining:
            log.info("draining: handing %d task(s) leased as the drain began back to the master", len(tasks))
        if wake:  # else every slot's pipeline is full: the pool takes them as chunks end
            self.wake_pool()

    def wanted(self, prefetch: int) -> tuple:
        """(how many tasks to lease, whether the worker is idle: nothing runs or waits)."""
        with self.lock:
            return prefetch - len(self.holding), not self.holding and not self.outbox

    def fail(self, message: str, code: int) -> None:
        """End the agent: `code` 2 for a configuration error, 1 for anything else."""
        if self.fatal is None:
            self.fatal, self.exit_code = message, code
        self.draining.set()
        self.wake_pool()

    def wake_pool(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass

    # -- sizing ----------------------------------------------------------------------

    def _per_slot(self, seconds: float, low: int, high: int) -> int:
        if self.mean_seconds is None:
            return low
        return max(low, min(high, int(seconds / max(self.mean_seconds, 1e-6))))

    def prefetch(self) -> int:
        """Tasks to hold: about TARGET_SECONDS of work per slot, within PREFETCH_TASKS
        per slot and PREFETCH_BYTES of arguments."""
        n = self.concurrency * self._per_slot(TARGET_SECONDS, 2, PREFETCH_TASKS)
        if self.arg_bytes:
            n = min(n, max(2 * self.concurrency, int(PREFETCH_BYTES / self.arg_bytes)))
        return n

    @staticmethod
    def lease_at(prefetch: int) -> int:
        """Lease when this many of the prefetch are missing: half of it at a time."""
        return max(1, prefetch // 2)

    def report_every(self) -> float:
        """Seconds outcomes may wait to be reported together: about REPORT_TASKS
        tasks' worth, from REPORT_EVERY (short tasks) to REPORT_MAX (long ones)."""
        if self.mean_seconds is None:
            return REPORT_EVERY
        return max(REPORT_EVERY, min(REPORT_MAX, REPORT_TASKS * self.mean_seconds / self.concurrency))

    def _chunk(self) -> int:
        return self._per_slot(CHUNK_SECONDS, 1, 256)

    def _learn(self, outcomes) -> None:
        for outcome in outcomes:
            seconds = outcome[4] or 0.0
            self.mean_seconds = seconds if self.mean_seconds is None else 0.9 * self.mean_seconds + 0.1 * seconds

    # -- the pool --------------------------------------------------------------------

    def _collect(self, outcomes: list, again: list) -> None:
        """Outcomes (and records to run again) from the pool, each with its epoch:
        those of the current ledger's held tasks are kept."""
        with self.lock:
            fresh = [o for o, epoch in outcomes if epoch == self.epoch and o[0] in self.holding]
            first = fresh and not self.outbox
            if first:
                self.outbox_since = time.monotonic()
            self.outbox.extend(fresh)
            self.holding.difference_update(o[0] for o in fresh)
            rerun = [r for r, epoch in again if epoch == self.epoch and r[0] in self.holding]
            self.local.extendleft(reversed(rerun))
        for outcome in fresh:
            if not outcome[1]:
                log.warning("task %s failed: %s", outcome[0], (outcome[3] or "").splitlines()[0])
        self._learn(fresh)
        # Wake the link only when it must act: time a report, report (idle or many
        # waiting), or lease. Not at every chunk: each wake-up costs CPU.
        prefetch = self.prefetch()
        with self.lock:
            want, idle = prefetch - len(self.holding), not self.holding
            many = len(self.outbox) >= REPORT_COUNT
        if first or idle or many or want >= self.lease_at(prefetch):
            self.link_wake.set()

    def _dispatch(self, pool: Pool) -> None:
        """Feed slots with room: small chunks may queue behind a running one."""
        chunk = self._chunk()
        for slot in pool.room(chunk):
            with self.lock:
                batch, size = [], 0
                while self.local and len(batch) < chunk and size < PIPELINE_BYTES:
                    batch.append(self.local.popleft())
                    size += len(batch[-1][2])
                epoch = self.epoch
                if batch and not pool.submit(slot, batch, epoch):
                    self.local.extendleft(reversed(batch))
                    continue
            if not batch:
                break
        with self.lock:
            self.hungry = bool(pool.room(chunk))
            missed = bool(self.local) and bool(pool.room(0))  # came in after the last look, an idle slot
        if missed:
            self.wake_pool()

    def _hand_back(self, ids: list) -> None:
        with self.lock:
            ids = [i for i in ids if i in self.holding]
            self.handback.extend(ids)
            self.holding.difference_update(ids)
        self.link_wake.set()

    def _hand_back_local(self) -> None:
        with self.lock:
            ids = [record[0] for record in self.local]
            self.local.clear()
        if ids:
            log.info("draining: handing %d unstarted task(s) back to the master", len(ids))
            self._hand_back(ids)

    def _on_signal(self, signum, _frame) -> None:
        if not self.draining.is_set():
            log.info("received %s: draining (no new work, finishing running tasks)", signal.Signals(signum).name)
        self.draining.set()
        self.link_wake.set()
        self.wake_pool()

    def _on_thread_error(self, args) -> None:
        log.critical("thread %s died: %s", args.thread.name if args.thread else "?", describe_error(args.exc_value),
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        self.fail(f"thread {args.thread.name if args.thread else '?'} died", code=1)

    def run(self) -> int:
        """Run until drained (SIGTERM/SIGINT) or a fatal error. Exit code: 0 drained,
        1 a thread died (systemd restarts it), 2 a configuration error."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        threading.excepthook = self._on_thread_error
        pool = Pool(self.ctx, self.concurrency, self.registry, self.max_payload)
        link = threading.Thread(target=self.link.run, name="link", daemon=True)
        link.start()
        log.info("taskfleet worker %s: %d process(es), master %s, tasks: %s", self.id, self.concurrency,
                 format_address(self.master), ", ".join(self.registry.names()))
        systemd.notify("READY=1")
        try:
            self._loop(pool)
        except Exception as exc:
            log.critical("the worker's pool loop failed: %s", describe_error(exc), exc_info=True)
            self.fail(f"the pool loop failed: {describe_error(exc)}", code=1)
        systemd.notify("STOPPING=1")
        self.draining.set()
        self.link_wake.set()
        pool.stop(kill=bool(self.fatal))
        link.join(self.drain_timeout + 15 if not self.fatal else 5)
        if self.fatal:
            log.error("%s", self.fatal)
            return self.exit_code
        with self.lock:
            left = len(self.outbox) + len(self.handback)
        if left:
            log.warning("stopped with %d outcome(s) the master never acknowledged; it will requeue their tasks", left)
        log.info("worker %s stopped", self.id)
        return 0

    def _loop(self, pool: Pool) -> None:
        watchdog = systemd.watchdog_period()
        pinged = 0.0
        drain_deadline = None
        while not self.fatal:
            if self.draining.is_set():
                if drain_deadline is None:
                    drain_deadline = time.monotonic() + self.drain_timeout
                    pool.drain()  # tasks queued in the pool processes come back unrun: handed back
                self._hand_back_local()
                if not pool.busy():
                    return
                if time.monotonic() > drain_deadline:
                    held = pool.kill_busy()
                    log.warning("drain timeout: stopped running tasks, handing back %d task(s)", len(held))
                    self._hand_back([record[0] for record in held])
                    return
            else:
                self._dispatch(pool)
            overdue_in = pool.next_deadline()
            timeout = 1.0 if overdue_in is None else min(1.0, overdue_in + 0.01)
            ready = mpc.wait([self.wake_r, *pool.wait_list()], timeout)
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
            outcomes, again = pool.step(ready)
            if outcomes or again:
                self._collect(outcomes, again)
            now = time.monotonic()
            if watchdog and now - pinged >= watchdog and now - self.link_beat < LINK_STUCK:
                systemd.notify("WATCHDOG=1")
                pinged = now
