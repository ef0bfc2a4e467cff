"""Shared fixtures for the node agents' tests: real masters and workers on 127.0.0.1.

Every process is started in its own session (process group) and killed by its group id
at teardown; ports come from binding port 0; state, keys and logs live in tmp dirs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import browser  # noqa: F401 - the fixture of test_dashboard.py
from tests.waiting import wait_for  # noqa: F401 - the tests import it from here

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
HERE = Path(__file__).resolve().parent
TEST_TASKS = HERE / "extra_tasks.py"  # tests-only tasks module (crash, big results...)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_key(path: Path, key: bytes = b"s3cret-agents-key", mode: int = 0o600) -> Path:
    path.write_bytes(key)
    path.chmod(mode)
    return path


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFLEET_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Proc:
    """A started agent: its Popen, its log file (stdout+stderr) and its process group."""

    def __init__(self, popen: subprocess.Popen, log: Path, name: str):
        self.popen = popen
        self.log = log
        self.name = name
        self.pgid = popen.pid  # start_new_session: the group id is the leader's pid

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill_group(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.pid}) still running after {timeout:g} s:\n"
                                 f"{self.text()[-3000:]}") from None


class Agents:
    """Starts masters, workers and CLI commands for one test; kills them all at teardown."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.key = write_key(tmp / "authkey")
        self.procs: list[Proc] = []
        self.counter = 0
        self.port = None
        self.state_dir = tmp / "state"
        self.tls: dict[str, Path] | None = None  # role -> TLS dir (see test_tls.py); None: plaintext

    @property
    def master_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, argv: list, env: dict | None = None, python: str = PYTHON, preexec=None) -> Proc:
        self.counter += 1
        log = self.tmp / f"{self.counter:02d}-{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen([python, *argv], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=str(ROOT), env=env or base_env(), start_new_session=True,
                                     preexec_fn=preexec)
        proc = Proc(popen, log, name)
        self.procs.append(proc)
        return proc

    def start_master(self, *extra, port: int | None = None, state_dir: Path | None = None, wait: bool = True,
                     entry: list | None = None, python: str = PYTHON, ttl: float = 3.0, preexec=None) -> Proc:
        self.port = port or self.port or free_port()
        state = state_dir or self.state_dir
        argv = [*(entry or ["-m", "node"]), "master", "--listen", self.master_address, "--state-dir", str(state),
                "--authkey-file", str(self.key), "--worker-ttl", str(ttl), *self._tls_args("master"), *extra]
        proc = self._spawn("master", argv, python=python, preexec=preexec)
        if wait:
            self.wait_serving(proc)
        return proc

    def wait_serving(self, proc: Proc, timeout: float = 30.0) -> None:
        def up():
            if not proc.alive():
                raise AssertionError(f"master exited with {proc.popen.returncode}:\n{proc.text()}")
            return "listening on" in proc.text() and self.try_status() is not None

        wait_for(up, timeout, "the master to accept connections")

    def start_worker(self, *extra, concurrency: int = 1, entry: list | None = None, python: str = PYTHON,
                     key: Path | None = None) -> Proc:
        argv = [*(entry or ["-m", "node"]), "worker", "--master", self.master_address,
                "--authkey-file", str(key or self.key), "--concurrency", str(concurrency), *self._tls_args("worker"),
                *extra]
        return self._spawn("worker", argv, python=python)

    def cli(self, *args, env: dict | None = None, timeout: float = 60.0, input: str | None = None,
            entry: list | None = None, python: str = PYTHON, with_master: bool = True) -> subprocess.CompletedProcess:
        argv = [python, *(entry or ["-m", "node"]), *args]
        if with_master and args and args[0] in ("submit", "status", "results", "forget"):
            argv += ["--master", self.master_address, "--authkey-file", str(self.key),
                     *self._tls_args("admin" if args[0] == "forget" else "client")]
        return subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT), env=env or base_env(),
                              timeout=timeout, input=input)

    def _tls_args(self, role: str) -> list:
        return ["--tls-dir", str(self.tls[role])] if self.tls else []

    # -- talking to the master in-process ------------------------------------------------

    def client(self, retry_for: float = 60.0, role: str = "client"):
        from node.client import Client

        return Client.connect(self.master_address, str(self.key), retry_for=retry_for,
                              tls=self.tls[role] if self.tls else None)

    def try_status(self):
        from node.client import Client
        from node.config import read_authkey

        client = Client(self.master_address, read_authkey(str(self.key)), retry_for=0,
                        tls=self.tls["client"] if self.tls else None)
        try:
            return client.status()
        except Exception:
            return None
        finally:
            client.close()

    def status(self) -> dict:
        status = self.try_status()
        assert status is not None, "the master does not answer"
        return status

    def alive_workers(self) -> list:
        status = self.try_status()
        return [w for w in status["workers"] if w["alive"]] if status else []

    def wait_workers(self, n: int, timeout: float = 30.0) -> list:
        return wait_for(lambda: len(self.alive_workers()) >= n and self.alive_workers(), timeout,
                        f"{n} worker(s) to join")

    def done_by_worker(self) -> dict:
        return {w["pid"]: w["done"] for w in self.status()["workers"]}

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.kill_group(signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
            # children left behind in the group (a pool process whose agent died)
            proc.kill_group(signal.SIGKILL)


@pytest.fixture
def agents(tmp_path):
    f = Agents(tmp_path)
    try:
        yield f
    finally:
        f.cleanup()


def json_lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_exactly_once(results, total: int) -> None:
    """One result per task index 0..total-1, no duplicate, no gap."""
    indices = [r.index if hasattr(r, "index") else r["task"] for r in results]
    assert len(indices) == total, f"{len(indices)} results for {total} tasks"
    assert sorted(indices) == list(range(total))
