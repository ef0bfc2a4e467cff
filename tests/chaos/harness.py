"""The chaos tier's harness: a round is a real master, workers and clients on 127.0.0.1,
faults injected at points drawn from a seeded random.Random, then the invariants.

Contract of a Round:
- every process it starts runs in its own session (process group) and carries
  TASKFLEET_CHAOS_RUN=<the round's uuid> in its environment, pool processes included;
- every wait has a bound, and its message names the seed and what it waited for;
- what breaks an invariant is collected in `violations` (not raised), so a round
  reports everything it saw; setup failures (a master that never serves) raise;
- teardown stops everything gracefully (SIGTERM: exit 0 expected), then scans /proc
  for processes still tagged (a leak), and kills what is left by pid and group id.

Submission k's task i is `square(k * STRIDE + i)`: every result says which job and
which index it belongs to, so results that land on the wrong job or task are caught.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from functools import partial
from pathlib import Path

from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
RUN_VAR = "TASKFLEET_CHAOS_RUN"
STRIDE = 1_000_000  # more than any job's task count
MIN_TASKS, MAX_TASKS = 20_000, 100_000  # a big submit spans many 5,000-task chunks
WORKERS, CONCURRENCY, WORKER_TTL = 3, 2, 2

START_TIMEOUT = 30.0  # a master to serve, workers to join
SUBMIT_TIMEOUT = 90.0  # the client retries a lost master for 60 s
FINISH_TIMEOUT = 60.0  # every job to finish while workers are alive
READ_TIMEOUT = 60.0  # one `results` command
RPC_TIMEOUT = 15.0  # one call of the in-process client
MASTER_STOP_TIMEOUT = 30.0  # SIGTERM to exit
WORKER_STOP_TIMEOUT = 45.0  # SIGTERM: drain (30 s at most) and leave
LEAK_GRACE = 5.0  # orphaned pool processes notice their agent is gone within ~1 s


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def submit_seconds(n: int) -> float:
    """Roughly how long `submit` of n tasks takes here (start-up included): the window
    in which a fault lands 'during a submit'."""
    return 0.25 + n * 4e-6


def plain_error(stderr: str) -> str | None:
    """None if stderr is one line of 'taskfleet: error: ...', else what is wrong with it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback" in stderr:
        return "a traceback"
    if len(lines) != 1 or not lines[0].startswith("taskfleet: error:"):
        return f"{len(lines)} line(s), not one 'taskfleet: error:' line"
    return None


def tagged_processes(run_id: str) -> list[int]:
    """Pids of live (not zombie) processes whose environment carries RUN_VAR=run_id."""
    needle = f"{RUN_VAR}={run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ and state != b"Z":
            found.append(int(entry))
    return found


def describe_pid(pid: int) -> str:
    """'pid (command line)' for messages."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        return f"{pid} ({command[:120]})"
    except OSError:
        return str(pid)


def limit_files(soft: int) -> None:
    """In a child before exec: at most `soft` open files (the hard limit is kept)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def fill_disk(path: Path) -> int:
    """Write `path` until its file system says ENOSPC; return the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as handle:
        for size in (1 << 20, 1 << 12):
            block = b"\0" * size
            while True:
                try:
                    written += handle.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


class Agent:
    """A process the round started (master, worker, hostile peers): its Popen, its log
    (stdout and stderr), its session. `stopped` is set when the round stops it on purpose."""

    def __init__(self, name: str, popen: subprocess.Popen, log: Path):
        self.name, self.popen, self.log = name, popen, log
        self.stopped = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 12) -> str:
        return "\n".join("    | " + line for line in self.text().splitlines()[-lines:])

    def signal(self, sig: int, group: bool = True) -> None:
        """Send `sig` to the process (or its whole group); a process already gone is fine."""
        try:
            os.killpg(self.pid, sig) if group else os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int | None:
        """Its exit code, or None if it is still running after `timeout` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


