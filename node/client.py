"""Client API: submit jobs to a master and read their results.

    from node.client import Client
    with Client.connect("10.0.0.5:5000", authkey_file="/etc/taskfleet/authkey") as fleet:
        job = fleet.submit("square", [(n,) for n in range(100)])
        for result in job.results():          # as they arrive
            print(result.index, result.value, result.host)

Calls survive a master restart: on a lost connection the client reconnects (fresh
manager and proxies) and repeats the call for up to `retry_for` seconds. Submitting is
safe to repeat: each chunk carries the job's key and its first index, and the master
adds nothing twice.
"""

from __future__ import annotations

import pickle
import time
import uuid
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from typing import Any
from collections.abc import Iterator

from node import transport
from node.config import DEFAULT_MAX_PAYLOAD, describe_error, format_address, parse_address, read_authkey
from node.transport import MasterUnavailable

CHUNK_TASKS = 5000
CHUNK_BYTES = 4 * 1024 * 1024
RESULTS_PAGE = 1000
LINGER = 0.02  # seconds between result polls while a job runs


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


class Client:
    def __init__(self, master, authkey: bytes, retry_for: float = 60.0):
        self.address = parse_address(master) if isinstance(master, str) else tuple(master)
        self.authkey = authkey
        self.retry_for = retry_for
        self._manager = self._fleet = None

    @classmethod
    def connect(cls, master: str, authkey_file: str, retry_for: float = 60.0) -> Client:
        client = cls(master, read_authkey(authkey_file), retry_for)
        client._ensure()  # fail now, clearly, if the master is unreachable or the key is wrong
        return client

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        transport.discard(self._fleet)
        self._manager = self._fleet = None

    def _ensure(self):
        if self._fleet is None:
            self._manager, self._fleet = transport.connect(self.address, self.authkey)
        return self._fleet

    def call(self, method: str, *args):
        """One call on the master's fleet service, reconnecting while the master is away."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.2
        while True:
            try:
                return getattr(self._ensure(), method)(*args)
            except AuthenticationError:
                raise
            except (OSError, EOFError) as exc:
                self.close()
                if time.monotonic() + delay > deadline:
                    if isinstance(exc, MasterUnavailable):
                        raise
                    raise MasterUnavailable(
                        f"lost the master at {format_address(self.address)}: {describe_error(exc)}"
                    ) from None
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    # -- jobs ------------------------------------------------------------------------

    def submit(self, task: str, args_list, *, timeout: float | None = None, retries: int | None = None,
               max_payload: int = DEFAULT_MAX_PAYLOAD) -> Job:
        """Queue one task per item of `args_list` (each a list or tuple of arguments).
        Large jobs go in chunks; the master validates every task and refuses the job
        whole with a clear ValueError (unknown task, bad arguments, payload over its
        limit): chunks it had accepted are withdrawn."""
        key = uuid.uuid4().hex
        items = list(args_list)
        # Check every task before the first chunk goes: a job refused halfway would leave
        # its first chunks queued (and the job never finished).
        sizes = []
        for index, args in enumerate(items):
            if not isinstance(args, (list, tuple)):
                raise ValueError(f"task {index}: arguments must be a list, got {type(args).__name__} {args!r:.60}")
            sizes.append(len(pickle.dumps(args)))
            if sizes[-1] > max_payload:
                raise PayloadTooLarge(
                    f"task {index}: arguments are {sizes[-1]} bytes, over the limit of {max_payload}"
                )
        job_id, start = None, 0
        while start < len(items) or job_id is None:
            chunk, size = [], 0
            for offset, args in enumerate(items[start:start + CHUNK_TASKS]):
                blob = sizes[start + offset]
                if chunk and size + blob > CHUNK_BYTES:
                    break
                chunk.append(args)
                size += blob
            final = start + len(chunk) >= len(items)
            job_id = self.call("submit", key, task, chunk, start, final, timeout, retries)
            start += len(chunk)
        return Job(self, job_id, task)

    def job(self, job_id: int) -> Job:
        info = self.call("job", int(job_id))
        if info is None:
            raise LookupError(f"no job {job_id} on the master at {format_address(self.address)}")
        return Job(self, info["id"], info["task"])

    def status(self) -> dict:
        return self.call("status")


class Job:
    def __init__(self, client: Client, job_id: int, task: str):
        self.client = client
        self.id = job_id
        self.task = task
        self.info: dict = {}

    def results(self, wait: bool = True, poll: float = 5.0) -> Iterator[Result]:
        """Results in completion order; with `wait`, until every task has one."""
        after = 0
        while True:
            reply = self.client.call("results", self.id, after, RESULTS_PAGE, poll if wait else 0.0)
            self.info = reply["job"]
            rows = reply["rows"]
            for seq, index, ok, value, error, host, attempts, duration in rows:
                after = seq
                yield Result(self.id, index, bool(ok), pickle.loads(value) if ok else None, error, host,
                             attempts, duration)
            if not rows and (self.info["finished"] or not wait):
                return
            if wait and len(rows) < RESULTS_PAGE:
                time.sleep(LINGER)  # let results gather: fewer, fuller calls

    def wait(self) -> list[Result]:
        """Every result, in task order."""
        return sorted(self.results(), key=lambda r: r.index)

    def progress(self) -> dict:
        self.info = self.client.call("job", self.id)
        return self.info
