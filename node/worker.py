"""The worker agent: leases tasks from the master and runs them in a pool of processes.

Two threads. The *link* thread talks to the master: connects (and reconnects with
backoff and jitter, building fresh proxies), says hello, heartbeats, leases tasks,
reports outcomes, hands tasks back. The main thread runs the *pool*: one child process
per slot, each fed chunks of tasks over a pipe; it enforces per-task timeouts (a
child's current task and start time sit in shared memory), and replaces a child that
dies or overruns without taking the agent down.

Outcomes are kept until the master has acknowledged them, so a master restart loses
nothing; tasks the agent will not run are handed back (drain) or, if it dies, go back
to the queue when the master stops hearing from it (--worker-ttl).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import pickle
import random
import signal
import socket
import threading
import time
import traceback
import uuid
from multiprocessing import AuthenticationError
from multiprocessing import connection as mpc

from node import systemd, transport
from node.config import DEFAULT_MAX_PAYLOAD, describe_error, format_address
from node.tasks import Registry

log = logging.getLogger("taskfleet.worker")

DRAIN_TIMEOUT = 30.0  # seconds SIGTERM waits for running tasks before handing them back
FLUSH_EVERY = 0.2  # a child reports finished tasks at least this often
MAX_BACKOFF = 30.0
REPORT_EVERY = 0.1  # seconds outcomes may wait to be reported together
TARGET_SECONDS = 0.5  # lease about this much work per slot ahead
ERROR_LIMIT = 4000  # characters of a task's traceback kept in its error
PIPELINE_BYTES = 32 * 1024  # chunks up to this size may queue behind a running one


def _describe(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None))
    head = f"{type(exc).__name__}: {exc}"
    return head if len(text) > ERROR_LIMIT else f"{head}\n{text}"


def _child(conn, current, registry: Registry, max_payload) -> None:
    """A pool process: run chunks of (task_id, name, args_blob, timeout); send outcomes
    (task_id, ok, value_blob, error, seconds) in order, at least every FLUSH_EVERY s."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when children stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    agent = os.getppid()
    while True:
        try:
            # Siblings forked later hold our pipe's other end too, so the agent's death
            # shows as a new parent, not as EOF: look while idle.
            while not conn.poll(1.0):
                if os.getppid() != agent:
                    return
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        out, flushed = [], time.monotonic()
        for task_id, name, blob, _timeout in chunk:
            start = time.monotonic()
            current[0], current[1] = task_id, start
            try:
                value = pickle.dumps(registry.get(name)(*pickle.loads(blob)))
                if len(value) > max_payload.value:
                    outcome = (task_id, False, None,
                               f"result is {len(value)} bytes, over the limit of {max_payload.value}")
                else:
                    outcome = (task_id, True, value, None)
            except BaseException as exc:  # a task's SystemExit is its failure, not ours
                outcome = (task_id, False, None, _describe(exc))
            end = time.monotonic()
            current[1] = 0.0
            out.append(outcome + (round(end - start, 6),))
            if end - flushed >= FLUSH_EVERY:
                conn.send(out)
                out, flushed = [], end
        if out:
            conn.send(out)