class Cli(Agent):
    """A CLI command run in the background; a watcher thread stamps when it exited."""

    def __init__(self, name: str, popen: subprocess.Popen, log: Path, out: Path):
        super().__init__(name, popen, log)
        self.out = out
        self.started = time.monotonic()
        self.finished: float | None = None  # monotonic time of exit
        self.timed_out = False  # killed for running too long: no exit code counts
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        self.popen.wait()
        self.finished = time.monotonic()

    def join(self, timeout: float) -> bool:
        """True once it has exited (within `timeout` seconds)."""
        self.watcher.join(timeout)
        return self.finished is not None

    @property
    def rc(self) -> int | None:
        return self.popen.returncode if self.finished is not None and not self.timed_out else None

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    @property
    def stderr(self) -> str:
        return self.text()


class Submission(Cli):
    """`submit square --args-file` of n tasks: the round's k-th submission."""

    k: int
    n: int

    @property
    def job_id(self) -> int | None:
        text = self.stdout.strip()
        return int(text) if self.rc == 0 and text.isdigit() else None


class Reader(Cli):
    """`results JOB --json --wait` following a job (of submission `sub`) through faults."""

    sub: Submission
    job: int


class Round:
    """One chaos round; see the module docstring for its contract."""

    def __init__(self, seed: int, number: int, tmp: Path, fault: str, replay: str):
        self.seed, self.number, self.tmp, self.fault, self.replay = seed, number, tmp, fault, replay
        self.rng = random.Random(f"chaos-{seed}")  # faults draw their points from it, in a fixed order
        self.run_id = uuid.uuid4().hex
        self.key = tmp / "authkey"
        self.key.write_bytes(b"chaos-" + uuid.uuid4().hex.encode())
        self.key.chmod(0o600)
        self.port = free_port()
        self.nofile: int | None = None  # a soft RLIMIT_NOFILE for the master, if set
        self.epoch = 0  # state dirs used so far - 1
        self.state_dir = tmp / "state-0"
        self.masters: list[Agent] = []
        self.workers: list[Agent] = []
        self.others: list[Agent] = []  # hostile peers
        self.submissions: list[Submission] = []
        self.readers: list[Reader] = []
        self.reported: set = set()  # submissions whose exit is noted
        self.swaps: list[tuple[float, float]] = []  # (stop sent, back up) of each move to a fresh state dir
        self.mounts: list[Path] = []
        self.violations: list[str] = []
        self.timeline: list[str] = []
        self.counter = 0
        self.t0 = time.monotonic()

    # -- bookkeeping -------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def master(self) -> Agent:
        return self.masters[-1]

    def note(self, text: str) -> None:
        self.timeline.append(f"{time.monotonic() - self.t0:7.2f}s  {text}")

    def violate(self, text: str) -> None:
        self.note(f"VIOLATION: {text}")
        self.violations.append(text)

    def timeout_message(self, seconds: float, what: str) -> str:
        return f"seed {self.seed}: timed out after {seconds:g} s waiting for {what}"

    def wait_for(self, condition, timeout: float, what: str, interval: float = 0.05):
        """tests.waiting.wait_for, its message naming the round's seed."""
        return wait_for(condition, timeout, what, interval, prefix=f"seed {self.seed}: ")

    def expect(self, condition, timeout: float, what: str):
        """As wait_for, but a timeout is recorded as a violation; returns the value or None."""
        try:
            return self.wait_for(condition, timeout, what)
        except AssertionError as exc:
            self.violate(str(exc))
            return None

    def bounded(self, fn, timeout: float, what: str):
        """fn() in a helper thread: its value, or AssertionError after `timeout` (the call
        may be stuck in a socket: the thread is left to the transport's own timeouts)."""
        box = {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise AssertionError(self.timeout_message(timeout, what))
        if "error" in box:
            raise box["error"]
        return box.get("value")

    # -- processes -----------------------------------------------------------------------

    def env(self) -> dict:
        """The environment of every process the round starts: no TASKFLEET_* from ours, the tag."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFLEET_")}
        env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **{RUN_VAR: self.run_id})
        return env

    def _popen(self, name: str, argv: list, stdout=None, nofile: int | None = None):
        """Start argv in its own session, tagged. stdout: a Path, subprocess.PIPE, or None (the
        log); nofile: a soft RLIMIT_NOFILE for it. -> (popen, log of stderr)."""
        self.counter += 1
        log = self.tmp / f"{self.counter:02d}-{name}.log"
        with open(log, "wb") as err, open(stdout if isinstance(stdout, Path) else os.devnull, "wb") as out:
            target = out if isinstance(stdout, Path) else stdout if stdout is not None else err
            popen = subprocess.Popen(argv, stdout=target, stderr=err, stdin=subprocess.DEVNULL, cwd=str(ROOT),
                                     env=self.env(), start_new_session=True,
                                     preexec_fn=partial(limit_files, nofile) if nofile else None)
        return popen, log

    def spawn(self, name: str, argv: list, nofile: int | None = None) -> Agent:
        popen, log = self._popen(name, [PYTHON, *argv], nofile=nofile)
        return Agent(name, popen, log)

    def _cli_argv(self, *args) -> list:
        return [PYTHON, "-m", "node", *args, "--master", self.address, "--authkey-file", str(self.key)]

    def start_master(self, fresh: bool = False) -> Agent:
        """A master on the round's port; with `fresh`, on a new empty state dir. Waits until it serves."""
        if fresh:
            self.epoch += 1
            self.state_dir = self.state_dir.parent / f"state-{self.epoch}"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        master = self.spawn("master", ["-m", "node", "master", "--listen", self.address, "--state-dir",
                                       str(self.state_dir), "--authkey-file", str(self.key),
                                       "--worker-ttl", str(WORKER_TTL)], nofile=self.nofile)
        self.masters.append(master)

        def serving():
            if not master.alive():
                raise AssertionError(f"seed {self.seed}: the master exited with {master.popen.returncode}:\n"
                                     f"{master.tail(30)}")
            return "listening on" in master.text() and self.try_status() is not None

        self.wait_for(serving, START_TIMEOUT, f"the master (pid {master.pid}) to serve on {self.address}")
        limit = f", RLIMIT_NOFILE {self.nofile}" if self.nofile else ""
        self.note(f"master pid {master.pid} serving, state dir {self.state_dir.name}{limit}")
        return master

    def _stop(self, agent: Agent, how: str, timeout: float, what: str) -> None:
        """how: 'kill' (kill -9 of its whole group) or 'term' (SIGTERM to the agent: it
        must exit 0 within `timeout`, else that is a violation and it is killed)."""
        agent.stopped = True
        if how == "kill":
            agent.signal(signal.SIGKILL)
            agent.wait(10)
            self.note(f"{what} pid {agent.pid} killed -9 (its group)")
            return
        agent.signal(signal.SIGTERM, group=False)
        code = agent.wait(timeout)
        self.note(f"{what} pid {agent.pid} SIGTERM: exit {code}")
        if code != 0:
            self.violate(f"{what} pid {agent.pid} exited with {code} on SIGTERM (0 expected within {timeout:g} s):\n"
                         f"{agent.tail()}")
            agent.signal(signal.SIGKILL)
            agent.wait(10)

    def stop_master(self, how: str) -> None:
        self._stop(self.master, how, MASTER_STOP_TIMEOUT, "the master")

    def restart_master(self, how: str, pause: float, fresh: bool = False) -> Agent:
        """Stop the master (see stop_master), wait `pause` s, start it again on the same port."""
        sent = time.monotonic()
        self.stop_master(how)
        time.sleep(pause)
        master = self.start_master(fresh=fresh)
        if fresh:
            self.swaps.append((sent, time.monotonic()))
        return master

    def start_worker(self, wait: bool = True) -> Agent:
        """A worker (--concurrency 2); with `wait`, until the master lists it alive (raises if not)."""
        worker = self.spawn("worker", ["-m", "node", "worker", "--master", self.address, "--authkey-file",
                                       str(self.key), "--concurrency", str(CONCURRENCY)])
        self.workers.append(worker)
        self.note(f"worker pid {worker.pid} started")
        if wait:
            self.wait_for(lambda: worker.pid in self.joined_pids(), START_TIMEOUT,
                          f"worker pid {worker.pid} to join the master")
        return worker

    def joined_pids(self) -> set:
        """Pids of the workers the master lists alive (empty if it does not answer)."""
        status = self.try_status()
        return {w["pid"] for w in status["workers"] if w["alive"]} if status else set()

    def live_workers(self) -> list[Agent]:
        return [w for w in self.workers if not w.stopped and w.alive()]

    def stop_worker(self, worker: Agent, how: str) -> None:
        self._stop(worker, how, WORKER_STOP_TIMEOUT, "worker")

    def fleet_up(self) -> None:
        """A master and WORKERS workers, all joined."""
        self.start_master()
        started = [self.start_worker(wait=False) for _ in range(WORKERS)]
        self.wait_for(lambda: {w.pid for w in started} <= self.joined_pids(), START_TIMEOUT,
                      f"{WORKERS} workers to join the master")

    # -- clients -------------------------------------------------------------------------

    def client(self, retry_for: float = 0.0):
        from node.client import Client

        return Client.connect(self.address, authkey_file=str(self.key), retry_for=retry_for)

    def try_status(self, timeout: float = 10.0) -> dict | None:
        """The master's status, or None if it does not answer (within `timeout`)."""
        def call():
            with self.client() as client:
                return client.status()

        try:
            return self.bounded(call, timeout, "a status call")
        except Exception:
            return None

    def submit(self, n: int, wait: bool = True) -> Submission:
        """Submit n `square` tasks with the CLI (--args-file); with `wait`, until it exits."""
        k = len(self.submissions)
        args = self.tmp / f"args-{k}.jsonl"
        args.write_text("".join(f"[{k * STRIDE + i}]\n" for i in range(n)))
        out = self.tmp / f"submit-{k}.out"
        popen, log = self._popen(f"submit-{k}", self._cli_argv("submit", "square", "--args-file", str(args)), out)
        sub = Submission(f"submit {k}", popen, log, out)
        sub.k, sub.n = k, n
        self.submissions.append(sub)
        self.note(f"submit {k} of {n} tasks started")
        if wait:
            self.finish_submission(sub)
        return sub

    def finish_submission(self, sub: Submission) -> None:
        """Wait (bounded) for a submit to exit; a hung one is killed and is a violation."""
        if sub.k in self.reported:
            return
        if not sub.join(SUBMIT_TIMEOUT):
            self.violate(self.timeout_message(SUBMIT_TIMEOUT, f"submit {sub.k} ({sub.n} tasks) to exit"))
            sub.timed_out = True
            sub.signal(signal.SIGKILL)
            sub.join(10)
        self.reported.add(sub.k)
        last = (sub.stdout.strip() or sub.stderr.strip() or "-").splitlines()[-1]
        self.note(f"submit {sub.k} exit {sub.rc}: {last[:200]}")

    def follow(self, sub: Submission) -> Reader:
        """Start `results JOB --json --wait` on a submission's job (which must have returned its id)."""
        out = self.tmp / f"follow-{sub.k}.out"
        popen, log = self._popen(f"follow-{sub.k}", self._cli_argv("results", str(sub.job_id), "--json", "--wait"),
                                 out)
        reader = Reader(f"results {sub.job_id} --wait", popen, log, out)
        reader.sub, reader.job = sub, sub.job_id
        self.readers.append(reader)
        self.note(f"following job {sub.job_id} (submit {sub.k}) with results --wait")
        return reader

    def stall(self, job_id: int) -> Agent:
        """`results JOB --json --wait` into a pipe nobody reads: a client with the key that
        stops reading its replies. Killed at teardown (or by the caller)."""
        popen, log = self._popen("stalled", self._cli_argv("results", str(job_id), "--json", "--wait"),
                                 stdout=subprocess.PIPE)
        agent = Agent(f"stalled reader of job {job_id}", popen, log)
        self.others.append(agent)
        self.note(f"stalled reader pid {popen.pid} on job {job_id}")
        return agent

    def command(self, name: str, args: list, timeout: float) -> Cli:
        """Run `python -m node ARGS --master ... --authkey-file ...` to its end; one still
        running after `timeout` is killed (then its rc is None)."""
        out = self.tmp / f"{name}-{self.counter + 1}.out"
        popen, log = self._popen(name, self._cli_argv(*args), out)
        cli = Cli(" ".join(args), popen, log, out)
        if not cli.join(timeout):
            cli.timed_out = True
            cli.signal(signal.SIGKILL)
            cli.join(10)
        return cli

    def results(self, job_id: int) -> tuple[int | None, list, str]:
        """`results JOB --json` now: (exit code or None if it hung, JSON rows, stderr).
        A hung command or a line that is not JSON is a violation."""
        cli = self.command(f"results-{job_id}", ["results", str(job_id), "--json"], READ_TIMEOUT)
        if cli.rc is None:
            self.violate(self.timeout_message(READ_TIMEOUT, f"`results {job_id} --json` to exit"))
            return None, [], cli.stderr
        return cli.rc, self.json_rows(cli, f"results {job_id}"), cli.stderr

    def job_info(self, job_id: int) -> dict | None:
        """The master's view of a job (total, sealed, done, failed, finished); None if it does
        not know the job or does not answer within RPC_TIMEOUT."""
        def call():
            with self.client(retry_for=5) as client:
                return client.job(job_id).progress()

        try:
            return self.bounded(call, RPC_TIMEOUT, f"job {job_id}'s progress")
        except Exception:
            return None

    def json_rows(self, cli: Cli, what: str) -> list:
        rows = []
        for line in cli.stdout.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                self.violate(f"`{what}` printed a line that is not JSON: {line[:120]!r}")
        return rows

    def progress(self, target: int, timeout: float = 30.0) -> dict | None:
        """Wait until the master counts at least `target` tasks done; its status, or None
        if that did not happen within `timeout` (not a violation: the fault just lands later)."""
        try:
            return self.wait_for(lambda: (s := self.try_status()) and s["tasks"]["done"] >= target and s,
                                 timeout, f"{target} tasks done")
        except AssertionError:
            self.note(f"{target} tasks not done within {timeout:g} s; going on")
            return None

    # -- disk ------------------------------------------------------------------------------

    def mount_tmpfs(self, megabytes: int) -> Path | None:
        """A tmpfs of that size at tmp/tmpfs (unmounted at teardown); None if mounting is not permitted."""
        path = self.tmp / "tmpfs"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            self.note(f"mount tmpfs failed: {done.stderr.strip()}")
            return None
        self.mounts.append(path)
        self.note(f"tmpfs of {megabytes} MB mounted at {path}")
        return path

    # -- invariants ------------------------------------------------------------------------

    def era(self, sub: Submission) -> str:
        """Which ledger a successful submit's reply came from: 'current', 'old' (a state dir
        the master has since lost) or 'either' (it exited while the master was moving)."""
        if not self.swaps or sub.finished is None:
            return "current"
        sent, up = self.swaps[-1]
        if sub.finished < sent:
            return "old"
        return "current" if sub.finished > up else "either"

    def check(self) -> None:
        """Every invariant of the round (see the README's chaos paragraph); violations collected."""
        for sub in self.submissions:
            self.finish_submission(sub)
            if sub.rc not in (0, None):
                self.check_plain_failure(f"submit {sub.k} ({sub.n} tasks)", sub.rc, sub.stderr)
            elif sub.rc == 0 and sub.job_id is None:
                self.violate(f"submit {sub.k} exited 0 without printing a job id: {sub.stdout[:200]!r}")
        self.check_agents()
        if not self.master.alive():
            return
        jobs = self.find_jobs()
        if jobs is None:
            return
        unfinished = self.wait_finished(jobs)
        owners = {}
        for job_id in sorted(jobs):
            owners[job_id] = self.check_job(job_id, jobs[job_id], job_id in unfinished)
        self.check_submissions(jobs, owners)
        self.check_readers(owners)
        self.check_accounting(jobs)

    def check_plain_failure(self, what: str, rc: int | None, stderr: str) -> None:
        """A failed command must exit 2 or 3 with one plain line on stderr."""
        if rc not in (2, 3):
            self.violate(f"{what} exited {rc} (a failure must exit 2 or 3):\n{stderr[-1500:]}")
        elif plain_error(stderr):
            self.violate(f"{what} exited {rc} with {plain_error(stderr)} on stderr, not one plain line:\n"
                         f"{stderr[-1500:]}")

    def check_agents(self) -> None:
        """The current master and every worker the round did not stop are alive."""
        for agent in [self.master, *self.workers]:
            if not agent.stopped and not agent.alive():
                self.violate(f"{agent.name} pid {agent.pid} exited by itself with {agent.popen.returncode}:\n"
                             f"{agent.tail()}")
        if not self.live_workers():
            self.violate("no worker is left alive")

    def find_jobs(self) -> dict | None:
        """{job id: info} of every job on the current master; None if it does not answer.
        A ledger's job ids are consecutive from a random start, so every job lies within
        a few ids of one a submit printed (check_accounting catches any other)."""
        printed = [s.job_id for s in self.submissions if s.job_id is not None]
        spread = len(self.submissions) + 3
        candidates = sorted({i for p in printed for i in range(max(1, p - spread), p + spread + 1)})

        def call():
            jobs = {}
            with self.client(retry_for=10) as client:
                for job_id in candidates:
                    try:
                        jobs[job_id] = client.job(job_id).progress()
                    except LookupError:
                        pass
            return jobs

        try:
            return self.bounded(call, RPC_TIMEOUT + len(candidates), "the master to list its jobs")
        except Exception as exc:
            self.violate(f"the master does not answer after the round: {type(exc).__name__}: {exc}")
            return None

    def wait_finished(self, jobs: dict) -> set:
        """Wait (FINISH_TIMEOUT) until every job is finished; the ids of those that are not (violations)."""
        pending = {job_id for job_id, info in jobs.items() if not info.get("finished")}
        deadline = time.monotonic() + FINISH_TIMEOUT
        while pending and time.monotonic() < deadline:
            time.sleep(0.2)
            for job_id in sorted(pending):
                info = self.job_info(job_id)
                if info is not None:
                    jobs[job_id] = info
                    if info.get("finished"):
                        pending.discard(job_id)
        for job_id in sorted(pending):
            info = jobs[job_id]
            self.violate(self.timeout_message(
                FINISH_TIMEOUT, f"job {job_id} to finish with {len(self.live_workers())} worker(s) alive "
                f"(total {info.get('total')}, sealed {info.get('sealed')}, done {info.get('done')}, "
                f"failed {info.get('failed')})"))
        return pending

    def check_job(self, job_id: int, info: dict, unfinished: bool) -> int | None:
        """Check one job's results: right values, each index once, its total that of its
        submission. Returns the submission k its tasks belong to (None if unknown)."""
        rc, rows, stderr = self.results(job_id)
        if rc is None:
            return None
        if rc != 0 and not unfinished:
            self.violate(f"`results {job_id} --json` exited {rc}:\n{stderr[-1500:]}")
        owners, wrong = Counter(), []
        for row in rows:
            k = self._owner(job_id, row, wrong)
            if k is not None:
                owners[k] += 1
        if wrong:
            self.violate(f"job {job_id}: {len(wrong)} wrong result(s): " + "; ".join(wrong[:5]))
        if len(owners) > 1:
            self.violate(f"job {job_id} holds results of several submissions: {dict(owners)}")
        if not owners:  # no right result at all: reported above, or it never ran (reported as unfinished)
            if not rows and not unfinished and info.get("total"):
                self.violate(f"job {job_id} is finished with {info.get('total')} tasks, `results` printed none")
            return None
        k = owners.most_common(1)[0][0]
        sub = self.submissions[k] if k < len(self.submissions) else None
        if sub is None:
            self.violate(f"job {job_id} holds results of submission {k}, which this round never made")
            return None
        if info.get("total") != sub.n:
            failed = f" (its submit exited {sub.rc}: a failed submit left a partial job)" if sub.rc else ""
            self.violate(f"job {job_id} holds {info.get('total')} tasks, submission {k} had {sub.n}{failed}")
        if not unfinished:
            self._check_exactly_once(f"job {job_id} (submit {k})", [row.get("task") for row in rows], sub.n)
        return k

    def _owner(self, job_id: int, row: dict, wrong: list) -> int | None:
        """The submission a result row belongs to (its value encodes it); problems go to `wrong`."""
        index = row.get("task")
        if row.get("job") != job_id:
            wrong.append(f"a row of job {row.get('job')} in job {job_id}'s results")
            return None
        if not row.get("ok"):
            wrong.append(f"task {index} failed: {str(row.get('error')).splitlines()[:1]}")
            return None
        value = row.get("result")
        arg = math.isqrt(value) if isinstance(value, int) and value >= 0 else -1
        if arg < 0 or arg * arg != value:
            wrong.append(f"task {index}: {value!r} is not a square")
            return None
        k, i = divmod(arg, STRIDE)
        if i != index:
            wrong.append(f"task {index} has the result of task {i} of submission {k}")
        return k

    def _check_exactly_once(self, what: str, indices: list, n: int) -> None:
        counts = Counter(indices)
        duplicates = sorted(i for i, c in counts.items() if c > 1)
        missing = n - sum(1 for i in counts if isinstance(i, int) and 0 <= i < n)
        stray = sorted(i for i in counts if not (isinstance(i, int) and 0 <= i < n))
        if duplicates or missing or stray:
            self.violate(f"{what}: {len(indices)} results for {n} tasks: {len(duplicates)} index(es) twice "
                         f"{duplicates[:5]}, {missing} missing, stray {stray[:5]}")

    def check_submissions(self, jobs: dict, owners: dict) -> None:
        """A submit that printed a job id: that job holds its tasks (already checked whole),
        or, when that ledger is gone, asking for it fails plainly and shows no results."""
        stored = Counter(k for k in owners.values() if k is not None)
        for k, count in stored.items():
            if count > 1:
                self.violate(f"submission {k} is stored as {count} jobs")
        for sub in self.submissions:
            if sub.job_id is None:
                continue
            era = self.era(sub)
            if era == "current" or (era == "either" and sub.k in stored):
                if sub.job_id not in jobs:
                    self.violate(f"submit {sub.k} printed job {sub.job_id}, the master has no such job")
                elif owners.get(sub.job_id) not in (sub.k, None):  # None: reported with the job
                    self.violate(f"submit {sub.k} printed job {sub.job_id}, which holds submission "
                                 f"{owners.get(sub.job_id)}'s tasks")
            else:
                self.check_gone(sub)

    def check_gone(self, sub: Submission) -> None:
        """Job of a ledger the master lost: `results JOB --json` must fail plainly, no rows."""
        rc, rows, stderr = self.results(sub.job_id)
        what = f"`results {sub.job_id} --json` for submit {sub.k}'s job (on the state dir the master lost)"
        if rows:
            self.violate(f"{what} exited {rc} and printed {len(rows)} results of another job (submission "
                         f"{self._owner(sub.job_id, rows[0], [])}) instead of a plain error")
        elif rc == 0:
            self.violate(f"{what} exited 0 instead of failing plainly")
        else:
            self.check_plain_failure(what, rc, stderr)

    def check_readers(self, owners: dict) -> None:
        """A `results --wait` that ran through the faults: whatever it printed is right and
        its job's, each index once; it ends with every result, or with a plain failure."""
        for reader in self.readers:
            if not reader.join(READ_TIMEOUT):
                self.violate(self.timeout_message(READ_TIMEOUT, f"`{reader.name}` to exit"))
                reader.timed_out = True
                reader.signal(signal.SIGKILL)
                reader.join(10)
                continue
            rows, wrong = self.json_rows(reader, reader.name), []
            ks = {self._owner(reader.job, row, wrong) for row in rows} - {None}
            if wrong or ks - {reader.sub.k}:
                self.violate(f"`{reader.name}` (submit {reader.sub.k}) printed wrong results: "
                             f"{'; '.join(wrong[:5])} submissions {sorted(ks)}")
            indices = [row.get("task") for row in rows]
            if reader.rc == 0:
                self._check_exactly_once(f"`{reader.name}`", indices, reader.sub.n)
                continue
            self.check_plain_failure(f"`{reader.name}`", reader.rc, reader.stderr)
            twice = sorted(i for i, c in Counter(indices).items() if c > 1)
            if twice:
                self.violate(f"`{reader.name}` (cut short) printed {len(twice)} index(es) twice: {twice[:5]}")

    def check_accounting(self, jobs: dict) -> None:
        """The master's counters agree with the jobs found: nothing queued or leased, no hidden job."""
        status = self.try_status()
        if status is None:
            self.violate("the master does not answer status after the round")
            return
        tasks = status["tasks"]
        total = sum(info.get("total") or 0 for info in jobs.values())
        counted = tasks["done"] + tasks["failed"] + tasks["queued"] + tasks["leased"]
        if tasks["jobs"] != len(jobs):
            self.violate(f"the master counts {tasks['jobs']} jobs, the ids near those printed are {sorted(jobs)} "
                         "(a hidden job, or job ids are no longer consecutive)")
        if counted != total:
            self.violate(f"the master counts {counted} tasks ({tasks}), its jobs hold {total}: "
                         "tasks that no job accounts for")
        elif (tasks["queued"] or tasks["leased"]) and all(info.get("finished") for info in jobs.values()):
            self.violate(f"tasks still queued or leased though every job is finished: {tasks}")

    # -- teardown --------------------------------------------------------------------------

    def teardown(self) -> None:
        """Stop everything the round started: hostile peers and commands by kill -9, workers
        and the master by SIGTERM (exit 0 expected); then tagged processes still alive are
        leaks (violations) and are killed; tmpfs mounts are unmounted."""
        for agent in self.others + self.submissions + self.readers:
            if agent.alive():
                agent.signal(signal.SIGKILL)
                agent.wait(10)
            if agent.popen.stdout is not None:
                agent.popen.stdout.close()
        live = [w for w in self.workers if w.alive()]
        for worker in live:
            worker.signal(signal.SIGTERM, group=False)
        for worker in live:
            code = worker.wait(WORKER_STOP_TIMEOUT)
            if code != 0 and not worker.stopped:
                self.violate(f"teardown: worker pid {worker.pid} exited with {code} on SIGTERM (0 expected):\n"
                             f"{worker.tail()}")
        for master in self.masters:
            if master.alive():
                master.signal(signal.SIGTERM, group=False)
                code = master.wait(MASTER_STOP_TIMEOUT)
                if code != 0:
                    self.violate(f"teardown: the master exited with {code} on SIGTERM (0 expected):\n"
                                 f"{master.tail()}")
        self._reap_leaks()
        for agent in self.masters + self.workers + self.others:
            agent.signal(signal.SIGKILL)  # whatever is left in their groups
            agent.wait(10)
        for path in self.mounts:
            if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)

    def _reap_leaks(self) -> None:
        deadline = time.monotonic() + LEAK_GRACE
        while tagged_processes(self.run_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        leaked = tagged_processes(self.run_id)
        if leaked:
            self.violate(f"{len(leaked)} process(es) of the round still alive {LEAK_GRACE:g} s after teardown: "
                         + ", ".join(describe_pid(pid) for pid in leaked))
        for pid in leaked:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def report(self) -> str:
        """The failure message: seed, replay command, violations, timeline, the master's log tail."""
        lines = [f"chaos round {self.number} seed {self.seed} ({self.fault}): {len(self.violations)} violation(s)",
                 f"replay: {self.replay}", ""]
        lines += [f"- {v}" for v in self.violations]
        lines += ["", "timeline:", *self.timeline, "", f"logs in {self.tmp}"]
        if self.masters:
            lines += [f"master pid {self.master.pid} log tail:", self.master.tail(20)]
        return "\n".join(lines)
