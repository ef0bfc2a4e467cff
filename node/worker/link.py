"""The worker's talk with the master, on its own thread.

Connects (and reconnects with backoff and jitter), says hello, heartbeats, leases
tasks, reports outcomes, hands tasks back. What it must survive without dying:

- the master restarting (same ledger: held tasks are re-claimed at hello) or coming
  back on a fresh ledger (another `instance`: everything held from the old one is
  dropped, and outcomes still to come from it are discarded);
- a changed authkey: the key file is read again whenever it changes (wire.Keyring); the
  next call dials with its first key, and a refused key is retried with backoff, saying
  so in its log (only a wrong key at the very first connection ends the worker, exit
  code 2: a configuration error);
- a master that does not serve its protocol (an older master: upgrades go master
  first), or failing to store (a full disk): outcomes are kept and sent again later.

Anything else that escapes is fatal: the thread records it and the agent exits
non-zero, so systemd restarts it (a dead link thread never leaves a live process).
"""

from __future__ import annotations

import logging
import os
import random
import time
from multiprocessing import AuthenticationError

from node import PROTOCOL, __version__, wire
from node.config import ConfigError, describe_error, format_address
from node.errors import Incompatible, MasterUnavailable, RemoteError, StorageError

log = logging.getLogger("taskfleet.worker")

MAX_BACKOFF = 30.0
REPLY_TIMEOUT = 30.0  # seconds one call may take before the master counts as lost
REPORT_EVERY = 0.1  # seconds outcomes may wait to be reported together, at least
REPORT_MAX = 0.5  # ... and at most (long tasks: REPORT_TASKS outcomes take longer to gather)
REPORT_TASKS = 50  # outcomes worth gathering in one report: every call costs both ends CPU
REPORT_COUNT = 1000  # outcomes waiting that are reported at once
REPORT_BYTES = 8 * 1024 * 1024  # result bytes in one report at most
TARGET_SECONDS = 0.5  # lease about this much work per slot ahead
IDLE_POLL = 1.0  # seconds an idle worker's lease may wait on the master for work
IDLE_RETRY = 0.25  # seconds an idle worker waits after a lease came back early and empty


