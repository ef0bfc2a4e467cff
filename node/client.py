"""Client API: submit jobs to a master and read their results.

    from node.client import Client
    with Client.connect("10.0.0.5:5000", authkey_file="/etc/taskfleet/authkey") as fleet:
        job = fleet.submit("square", [(n,) for n in range(100)])
        for result in job.results():          # as they arrive
            print(result.index, result.value, result.host)

A Client may be shared by threads; its calls survive a master restart (see Client).
"""

from __future__ import annotations

import pickle
import time
import uuid
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

from node import wire
from node.config import DEFAULT_MAX_PAYLOAD, format_address, parse_address
from node.errors import MasterUnavailable, StorageError
from node.tls import TLS

CHUNK_TASKS = 5000
CHUNK_BYTES = 4 * 1024 * 1024
RESULTS_PAGE = 1000
LINGER = 0.01  # seconds between result polls while a job runs


class PayloadTooLarge(ValueError):
    pass


@dataclass
class Result:
    job: int
    index: int
    ok: bool
    value: Any
    error: str | None
    host: str | None
    attempts: int
    duration: float | None

    def as_dict(self, task: str) -> dict:
        out = {"job": self.job, "task": self.index, "name": task, "ok": self.ok}
        if self.ok:
            out["result"] = self.value
        else:
            out["error"] = self.error
        out.update(host=self.host, attempts=self.attempts, duration=self.duration)
        return out


def _tls(tls) -> TLS | None:
    return tls if tls is None or isinstance(tls, TLS) else TLS(tls)


