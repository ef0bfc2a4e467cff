"""The master: serves the fleet service (and the classic queue pair) over BaseManager.

The fleet service is what workers and clients call through their proxies. Each
connection has its own server thread; all state goes through the Ledger's lock.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import pickle
import queue
import signal
import threading
import time

from node import __version__, systemd, transport
from node.config import DEFAULT_MAX_PAYLOAD, format_address
from node.ledger import Ledger
from node.tasks import Registry, UnknownTask

log = logging.getLogger("taskfleet.master")

DEFAULT_TIMEOUT = 300.0  # seconds one task may run
DEFAULT_RETRIES = 2  # attempts after the first
MAX_WAIT = 30.0  # longest a long-poll call may block in the server
THROUGHPUT_WINDOW = 10.0  # seconds: status shows the current rate
STATUS_LOST_FOR = 3600.0  # seconds a lost worker still shows in status


class RejectedJob(ValueError):
    """A submission the master refuses; the message says why and nothing was queued."""


class FleetService:
    def __init__(self, ledger: Ledger, registry: Registry, *, worker_ttl: float = 10.0,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, address: str = ""):
        self.ledger = ledger
        self.registry = registry
        self.worker_ttl = worker_ttl
        self.max_payload = max_payload
        self.address = address
        self.started = time.time()
        self.seen: dict[str, float] = {}  # worker id -> monotonic time last heard from
        # Workers alive when the master last stopped: until they are back (or a TTL has
        # passed) nothing is leased, so tasks they still run are not handed out twice.
        self.expected = {w["id"] for w in ledger.workers("alive")}
        self.reclaim_until = time.monotonic() + worker_ttl
        self.changed = threading.Condition()  # new tasks or new results
        self.completions: collections.deque = collections.deque()  # (monotonic, count)

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    # -- workers ---------------------------------------------------------------------

    def hello(self, worker: str, host: str, pid: int, concurrency: int, held=(), instance=None) -> dict:
        """A worker (re)joins. `held`: task ids it still holds from before a reconnect,
        leased from the ledger named `instance` (ids from another ledger are not claimed)."""
        self.ledger.upsert_worker(worker, host, pid, concurrency, time.time())
        self.seen[worker] = time.monotonic()
        self.expected.discard(worker)
        claimed = self.ledger.claim(worker, list(held)) if instance == self.ledger.instance else 0
        log.info("worker %s joined from %s (pid %s, concurrency %s%s)", worker, host, pid, concurrency,
                 f", still holding {claimed} task(s)" if held else "")
        return {"worker_ttl": self.worker_ttl, "max_payload": self.max_payload, "version": __version__,
                "instance": self.ledger.instance}

    def heartbeat(self, worker: str) -> bool:
        """False: the master does not know this worker (it restarted): say hello again."""
        if worker not in self.seen:
            return False
        self.seen[worker] = time.monotonic()
        return True

    def goodbye(self, worker: str) -> None:
        self.seen.pop(worker, None)
        self.ledger.lose_worker(worker, time.time())  # a clean worker holds nothing by now
        self.ledger.set_worker_state(worker, "left", time.time())
        log.info("worker %s left", worker)

    def lease(self, worker: str, limit: int, wait: float = 0.0) -> list[tuple]:
        """Up to `limit` tasks, at most a fair share of the queue; may wait for work."""
        if worker not in self.seen:
            return []
        self.seen[worker] = time.monotonic()
        if self.expected and time.monotonic() < self.reclaim_until:
            return []  # just restarted: workers that held tasks get to re-claim them first
        if wait > 0 and self.ledger.queued <= 0:
            with self.changed:
                self.changed.wait_for(lambda: self.ledger.queued > 0, timeout=min(wait, MAX_WAIT))
        share = math.ceil(self.ledger.queued / max(1, len(self.seen)))
        return self.ledger.lease(worker, max(1, min(limit, share)))

    def complete(self, worker: str, host: str, outcomes: list[tuple]) -> int:
        """Outcomes: (task_id, ok, value_blob, error, duration). Returns results stored."""
        stored = self.ledger.record(worker, host, outcomes, time.time())
        if worker in self.seen:
            self.seen[worker] = time.monotonic()
        if stored:
            self.completions.append((time.monotonic(), stored))
        self._notify()
        return stored

    def release(self, worker: str, task_ids: list[int]) -> int:
        released = self.ledger.release(worker, list(task_ids))
        self._notify()
        return released

    # -- clients ---------------------------------------------------------------------

    def submit(self, key: str, task: str, args_list: list, first_index: int = 0, final: bool = True,
               timeout: float | None = None, retries: int | None = None) -> int:
        """Queue one chunk of a job (see Client.submit). Returns the job id."""
        try:
            self.registry.get(task)
        except UnknownTask as exc:
            raise RejectedJob(str(exc)) from None
        if not isinstance(args_list, (list, tuple)):
            raise RejectedJob(f"a job's arguments must be a list of argument lists, got {type(args_list).__name__}")
        timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        retries = DEFAULT_RETRIES if retries is None else int(retries)
        if not timeout > 0 or retries < 0:
            raise RejectedJob("timeout must be > 0 seconds and retries >= 0")
        blobs = []
        for offset, args in enumerate(args_list):
            where = f"task {first_index + offset}"
            try:
                self.registry.check_arguments(task, args)
                blob = pickle.dumps(tuple(args))
                if len(blob) > self.max_payload:
                    raise TypeError(f"arguments are {len(blob)} bytes, over the master's limit of {self.max_payload}")
            except TypeError as exc:
                # A job is accepted whole or not at all: drop the chunks that came before.
                dropped = self.ledger.abort(key)
                raise RejectedJob(f"{where}: {exc}" + (f" (the job's first {dropped} task(s) were withdrawn)"
                                                       if dropped else "")) from None
            blobs.append(blob)
        job_id = self.ledger.add_tasks(key, task, timeout, retries + 1, first_index, blobs, final)
        self._notify()
        return job_id

    def job(self, job_id: int) -> dict | None:
        return self.ledger.job(job_id)

    def results(self, job_id: int, after: int = 0, limit: int = 1000, wait: float = 0.0) -> dict:
        """New results of a job after sequence number `after`, and the job's counts.
        With `wait`, blocks up to that long for at least one new result."""
        job = self.ledger.job(job_id)
        if job is None:
            raise LookupError(f"no job {job_id} on this master")
        rows = self.ledger.results(job_id, after, limit)
        deadline = time.monotonic() + min(wait, MAX_WAIT)
        while not rows and not job["finished"] and time.monotonic() < deadline:
            with self.changed:
                self.changed.wait(timeout=max(0.0, deadline - time.monotonic()))
            rows = self.ledger.results(job_id, after, limit)
            job = self.ledger.job(job_id)
        return {"rows": rows, "job": job}

    def status(self) -> dict:
        now, mono = time.time(), time.monotonic()
        rows = self.ledger.workers()
        newest_alive = {}  # host -> start time of its newest live worker
        for w in rows:
            w["alive"] = w["id"] in self.seen
            if w["alive"]:
                newest_alive[w["host"]] = max(newest_alive.get(w["host"], 0.0), w["started"] or 0.0)
                w["last_seen_ago"] = round(mono - self.seen.get(w["id"], mono), 1)
            else:
                w["last_seen_ago"] = round(now - w["last_seen"], 1) if w["last_seen"] else None
        # History is not fleet: workers that left cleanly, were lost long ago, or were
        # replaced by a newer worker on the same host are left out.
        workers = [
            w for w in rows
            if w["alive"] or (w["state"] == "lost" and (w["last_seen_ago"] or 0) < STATUS_LOST_FOR
                              and (w["started"] or 0) > newest_alive.get(w["host"], 0.0))
        ]
        window = min(THROUGHPUT_WINDOW, max(1.0, now - self.started))
        recent = sum(n for t, n in self.completions if t >= mono - window)
        return {
            "master": {"address": self.address, "version": __version__, "pid": os.getpid(),
                       "uptime": round(now - self.started, 1), "state": str(self.ledger.path)},
            "tasks": self.ledger.counts(),
            "throughput": round(recent / window, 1),
            "workers": workers,
        }

    # -- upkeep ----------------------------------------------------------------------

    def reap(self) -> None:
        """Forget silent workers; what they held is pending again (an attempt counted)."""
        mono = time.monotonic()
        for worker, seen in list(self.seen.items()):
            if mono - seen > self.worker_ttl:
                self.seen.pop(worker, None)
                held = self.ledger.lose_worker(worker, time.time())
                self.ledger.set_worker_state(worker, "lost", time.time())
                log.warning("worker %s lost: silent for %.0f s; %d task(s) it held are pending again",
                            worker, mono - seen, held)
                self._notify()
        if self.expected and mono >= self.reclaim_until:
            for worker in self.expected:
                self.ledger.set_worker_state(worker, "lost", time.time())
            self.expected.clear()
        while self.completions and self.completions[0][0] < mono - THROUGHPUT_WINDOW:
            self.completions.popleft()


def run_master(listen: tuple[str, int], authkey: bytes, state_dir: str, tasks_modules=(),
               worker_ttl: float = 10.0, max_payload: int = DEFAULT_MAX_PAYLOAD) -> int:
    registry = Registry(tasks_modules)
    ledger = Ledger(state_dir)
    service = FleetService(ledger, registry, worker_ttl=worker_ttl, max_payload=max_payload,
                           address=format_address(listen))
    classic = {"get_task_queue": queue.Queue(), "get_result_queue": queue.Queue()}
    server = transport.serve(listen, authkey, {"get_fleet": service, **classic})
    stop = server.stop_event

    def on_signal(signum, _frame):
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=server.accepter, name="accepter", daemon=True).start()
    log.info(
        "taskfleet master %s listening on %s, state in %s, %d task(s) queued, tasks: %s",
        __version__, format_address(server.address), ledger.path, ledger.queued, ", ".join(registry.names()),
    )
    systemd.notify("READY=1", f"STATUS=serving on {format_address(server.address)}")
    while not stop.wait(1.0):
        try:
            service.reap()
        except Exception:
            log.exception("upkeep failed")
        systemd.notify("WATCHDOG=1")
    systemd.notify("STOPPING=1")
    server.listener.close()
    ledger.close()
    log.info("stopped; state kept in %s", ledger.path)
    return 0