class Link:
    def __init__(self, worker, authkey_file: str):
        self.worker = worker
        self.authkey_file = authkey_file
        where = worker.master
        self.where = format_address(where)
        self.caller = wire.Caller(where, wire.Keyring(authkey_file), reply_timeout=REPLY_TIMEOUT, tls=worker.tls)
        self.ever_connected = False
        self.connected = False
        self.backoff = 0.5
        self.beat_every = 2.5
        self.next_beat = 0.0

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        """The thread's body: until drained (or a fatal error), keep talking."""
        w = self.worker
        try:
            drain_started = None
            while True:
                w.link_beat = time.monotonic()
                if w.draining.is_set():
                    drain_started = drain_started or time.monotonic()
                    if w.settled() or w.fatal or time.monotonic() - drain_started > w.drain_timeout + 10:
                        break
                if not self.connected:
                    if not self._connect():
                        continue
                self._talk()
            self._farewell()
        except BaseException as exc:  # never a dead thread in a live process
            log.critical("the link to the master failed: %s", describe_error(exc), exc_info=True)
            w.fail(f"the link to the master failed: {describe_error(exc)}", code=1)
        finally:
            self.caller.close()
            w.link_done.set()
            w.wake_pool()

    def _retry_later(self, message: str) -> None:
        delay = min(MAX_BACKOFF, self.backoff * random.uniform(0.5, 1.5))
        log.warning("%s; retrying in %.1f s", message, delay)
        # Not link_wake: the pool sets it as tasks end (a first outcome, a lease due),
        # which would cut the backoff short.
        self.worker.draining.wait(delay if not self.worker.draining.is_set() else min(delay, 1.0))
        self.backoff = min(MAX_BACKOFF, self.backoff * 2)

    def _connect(self) -> bool:
        w = self.worker
        try:
            self._introduce()
        except Incompatible as exc:  # before PermissionError, its base: an upgrade under way passes
            self._retry_later(f"the master at {self.where} refused this worker: {exc}")
            return False
        except (AuthenticationError, PermissionError) as exc:  # a wrong key, a certificate refused
            if not self.ever_connected:
                w.fail(str(exc), code=2)  # at first start: a configuration error
                w.draining.set()
                return False
            self._retry_later(f"{exc} (re-reading {self.authkey_file} when it changes)")
            return False
        except ConfigError as exc:  # the key file went missing or bad mid-rotation
            self._retry_later(str(exc))
            return False
        except (MasterUnavailable, StorageError, RemoteError) as exc:
            self._retry_later(describe_error(exc))
            return False
        self.connected = self.ever_connected = True
        self.backoff = 0.5
        log.info("connected to the master at %s as %s", self.where, w.id)
        return True

    def _introduce(self) -> None:
        """Say hello, with the tasks still held. A master on another ledger (a fresh
        state dir) knows nothing of them: drop them and any outcome still to come."""
        w = self.worker
        introduction = (w.id, w.host, os.getpid(), w.concurrency, w.held(), w.epoch, PROTOCOL)
        try:
            info = self.caller.call("hello", *introduction, __version__)
        except (TypeError, RemoteError):
            # A protocol 2 master's hello takes no version (TypeError): asked without it,
            # it refuses this worker's protocol plainly (Incompatible).
            info = self.caller.call("hello", *introduction)
        if w.epoch is not None and info["instance"] != w.epoch:
            dropped = w.new_epoch(info["instance"])
            log.warning("the master's ledger changed (a new state dir): dropped %d task(s) and outcome(s) "
                        "from the old one", dropped)
        else:
            w.epoch = info["instance"]
        w.max_payload.value = info["max_payload"]
        self.beat_every = info["worker_ttl"] / 4
        self.next_beat = time.monotonic() + self.beat_every

    def _talk(self) -> None:
        try:
            if time.monotonic() >= self.next_beat:
                if not self.caller.call("heartbeat", self.worker.id):  # the master forgot us: hello again
                    self._introduce()
                self.next_beat = time.monotonic() + self.beat_every
            self._exchange()
        except MasterUnavailable as exc:
            log.warning("%s; reconnecting", describe_error(exc))
            self.connected = False
        except StorageError as exc:  # outcomes are kept: the master recovers when it can write
            self._retry_later(f"the master could not store our outcomes: {exc}")
        except (Incompatible, RemoteError, ValueError, LookupError, TypeError) as exc:
            log.error("a call to the master at %s failed: %s; reconnecting", self.where,
                      describe_error(exc).strip().splitlines()[-1])
            self.caller.close()
            self.connected = False
            self.worker.draining.wait(1.0)  # the same call may fail again: don't spin

    def _exchange(self) -> None:
        """Report outcomes, hand back tasks, then lease (long-polling when idle), then
        sleep until something is due. Outcomes go in batches, REPORT_EVERY to REPORT_MAX
        s late (Worker.report_in; at once when the worker goes idle), and leases top up
        half the prefetch at a time: fewer calls and wake-ups, less CPU taken from the
        tasks on the master's and this host. The pool wakes this thread (link_wake)
        only when it must act: a first outcome to time, the worker idle, a lease due."""
        w = self.worker
        w.link_wake.clear()  # before looking: a wake-up from now on is not lost
        due = w.report_in(time.monotonic()) == 0.0
        outcomes, handback, epoch = w.take_reports(due, REPORT_BYTES)
        try:
            if outcomes:
                if self.caller.call("complete", w.id, w.host, outcomes, epoch) is None:
                    outcomes = []  # they belong to another ledger's tasks: drop them
                    self._introduce()
            if handback:
                self.caller.call("release", w.id, handback, epoch)
        except BaseException:
            w.put_back(outcomes, handback, epoch)  # not acknowledged: keep for the next try
            raise
        if w.draining.is_set():
            w.link_wake.wait(0.2)
            return
        prefetch = w.prefetch()
        want, idle = w.wanted(prefetch)
        if want >= w.lease_at(prefetch):
            # Idle: long-poll the master. Busy: don't block, outcomes must flow back.
            asked = time.monotonic()
            tasks = self.caller.call("lease", w.id, want, IDLE_POLL if idle else 0.0)
            if tasks:
                w.add_tasks(tasks, epoch)
                return
            if idle:  # an early empty answer (the master just restarted, or forgot us): don't spin
                w.link_wake.wait(max(0.0, min(IDLE_RETRY, asked + IDLE_POLL - time.monotonic())))
                return
        now = time.monotonic()
        report = w.report_in(now)
        w.link_wake.wait(max(0.0, min(self.next_beat - now, REPLY_TIMEOUT if report is None else report)))

    def _farewell(self) -> None:
        if not self.connected:
            return
        try:
            self._exchange()
            self.caller.call("goodbye", self.worker.id)
        except (MasterUnavailable, StorageError, RemoteError, ValueError, LookupError):
            pass