class Client:
    """Submit jobs and read results; safe to share between threads.

    Every call survives a master restart: on a lost connection (or a master that
    could not store, say a full disk) it is repeated for up to `retry_for` seconds.
    Calls are safe to repeat: each chunk of a job carries the job's key and its first
    index, and the master adds nothing twice."""

    def __init__(self, master, authkey, retry_for: float = 60.0, tls=None):
        self.address = parse_address(master) if isinstance(master, str) else tuple(master)
        self.caller = wire.Caller(self.address, authkey, tls=_tls(tls))
        self.retry_for = retry_for

    @classmethod
    def connect(cls, master: str, authkey_file: str, retry_for: float = 60.0, tls=None) -> Client:
        """A client whose master answered: fails now, clearly, if it is unreachable
        (MasterUnavailable) or the key or certificate is refused (AuthenticationError).
        `tls`: a directory of TLS files (see node/tls.py) or a TLS object; None for
        plaintext. Missing or bad TLS files raise TLSConfigError naming the file."""
        client = cls(master, wire.Keyring(authkey_file), retry_for, tls)
        client.caller.connect()
        return client

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.caller.close()

    def call(self, method: str, *args):
        """One call on the master, repeated while the master is away."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.2
        while True:
            try:
                return self.caller.call(method, *args)
            except (MasterUnavailable, StorageError):
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    # -- jobs ------------------------------------------------------------------------

    def submit(self, task: str, args_list, *, timeout: float | None = None, retries: int | None = None,
               max_payload: int = DEFAULT_MAX_PAYLOAD) -> Job:
        """Queue one task per item of `args_list` (each a list or tuple of arguments).

        Large jobs go in chunks; the job exists once its last chunk is acknowledged,
        with every task (the master checks the count). The master validates every task
        and refuses the job whole with a clear ValueError (unknown task, bad arguments,
        payload over its limit). If the upload fails midway the partial job is
        withdrawn (or expires on the master): it never runs half."""
        items = list(args_list)
        # Check every task before the first chunk goes: a job refused halfway would
        # have to be withdrawn.
        for index, args in enumerate(items):
            if not isinstance(args, (list, tuple)):
                raise ValueError(f"task {index}: arguments must be a list, got {type(args).__name__} {args!r:.60}")
        sizes = list(map(len, map(pickle.dumps, items)))  # loops in C: a big job of tiny tasks is quick to send
        if sizes and max(sizes) > max_payload:
            index = next(i for i, size in enumerate(sizes) if size > max_payload)
            raise PayloadTooLarge(f"task {index}: arguments are {sizes[index]} bytes, over the limit of {max_payload}")
        key = uuid.uuid4().hex
        reply = None
        try:
            for start, chunk in _chunks(items, sizes):
                final = start + len(chunk) >= len(items)
                answer = self.call("submit", key, task, chunk, start, len(items) if final else None, timeout, retries)
                if reply is not None and answer["instance"] != reply["instance"]:
                    raise LookupError(f"the master at {format_address(self.address)} was restarted on a new ledger "
                                      "(a fresh state dir) during the upload: the job is not there; submit it again")
                reply = answer
        except BaseException:  # a sealed job is never withdrawn: only a partial upload goes
            self._withdraw(key)
            raise
        return Job(self, reply["job"], task, reply["instance"])

    def _withdraw(self, key: str) -> None:
        """Best effort: drop a partly uploaded job now rather than when it expires."""
        try:
            self.caller.call("withdraw", key)
        except Exception:  # the master is away: it withdraws the job itself later
            pass

    def job(self, job_id: int) -> Job:
        """The job `job_id` (LookupError, with the reason, if the master has no such job)."""
        info = self.call("job", int(job_id))
        job = Job(self, info["id"], info["task"], info["instance"])
        job.info = info
        return job

    def status(self) -> dict:
        return self.call("status")


def _chunks(items: list, sizes: list):
    """(first index, items): consecutive chunks of at most CHUNK_TASKS tasks and about
    CHUNK_BYTES; one empty chunk for an empty job."""
    start = 0
    while True:
        end = min(len(items), start + CHUNK_TASKS)
        if sum(sizes[start:end]) > CHUNK_BYTES:  # large arguments: cut by bytes
            size, cut = sizes[start], start + 1
            while cut < end and size + sizes[cut] <= CHUNK_BYTES:
                size += sizes[cut]
                cut += 1
            end = cut
        yield start, items[start:end]
        start = end
        if start >= len(items):
            return


class Job:
    """A submitted job on the ledger named `instance`: results are read from that
    ledger only (a master restarted on a fresh state dir no longer has the job)."""

    def __init__(self, client: Client, job_id: int, task: str, instance: str):
        self.client = client
        self.id = job_id
        self.task = task
        self.instance = instance
        self.info: dict = {}

    def _same_ledger(self, instance: str) -> None:
        if instance != self.instance:
            raise LookupError(f"job {self.id} is gone: the master at {format_address(self.client.address)} "
                              "was restarted on a new ledger (a fresh state dir)")

    def results(self, wait: bool = True, poll: float = 5.0, failed_only: bool = False) -> Iterator[Result]:
        """Results in completion order (with `failed_only`, the failures only); with
        `wait`, until every task has one."""
        after = 0
        while True:
            call = ("results", self.id, after, RESULTS_PAGE, poll if wait else 0.0) + ((True,) if failed_only else ())
            reply = self.client.call(*call)
            self._same_ledger(reply["instance"])
            self.info = reply["job"]
            rows = reply["rows"]
            for seq, index, ok, value, error, host, attempts, duration in rows:
                after = seq
                yield Result(self.id, index, bool(ok), pickle.loads(value) if ok else None, error, host,
                             attempts, duration)
            skipped = reply.get("next", after) > after  # failed_only: read past results that were not failures
            after = max(after, reply.get("next", after))
            if not rows and not skipped and (self.info["finished"] or not wait):
                return
            info = self.info
            if wait and len(rows) < RESULTS_PAGE and info["total"] - info["done"] - info["failed"] > RESULTS_PAGE:
                time.sleep(LINGER)  # let results gather: fewer, fuller calls (near the end: no, ask at once)

    def wait(self) -> list[Result]:
        """Every result, in task order."""
        return sorted(self.results(), key=lambda r: r.index)

    def progress(self) -> dict:
        info = self.client.call("job", self.id)
        self._same_ledger(info["instance"])
        self.info = info
        return info
