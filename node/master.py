"""The master: wires the server, the store and the scheduler, and defines the calls.

`Master` is the service workers and clients call (through server.Server). Workers:
hello, heartbeat, lease, complete, release, goodbye, each for themselves. Clients:
submit, withdraw, job, results, status; operators (admin): forget (a removed worker
host). Every argument from the wire is checked here before it reaches the scheduler; a
malformed one is refused with a plain error and changes nothing.

Over TLS the peer's certificate names its role, and `Master.authorize` holds each role
to its calls (ROLE_CALLS); a worker acts only as itself (its worker ids start with its
certificate's name). The tutorial's queues are served over TLS to clients and admins,
and over plaintext only on the separate `plain_listen` address, which serves nothing else.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import pickle
import queue
import signal
import threading
import time

from node import OLDEST_WORKER_PROTOCOL, PROTOCOL, __version__, systemd
from node.config import DEFAULT_MAX_PAYLOAD, format_address
from node.scheduler import Scheduler
from node.server import Server, Service
from node.errors import Incompatible, RejectedJob, StorageError
from node.metrics import Telemetry, clean, first_line, serve_metrics
from node.store import Store
from node.tasks import Registry, UnknownTask

log = logging.getLogger("taskfleet.master")

DEFAULT_TIMEOUT = 300.0  # seconds one task may run
DEFAULT_RETRIES = 2  # attempts after the first
DEFAULT_RETENTION = 7 * 86400.0  # seconds a finished job is kept
DEFAULT_MAX_JOBS = 10000  # finished jobs kept at most
MAX_WAIT = 30.0  # longest a long-poll call may block in the server
UNSEALED_TTL = 600.0  # seconds an unfinished upload may pause before its job is withdrawn
THROUGHPUT_WINDOW = 10.0  # seconds: status shows the current rate
STATUS_LOST_FOR = 3600.0  # seconds a lost worker still shows in status
CLASSIC_QUEUE_SIZE = 100_000  # items in each of the tutorial's queues at most
HOUSEKEEPING_EVERY = 30.0  # seconds between retention and expiry passes
FAILED_SCAN_PAGES = 50  # pages of results `results(failed_only=True)` reads at most per call

WORKER_CALLS = ("hello", "heartbeat", "goodbye", "lease", "complete", "release")
CLIENT_CALLS = ("submit", "withdraw", "job", "results", "status")
ADMIN_CALLS = ("forget",)
# A certificate's role -> its calls. An operator (admin) never acts as a worker: only a
# worker's own certificate can lease or complete its tasks. The master's own identity is its
# host's operator (the playbooks ask status and forget on the master host).
ROLE_CALLS = {"worker": frozenset(WORKER_CALLS), "client": frozenset(CLIENT_CALLS),
              "admin": frozenset(CLIENT_CALLS + ADMIN_CALLS),
              "master": frozenset(CLIENT_CALLS + ADMIN_CALLS)}
CLASSIC_ROLES = frozenset({"client", "admin"})  # who may use the tutorial's queues over TLS
CLASSIC_METHODS = frozenset({"put", "get", "put_nowait", "get_nowait", "qsize", "empty", "full",
                             "task_done", "join"})


class Master:
    def __init__(self, store: Store, scheduler: Scheduler, registry: Registry, *,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, address: str = "", retention: float = DEFAULT_RETENTION,
                 max_jobs: int = DEFAULT_MAX_JOBS):
        self.store = store
        self.scheduler = scheduler
        self.registry = registry
        self.max_payload = max_payload
        self.address = address
        self.retention = retention
        self.max_jobs = max_jobs
        self.started = time.time()
        self.stopping = False
        self.server: Server | None = None  # set by run_master: status shows refused peers
        self.completions: collections.deque = collections.deque()  # (monotonic, count)
        self.housekept = 0.0
        self.telemetry = Telemetry()  # run times, history, recent failures (metrics.py)
        self.metrics_address: str | None = None  # where /metrics and the dashboard are served
        self.worker_keys: dict[str, str] = {}  # worker id -> fingerprint of the key its last call came with
        self.builds: dict = {}  # worker id -> (version or None, protocol), from its hello
        scheduler.on_report = self._reported

    # -- who may call what (TLS peers) -------------------------------------------------

    def authorize(self, identity, method: str, args: tuple, kwargs: dict) -> None:
        """Raise PermissionError unless `identity`'s role may make this call; a worker
        only for itself: the worker ids it uses start with its name, the host it reports
        is its name."""
        if method not in ROLE_CALLS.get(identity.role, ()):
            raise PermissionError(f"{identity} may not call {method}")
        if identity.role != "worker":
            return
        try:
            given = _SIGNATURES[method].bind(None, *args, **kwargs).arguments
        except TypeError as exc:
            raise PermissionError(f"{identity}: {method} with bad arguments ({exc})") from None
        worker, host = given.get("worker"), given.get("host", identity.name)
        if not (isinstance(worker, str) and worker.startswith(f"{identity.name}-")) or host != identity.name:
            raise PermissionError(f"{identity} may act only as itself, not as worker {worker!r} on {host!r}")

    # -- workers ---------------------------------------------------------------------

    def hello(self, worker: str, host: str, pid: int, concurrency: int, held=(), instance=None,
              protocol: int = 1, version=None) -> dict:
        """A worker (re)joins. `held`: task ids it still holds, leased from the ledger
        named `instance` (ids from another ledger are not claimed). `protocol` must be
        one this master serves (OLDEST_WORKER_PROTOCOL..PROTOCOL); `version`: the
        worker's build, shown in status (protocol 2 workers do not send it)."""
        if not (isinstance(protocol, int) and OLDEST_WORKER_PROTOCOL <= protocol <= PROTOCOL):
            log.warning("refused worker %s on %s: it speaks protocol %s, this master serves %s", worker, host,
                        protocol, _served())
            advice = ("upgrade the master first" if isinstance(protocol, int) and protocol > PROTOCOL
                      else "upgrade the worker")
            raise Incompatible(f"this master (taskfleet {__version__}) serves worker protocol {_served()}, the worker "
                               f"speaks {protocol}: {advice} (docs/operations.md, Version skew)")
        _check(isinstance(worker, str) and isinstance(host, str), "worker and host must be strings")
        held = [t for t in held if isinstance(t, int)] if instance == self.store.instance else []
        claimed = self.scheduler.join(worker, host, int(pid), int(concurrency), held)
        self._note_key(worker)
        version = clean(version, 64) if isinstance(version, str) else None
        self.builds[worker] = (version, protocol)
        log.info("worker %s joined from %s (taskfleet %s, protocol %s, pid %s, concurrency %s%s)", worker, host,
                 version or "unknown", protocol, pid, concurrency,
                 f", still holding {claimed} task(s)" if held else "")
        return {"worker_ttl": self.scheduler.worker_ttl, "max_payload": self.max_payload, "version": __version__,
                "instance": self.store.instance, "protocol": PROTOCOL}

    def heartbeat(self, worker: str) -> bool:
        """False: the master does not know this worker (it restarted): say hello again."""
        self._note_key(worker)
        return self.scheduler.touch(worker)

    def goodbye(self, worker: str) -> None:
        self.scheduler.leave(worker)
        self.worker_keys.pop(worker, None)
        log.info("worker %s left", worker)

    def _note_key(self, worker: str) -> None:
        """Remember which key the worker's call came with (status shows it: a key
        rotation checks every worker moved to the new key)."""
        if self.server is not None:
            self.worker_keys[worker] = self.server.caller_key()

    def lease(self, worker: str, limit: int, wait: float = 0.0) -> list:
        """Up to `limit` tasks, at most a fair share of the queue; may wait for work."""
        self._note_key(worker)
        if not self.scheduler.touch(worker) or self.scheduler.reclaiming():
            return []  # unknown (say hello), or just restarted: holders re-claim first
        if wait > 0 and not self.stopping:
            self.scheduler.wait_for_work(min(float(wait), MAX_WAIT))
        return self.scheduler.lease(worker, self.scheduler.fair_share(int(limit)))

    def complete(self, worker: str, host: str, outcomes: list, instance=None):
        """Outcomes: (task_id, ok, value_blob, error, duration). Returns results stored,
        or None if they come from another ledger's tasks (say hello again)."""
        if instance is not None and instance != self.store.instance:
            return None
        self.scheduler.touch(worker)
        checked = [self._outcome(worker, o) for o in _as_list(outcomes)]
        stored = self.scheduler.complete(worker, host, checked)
        if stored:
            self.completions.append((time.monotonic(), stored))
        self.telemetry.outcomes(checked)
        return stored

    def _reported(self, host, failed: list, finished: list) -> None:
        """After a report is stored (see Scheduler.on_report): one line per failed attempt
        and per finished job, never one per success."""
        try:
            for job_id, index, attempts, max_attempts, error in failed:
                error = first_line(error)
                log.info("job %s task %s failed on %s, attempt %d of %d%s: %s", job_id, index, clean(host), attempts,
                         max_attempts, "" if attempts >= max_attempts else ", to be retried", error)
                self.telemetry.failure(job_id, index, host, attempts, max_attempts, error)
            for job_id in finished:
                job = self.store.job(job_id)
                if job is not None:
                    log.info("job %s finished: %d done, %d failed of %d %s task(s) in %.1f s", job_id, job["done"],
                             job["failed"], job["total"], job["task"], max(0.0, time.time() - job["created"]))
        except Exception as exc:  # never fail a call that stored its results
            log.warning("cannot log a report: %s", exc)

    def _outcome(self, worker: str, outcome) -> tuple:
        """A well-formed outcome; a malformed one becomes a failed attempt that says why."""
        task_id = outcome[0] if isinstance(outcome, (tuple, list)) and outcome else None
        if not isinstance(task_id, int):
            return (-1, False, None, "malformed outcome", None)  # names no task: ignored
        problem = None
        if len(outcome) != 5:
            problem = f"{len(outcome)} fields instead of 5"
        else:
            _, ok, value, error, duration = outcome
            if ok and not isinstance(value, bytes):
                problem = f"a result of type {type(value).__name__} instead of a pickle"
            elif ok and len(value) > self.max_payload:
                problem = f"result is {len(value)} bytes, over the master's limit of {self.max_payload}"
            elif not ok and not isinstance(error, (str, type(None))):
                problem = "an error that is not text"
            elif duration is not None and not isinstance(duration, (int, float)):
                problem = "a duration that is not a number"
            else:
                return (task_id, bool(ok), value if ok else None, error if not ok else None, duration)
        log.warning("worker %s sent a malformed outcome for task %s: %s", worker, task_id, problem)
        return (task_id, False, None, f"malformed outcome from worker {worker}: {problem}", None)

    def release(self, worker: str, task_ids, instance=None) -> int:
        if instance is not None and instance != self.store.instance:
            return 0
        return self.scheduler.release(worker, [t for t in _as_list(task_ids) if isinstance(t, int)])

    # -- clients ---------------------------------------------------------------------

    def submit(self, key: str, task: str, args_list, first_index: int = 0, seal_total: int | None = None,
               timeout: float | None = None, retries: int | None = None) -> dict:
        """Store one chunk of a job (see Client.submit); with `seal_total` the job is
        complete and holds exactly that many tasks. Returns {"job": id, "instance":
        the ledger's}: a client sees if the master came back on a fresh ledger mid-upload."""
        _check(isinstance(key, str) and key, "a job needs a key")
        try:
            self.registry.get(task)
        except UnknownTask as exc:
            raise RejectedJob(str(exc)) from None
        if not isinstance(args_list, (list, tuple)):
            raise RejectedJob(f"a job's arguments must be a list of argument lists, got {type(args_list).__name__}")
        _check(isinstance(first_index, int) and first_index >= 0, "first_index must be an integer >= 0")
        _check(seal_total is None or (isinstance(seal_total, int) and seal_total >= 0),
               "seal_total must be an integer >= 0")
        timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        retries = DEFAULT_RETRIES if retries is None else int(retries)
        if not timeout > 0 or retries < 0:
            raise RejectedJob("timeout must be > 0 seconds and retries >= 0")
        blobs = []
        for offset, args in enumerate(args_list):
            try:
                self.registry.check_arguments(task, args)
                blob = pickle.dumps(tuple(args))
                if len(blob) > self.max_payload:
                    raise TypeError(f"arguments are {len(blob)} bytes, over the master's limit of {self.max_payload}")
            except TypeError as exc:
                # A job is accepted whole or not at all: drop the chunks that came before.
                job_id = self.store.job_id(key)
                dropped = self.scheduler.withdraw(job_id) if job_id else 0
                withdrawn = f" (the job's first {dropped} task(s) were withdrawn)" if dropped else ""
                raise RejectedJob(f"task {first_index + offset}: {exc}{withdrawn}") from None
            blobs.append(blob)
        job_id = self.scheduler.submit(key, task, timeout, retries + 1, first_index, blobs, seal_total)
        if seal_total is not None:
            log.info("job %s accepted: %d %s task(s)", job_id, seal_total, task)
        return {"job": job_id, "instance": self.store.instance}

    def withdraw(self, key: str) -> int:
        """Withdraw the unsealed job named by `key` (its client gave up). Returns its task count."""
        job_id = self.store.job_id(key)
        return self.scheduler.withdraw(job_id) if job_id else 0

    def job(self, job_id: int) -> dict:
        job = self.store.job(int(job_id))
        if job is None:
            raise LookupError(self._missing(int(job_id)))
        job["instance"] = self.store.instance
        return job

    def _missing(self, job_id: int) -> str:
        if self.store.first_job <= job_id <= self.store.highest_job():
            return (f"job {job_id} is no longer on this master: finished jobs are kept for "
                    f"{self.retention / 86400:g} day(s) and {self.max_jobs} at most (--retention, --max-jobs), "
                    f"and a job whose upload was abandoned or refused is withdrawn")
        return f"no job {job_id} on this master"

    def results(self, job_id: int, after: int = 0, limit: int = 1000, wait: float = 0.0,
                failed_only: bool = False) -> dict:
        """Results of a job after sequence number `after` (a page bounded in count and
        bytes), the job's counts and the ledger's instance. With `wait`, blocks up to
        that long for at least one new result. With `failed_only`, only the failures,
        and "next": the sequence number read up to (ask again after it: a page may hold
        none)."""
        after, limit = int(after), max(1, min(int(limit), 10000))
        scheduler = self.scheduler
        changes = scheduler.changes  # read before looking: a commit from now on ends the wait below at once
        job = self.job(job_id)
        rows, scanned = self._results_page(job, after, limit, failed_only)
        deadline = time.monotonic() + min(float(wait), MAX_WAIT)
        while not rows and scanned == after and not job["finished"] and not self.stopping \
                and time.monotonic() < deadline:
            with scheduler.changed:
                scheduler.changed.wait_for(lambda seen=changes: scheduler.changes != seen,
                                           timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                changes = scheduler.changes
            job = self.job(job_id)  # before the rows: a job read finished has all its results in them
            rows, scanned = self._results_page(job, after, limit, failed_only)
        reply = {"rows": rows, "job": job, "instance": self.store.instance}
        if failed_only:
            reply["next"] = scanned
        return reply

    def _results_page(self, job: dict, after: int, limit: int, failed_only: bool) -> tuple:
        """(rows, the last sequence number read)."""
        if failed_only and job["finished"] and not job["failed"]:
            return [], after
        rows = self.store.results(job["id"], after, limit)
        if not failed_only:
            return rows, rows[-1][0] if rows else after
        for _ in range(FAILED_SCAN_PAGES):
            if not rows:
                break
            after = rows[-1][0]
            failed = [row for row in rows if not row[2]]
            if failed:
                return failed, after
            rows = self.store.results(job["id"], after, limit)
        return [], after

    def forget(self, host: str) -> int:
        """Forget the workers of `host` (an operator removed it): they leave status. Refused
        (ValueError) while one of them is connected: stop it first. Any task one still held
        is pending again, as for a lost worker. Returns how many were forgotten."""
        _check(isinstance(host, str) and host, "forget needs a host name")
        mine = [w for w in self.store.workers() if w["host"] == host]
        alive = [w["id"] for w in mine if w["id"] in self.scheduler.seen]
        if alive:
            raise ValueError(f"worker {alive[0]} on {host} is still connected: stop it first")
        gone = [w["id"] for w in mine if w["state"] != "left"]
        for worker in gone:
            self.scheduler.leave(worker)
        log.info("forgot %d worker(s) of host %s", len(gone), host)
        return len(gone)

    def status(self) -> dict:
        now, mono = time.time(), time.monotonic()
        rows = self.store.workers()
        seen = dict(self.scheduler.seen)
        newest_alive = {}  # host -> start time of its newest live worker
        for w in rows:
            w["alive"] = w["id"] in seen
            w["version"], w["protocol"] = self.builds.get(w["id"], (None, None))
            if w["alive"]:
                newest_alive[w["host"]] = max(newest_alive.get(w["host"], 0.0), w["started"] or 0.0)
                w["last_seen_ago"] = round(mono - seen[w["id"]], 1)
            else:
                w["last_seen_ago"] = round(now - w["last_seen"], 1) if w["last_seen"] else None
            w["key"] = self.worker_keys.get(w["id"]) if w["alive"] else None
        # History is not the fleet: workers that left, were lost long ago, or were
        # replaced by a newer worker on the same host are left out.
        workers = [
            w for w in rows
            if w["alive"] or (w["state"] == "lost" and (w["last_seen_ago"] or 0) < STATUS_LOST_FOR
                              and (w["started"] or 0) > newest_alive.get(w["host"], 0.0))
        ]
        window = min(THROUGHPUT_WINDOW, max(1.0, now - self.started))
        recent = sum(n for t, n in list(self.completions) if t >= mono - window)
        return {
            "master": {"address": self.address, "version": __version__, "protocol": PROTOCOL,
                       "worker_protocols": [OLDEST_WORKER_PROTOCOL, PROTOCOL], "pid": os.getpid(),
                       "uptime": round(now - self.started, 1), "state": str(self.store.path),
                       "durability": self.store.durability, "instance": self.store.instance,
                       "metrics": self.metrics_address},
            "tasks": self.scheduler.counts(),
            "throughput": round(recent / window, 1),
            "workers": workers,
            "rejected": self.server.rejected_peers() if self.server else [],
            # Fingerprints (wire.fingerprint), never keys: the ring in the file's order, and
            # the key this status call came with.
            "keyring": {"ring": list(self.server.key_ids), "caller": self.server.caller_key()}
            if self.server else None,
        }

    # -- upkeep ----------------------------------------------------------------------

    def upkeep(self) -> None:
        """Once a second: lose silent workers; every HOUSEKEEPING_EVERY s: withdraw
        abandoned uploads, prune finished jobs past retention, forget old workers.
        A storage failure is logged and tried again next time."""
        for worker, silent in self.scheduler.silent():
            try:
                held = self.scheduler.lose(worker)
            except StorageError as exc:
                log.error("cannot record that worker %s was lost: %s", worker, exc)
                continue
            log.warning("worker %s lost: silent for %.0f s; %d task(s) it held are pending again",
                        worker, silent, held)
            self.worker_keys.pop(worker, None)
            self.telemetry.leases_expired += held
        self.scheduler.end_reclaim()
        self.telemetry.sample(self)
        mono = time.monotonic()
        while self.completions and self.completions[0][0] < mono - THROUGHPUT_WINDOW:
            self.completions.popleft()
        if mono - self.housekept < HOUSEKEEPING_EVERY:
            return
        self.housekept = mono
        try:
            for job_id in self.scheduler.expire_unsealed(UNSEALED_TTL):
                log.warning("job %s withdrawn: its upload stopped over %.0f s ago and was never completed", job_id,
                            UNSEALED_TTL)
            pruned = self.store.prune(time.time() - self.retention, self.max_jobs)
            if pruned:
                log.info("pruned %d finished job(s) past retention", len(pruned))
            self.store.forget_workers(time.time() - STATUS_LOST_FOR)
            kept = {w["id"] for w in self.store.workers()}
            self.builds = {w: build for w, build in self.builds.items() if w in kept}
        except StorageError as exc:
            log.error("housekeeping postponed: %s", exc)


def _served() -> str:
    return str(PROTOCOL) if OLDEST_WORKER_PROTOCOL == PROTOCOL else f"{OLDEST_WORKER_PROTOCOL} to {PROTOCOL}"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _as_list(value) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return list(value)


# The worker calls' signatures, read once: `authorize` binds every worker call's arguments.
_SIGNATURES = {name: inspect.signature(getattr(Master, name)) for name in WORKER_CALLS}


def _classic_authorize(identity, method, args, kwargs) -> None:
    if identity.role not in CLASSIC_ROLES:
        raise PermissionError(f"{identity} may not use the tutorial's queues")


def run_master(listen: tuple[str, int], authkey, state_dir: str, tasks_modules=(),
               worker_ttl: float = 10.0, max_payload: int = DEFAULT_MAX_PAYLOAD, durability: str = "full",
               retention: float = DEFAULT_RETENTION, max_jobs: int = DEFAULT_MAX_JOBS,
               metrics_listen: tuple[str, int] | None = None, tls=None,
               plain_listen: tuple[str, int] | None = None) -> int:
    """Serve until SIGTERM/SIGINT. `tls` (node.tls.TLS, server side): `listen` speaks
    only TLS; `plain_listen` then serves the tutorial's queues, and only them, in
    plaintext (authkey only) for unchanged tutorial scripts."""
    registry = Registry(tasks_modules)
    store = Store(state_dir, durability)
    scheduler = Scheduler(store, worker_ttl)
    master = Master(store, scheduler, registry, max_payload=max_payload, address=format_address(listen),
                    retention=retention, max_jobs=max_jobs)
    classic = [Service(name, queue.Queue(CLASSIC_QUEUE_SIZE), CLASSIC_METHODS, typeid=f"get_{name}", drain=False,
                       authorize=_classic_authorize)
               for name in ("task_queue", "result_queue")]
    server = Server(listen, authkey, [Service("master", master, frozenset(WORKER_CALLS + CLIENT_CALLS + ADMIN_CALLS),
                                              "get_master",
                                              authorize=master.authorize), *classic], tls=tls)
    plain = Server(plain_listen, authkey, classic) if plain_listen is not None else None
    master.server = server
    master.telemetry.enabled = metrics_listen is not None
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    log.info("taskfleet master %s listening on %s%s, state in %s (durability %s), %d task(s) queued, tasks: %s",
             __version__, format_address(server.address), f" (TLS, files in {tls.directory})" if tls else "",
             store.path, durability, scheduler.queued, ", ".join(registry.names()))
    if plain is not None:
        plain.start()
        log.warning("serving the tutorial's queues in PLAINTEXT on %s: anyone on that path can read and inject "
                    "their items", format_address(plain.address))
    metrics = serve_metrics(master, metrics_listen) if metrics_listen is not None else None
    systemd.notify("READY=1", f"STATUS=serving on {format_address(server.address)}")
    while not stop.wait(1.0):
        try:
            server.refresh_keys()  # a key removed from the file: its connections are cut within a second
            master.upkeep()
        except Exception:
            log.exception("upkeep failed")
        if server.thread.is_alive():
            systemd.notify("WATCHDOG=1")
    systemd.notify("STOPPING=1")
    master.stopping = True
    if metrics is not None:
        metrics.stop()
    scheduler.halt()  # long polls return now
    server.stop()
    if plain is not None:
        plain.stop()
    store.close()
    log.info("stopped; state kept in %s", store.path)
    return 0