class Slot:
    """One child process and the tasks sent to it, oldest first."""

    def __init__(self, ctx, registry: Registry, max_payload):
        self.current = ctx.RawArray("d", 2)  # task id, monotonic start (0: idle)
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child_end, self.current, registry, max_payload), daemon=True)
        self.proc.start()
        child_end.close()
        self.inflight: collections.deque = collections.deque()

    def running(self):
        """(task record, seconds running) of the task the child is in, or None."""
        task_id, start = self.current[0], self.current[1]
        if start <= 0:
            return None
        for record in self.inflight:
            if record[0] == task_id:
                return record, time.monotonic() - start
        return None

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class Worker:
    def __init__(self, master: tuple[str, int], authkey: bytes, concurrency: int | None = None,
                 tasks_modules=(), drain_timeout: float = DRAIN_TIMEOUT):
        self.master = master
        self.authkey = authkey
        self.concurrency = concurrency or os.cpu_count() or 1
        self.registry = Registry(tasks_modules)
        self.drain_timeout = drain_timeout
        self.host = socket.gethostname()
        self.id = f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        # The master's limit on a result, learned at hello: shared memory, because the pool
        # processes start before the link has reached the master (and outlive reconnects).
        self.max_payload = self.ctx.RawValue("q", DEFAULT_MAX_PAYLOAD)

        self.lock = threading.Lock()  # guards the four below
        self.local: collections.deque = collections.deque()  # leased, not yet sent to a child
        self.outbox: list = []  # outcomes the master has not acknowledged
        self.handback: list = []  # task ids to release
        self.holding: set = set()  # ids of leased tasks without an outcome yet
        self.stale: set = set()  # ids still running that belong to a ledger the master lost
        self.instance = None  # the master's ledger our leases come from

        self.reported = 0.0  # monotonic time outcomes were last sent
        self.mean_seconds = None  # running mean of task durations: sizes leases and chunks
        self.draining = threading.Event()
        self.fatal: str | None = None
        self.link_done = threading.Event()
        self.link_wake = threading.Event()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    # -- sizing ----------------------------------------------------------------------

    def _per_slot(self, seconds: float, low: int, high: int) -> int:
        if self.mean_seconds is None:
            return low
        return max(low, min(high, int(seconds / max(self.mean_seconds, 1e-6))))

    def _prefetch(self) -> int:
        return self.concurrency * self._per_slot(TARGET_SECONDS, 2, 512)

    def _chunk(self) -> int:
        return self._per_slot(0.05, 1, 256)

    def _learn(self, outcomes) -> None:
        for outcome in outcomes:
            seconds = outcome[4] or 0.0
            self.mean_seconds = seconds if self.mean_seconds is None else 0.9 * self.mean_seconds + 0.1 * seconds

    def _held(self) -> list:
        with self.lock:
            return sorted(self.holding)

    def _wake_pool(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass

    # -- the link to the master ------------------------------------------------------

    def _link(self) -> None:
        manager = fleet = None
        backoff, next_beat, beat_every = 0.5, 0.0, 2.5
        drain_started = None
        while True:
            if self.draining.is_set():
                drain_started = drain_started or time.monotonic()
                with self.lock:
                    settled = not self.holding and not self.outbox and not self.handback
                if settled or self.fatal or time.monotonic() - drain_started > self.drain_timeout + 10:
                    break
            if fleet is None:
                try:
                    manager, fleet = transport.connect(self.master, self.authkey)
                    info = self._introduce(fleet)
                except AuthenticationError as exc:
                    self.fatal = str(exc)
                    self.draining.set()
                    self._wake_pool()
                    break
                except (OSError, EOFError) as exc:
                    transport.discard(fleet)
                    manager = fleet = None
                    delay = min(MAX_BACKOFF, backoff * random.uniform(0.5, 1.5))
                    log.warning("%s; retrying in %.1f s", exc, delay)
                    # Not link_wake: the pool sets it whenever a task ends, which made the
                    # backoff climb to its maximum in a fraction of a second of retries.
                    if self.draining.is_set():
                        time.sleep(min(delay, 1.0))
                    else:
                        self.draining.wait(delay)
                    backoff = min(MAX_BACKOFF, backoff * 2)
                    continue
                backoff = 0.5
                self.max_payload.value = info["max_payload"]
                beat_every = info["worker_ttl"] / 4
                next_beat = time.monotonic() + beat_every
                log.info("connected to the master at %s as %s", format_address(self.master), self.id)
            try:
                if time.monotonic() >= next_beat:
                    if not fleet.heartbeat(self.id):  # the master forgot us (restart): introduce again
                        self._introduce(fleet)
                    next_beat = time.monotonic() + beat_every
                self._exchange(fleet)
            except (OSError, EOFError) as exc:
                log.warning("lost the master at %s (%s); reconnecting", format_address(self.master),
                            describe_error(exc))
                transport.discard(fleet)
                manager = fleet = None
            except Exception as exc:  # raised by the master (RemoteError...): the link must live on
                log.error("call to the master at %s failed: %s; reconnecting", format_address(self.master),
                          describe_error(exc).strip().splitlines()[-1])
                transport.discard(fleet)
                manager = fleet = None
                self.draining.wait(1.0)  # the same call may fail again: don't spin
        if fleet is not None:
            try:
                self._exchange(fleet)
                fleet.goodbye(self.id)
            except (OSError, EOFError):
                pass
            transport.discard(fleet)
        del manager
        self.link_done.set()
        self._wake_pool()

    def _introduce(self, fleet) -> dict:
        """Say hello, with the tasks still held. A master on another ledger (a fresh
        state dir) knows nothing of them: drop them and any outcome still to come."""
        info = fleet.hello(self.id, self.host, os.getpid(), self.concurrency, self._held(), self.instance)
        if self.instance is not None and info["instance"] != self.instance:
            with self.lock:
                dropped = len(self.holding) + len(self.outbox)
                self.stale |= self.holding
                self.holding.clear()
                self.local.clear()
                self.outbox.clear()
                self.handback.clear()
            log.warning("the master's ledger changed (a new state dir): dropped %d task(s) and outcome(s) "
                        "from the old one", dropped)
        self.instance = info["instance"]
        return info

    def _exchange(self, fleet) -> None:
        """Report outcomes, hand back tasks, then lease (long-polling when idle).
        Outcomes go in batches, at most REPORT_EVERY s late: fewer calls, less CPU
        taken from the tasks on the master's and this host."""
        now = time.monotonic()
        with self.lock:
            due = (len(self.outbox) >= 1000 or now - self.reported >= REPORT_EVERY
                   or self.draining.is_set() or not self.holding)
            outcomes, self.outbox = (self.outbox, []) if due else ([], self.outbox)
            handback, self.handback = self.handback, []
        if outcomes:
            self.reported = now
        try:
            if outcomes:
                fleet.complete(self.id, self.host, outcomes)
            if handback:
                fleet.release(self.id, handback)
        except BaseException:
            with self.lock:  # not acknowledged: keep them for the next connection
                self.outbox[:0] = outcomes
                self.handback[:0] = handback
            raise
        if self.draining.is_set():
            self.link_wake.wait(0.2)
            self.link_wake.clear()
            return
        prefetch = self._prefetch()
        with self.lock:  # idle only if nothing runs and nothing waits to be reported
            want = prefetch - len(self.holding)
            idle = not self.holding and not self.outbox
        if want >= max(1, prefetch // 4):
            # Idle: long-poll the master. Busy: don't block, outcomes must flow back.
            tasks = fleet.lease(self.id, want, 1.0 if idle else 0.0)
            if tasks:
                with self.lock:
                    self.local.extend(tasks)
                    self.holding.update(task[0] for task in tasks)
                self._wake_pool()
                return
            if not self.holding:
                return
        self.link_wake.wait(max(0.01, min(0.25, self.reported + REPORT_EVERY - time.monotonic())))
        self.link_wake.clear()

    # -- the pool --------------------------------------------------------------------

    def _take(self, slot: Slot, outcomes: list) -> None:
        for outcome in outcomes:
            record = slot.inflight.popleft()
            assert record[0] == outcome[0], "child answered out of order"
        self._learn(outcomes)
        with self.lock:
            self.outbox.extend(self._current(outcomes))
            self.holding.difference_update(outcome[0] for outcome in outcomes)
        self.link_wake.set()

    def _current(self, outcomes: list) -> list:
        """Outcomes less those of tasks from a ledger the master no longer has (lock held)."""
        if not self.stale:
            return outcomes
        fresh = [o for o in outcomes if o[0] not in self.stale]
        self.stale.difference_update(o[0] for o in outcomes)
        return fresh

    def _replace(self, slots: list, slot: Slot, why: str) -> None:
        """The child died or overran: blame its current task, requeue the rest locally."""
        slot.proc.kill()
        try:  # outcomes it sent before it stopped still count
            while slot.conn.poll():
                self._take(slot, slot.conn.recv())
        except (EOFError, OSError):
            pass
        running = slot.running()
        slot.proc.join()
        failed = []
        if running:
            record, seconds = running
            if why == "timeout":
                error = f"timed out after {record[3]:g} s"
            else:
                error = f"worker process died (exit code {slot.proc.exitcode}) while running this task"
            failed.append((record[0], False, None, error, round(seconds, 6)))
            log.warning("task %s (%s): %s", record[0], record[1], error)
        requeue = [r for r in slot.inflight if not failed or r[0] != failed[0][0]]
        with self.lock:
            self.stale.difference_update(r[0] for r in requeue)
            requeue = [r for r in requeue if r[0] in self.holding]  # not from a lost ledger
            self.local.extendleft(reversed(requeue))
            self.outbox.extend(self._current(failed))
            self.holding.difference_update(outcome[0] for outcome in failed)
        self.link_wake.set()
        slot.inflight.clear()
        slot.conn.close()
        slots[slots.index(slot)] = Slot(self.ctx, self.registry, self.max_payload)

    def _dispatch(self, slots: list) -> None:
        """Feed idle slots. A small chunk may queue behind the one a child is running;
        a large one waits until the child is idle, so neither end can block the other
        on a full pipe."""
        chunk = self._chunk()
        for slot in slots:
            if len(slot.inflight) > chunk:
                continue
            with self.lock:
                batch, size = [], 0
                while self.local and len(batch) < chunk and size < PIPELINE_BYTES:
                    batch.append(self.local.popleft())
                    size += len(batch[-1][2])
                if batch and slot.inflight and size >= PIPELINE_BYTES:
                    self.local.extendleft(reversed(batch))
                    continue
            if not batch:
                return
            slot.inflight.extend(batch)
            slot.conn.send(batch)

    def _hand_back_local(self) -> None:
        with self.lock:
            ids = [record[0] for record in self.local]
            self.local.clear()
            self.handback.extend(ids)
            self.holding.difference_update(ids)
        if ids:
            log.info("draining: handing %d unstarted task(s) back to the master", len(ids))
        self.link_wake.set()

    def _on_signal(self, signum, _frame) -> None:
        if not self.draining.is_set():
            log.info("received %s: draining (no new work, finishing running tasks)", signal.Signals(signum).name)
        self.draining.set()
        self.link_wake.set()
        self._wake_pool()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        slots = [Slot(self.ctx, self.registry, self.max_payload) for _ in range(self.concurrency)]
        link = threading.Thread(target=self._link, name="link", daemon=True)
        link.start()
        log.info("taskfleet worker %s: %d process(es), master %s, tasks: %s", self.id, self.concurrency,
                 format_address(self.master), ", ".join(self.registry.names()))
        drain_deadline = None
        next_check = 0.0
        systemd.notify("READY=1")
        while True:
            if link.is_alive():
                systemd.notify("WATCHDOG=1")
            if self.fatal:
                break
            if self.draining.is_set():
                if drain_deadline is None:
                    drain_deadline = time.monotonic() + self.drain_timeout
                self._hand_back_local()
                busy = [s for s in slots if s.inflight]
                if not busy:
                    break
                if time.monotonic() > drain_deadline:
                    for slot in busy:
                        log.warning("drain timeout: stopping a child and handing back %d task(s)", len(slot.inflight))
                        slot.proc.kill()
                        slot.proc.join()
                        with self.lock:
                            ids = [r[0] for r in slot.inflight]
                            self.handback.extend(ids)
                            self.holding.difference_update(ids)
                        slot.inflight.clear()
                    break
            else:
                self._dispatch(slots)
            waits = [self.wake_r]
            for slot in slots:
                waits += [slot.conn, slot.proc.sentinel]
            busy = any(s.inflight for s in slots)
            for ready in mpc.wait(waits, timeout=0.1 if busy else 1.0):
                if ready == self.wake_r:
                    os.read(self.wake_r, 4096)
                    continue
                slot = next((s for s in slots if ready is s.conn or ready == s.proc.sentinel), None)
                if slot is None or (ready is not slot.conn and slot.proc.is_alive()):
                    continue  # replaced earlier in this round (its fd number reused)
                if ready is slot.conn:
                    try:
                        self._take(slot, slot.conn.recv())
                        continue
                    except (EOFError, OSError):
                        pass
                self._replace(slots, slot, "died")
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.05
                for slot in list(slots):
                    running = slot.running()
                    if running and running[1] > running[0][3]:
                        self._replace(slots, slot, "timeout")
        self.draining.set()
        self.link_wake.set()
        for slot in slots:
            slot.stop(kill=bool(self.fatal))
        link.join(self.drain_timeout + 15 if not self.fatal else 5)
        if self.fatal:
            log.error("%s", self.fatal)
            return 2
        with self.lock:
            left = len(self.outbox) + len(self.handback)
        if left:
            log.warning("stopped with %d outcome(s) the master never acknowledged; it will requeue their tasks", left)
        log.info("worker %s stopped", self.id)
        return 0
