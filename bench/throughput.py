"""End-to-end throughput of taskfleet against the multiprocessing.managers tutorial and Pool.

    python bench/throughput.py [--quick] [--cpu] [--history] [--million] [--json FILE] [--workers 1,2,4]

One run, on 127.0.0.1 only, measures tasks/s from the first submit to the last result
received, for tiny tasks (`square`) and 10 ms CPU tasks (`burn 10`), with N = 1, 2, 4
workers, for three systems:

- taskfleet: a durable master (`python -m node master`, fresh --state-dir in a temporary
  directory, the default --durability full: every commit fsynced) and N worker agents
  (`python -m node worker --concurrency 1`), driven by node.client.Client;
- taskfleet-fast: the same with `master --durability fast` (no fsync per commit);
- taskfleet-tls: taskfleet (durability full) with TLS 1.3 on every link, as a deployed
  fleet runs (certificates from a CA made for the run by ops/pki.py);
- tutorial: the classic multiprocessing.managers pattern, a BaseManager serving a task
  queue and a result queue, one `put` per task, N worker processes doing one `get` and
  one `put` per task;
- pool: multiprocessing.Pool(N).map (a default-style chunksize for tiny tasks, 1 for 10 ms ones).

Every measurement starts its own processes, waits until all workers are connected
(warm-up), times, and stops every process it started (by PID) even on errors.
`burn` busy-waits on the wall clock, so with more workers than CPUs a task still ends
10 ms after it started, preempted or not: above N = CPU count the 10 ms figures measure
scheduling, not CPU capacity.

`--cpu` measures the CPU overhead per task: 2,000 tasks of `sleep 0.01` (no CPU of their
own) on taskfleet (full and fast) and on a batched tutorial pattern (lists of 100 tasks per
put and get), with 1 and 2 workers of concurrency 1 and 2; the utime+stime (children's
included) of the master or manager, the worker agents and their pool processes, not of the
benchmark's client, divided by the tasks. `--history` submits one-task jobs to one master
with 2 workers and, after 2,000 and after 10,000 finished jobs, times a `status` call and
a 2,000-task job (tasks/s, the master's CPU per result): the ratios should be about 1.
`--million` also queues 1,000,000 tiny tasks on a master with no workers and reports the
master's RSS and ledger size, then times two workers draining them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from multiprocessing.managers import BaseManager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from node.client import Client  # noqa: E402
from node.tasks import BUILTIN  # noqa: E402

FULL = {"tiny": 20_000, "burn": 2_000, "cpu": 2_000, "history": (2_000, 10_000), "history_job": 2_000}
QUICK = {"tiny": 2_000, "burn": 200, "cpu": 200, "history": (200, 1_000), "history_job": 500}
BURN_MS = 10
WORKLOADS = {  # name -> (task name, args of task i)
    "tiny": ("square", lambda i: (i,)),
    "burn": ("burn", lambda i: (BURN_MS,)),
}
# taskfleet: --durability full (the default), plaintext; taskfleet-tls: the same over TLS
SYSTEMS = ("taskfleet", "taskfleet-fast", "taskfleet-tls", "tutorial", "pool")
READY_TIMEOUT = 30.0
CTX = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")


# -- helpers ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> dict:
    """VmRSS and VmHWM (peak) of a process, in KiB, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def _stop_popen(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def _stop_process(proc) -> None:
    if proc.pid is None:
        return
    proc.join(2)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _check(results: list, task: str, n: int) -> None:
    if len(results) != n:
        raise RuntimeError(f"{task}: got {len(results)} results for {n} tasks")
    if task == "square":
        bad = [i for i, v in enumerate(results) if v != i * i]
        if bad:
            raise RuntimeError(f"square: {len(bad)} wrong results, first at index {bad[0]}")


# -- taskfleet -------------------------------------------------------------------------

class Fleet:
    """A master and N workers as `python -m node` subprocesses, in a temporary directory."""

    def __init__(self, workers: int, python: str = sys.executable, log_level: str = "WARNING",
                 durability: str = "full", concurrency: int = 1, metrics: str | None = None, tls: bool = False):
        self.n_workers = workers
        self.metrics = metrics  # --metrics-listen (None: the master's default, 127.0.0.1:9464)
        self.durability = durability
        self.concurrency = concurrency
        self.python = python
        self.log_level = log_level
        self.tmp = tempfile.TemporaryDirectory(prefix="taskfleet-bench-")
        self.dir = Path(self.tmp.name)
        self.keyfile = self.dir / "authkey"
        fd = os.open(self.keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        self.state = self.dir / "state"
        self.tls = self._make_tls() if tls else None  # role -> TLS directory
        self.address = None
        self.master = None
        self.workers: list[subprocess.Popen] = []
        self.client: Client | None = None
        self.logs = []

    def _make_tls(self) -> dict:
        from ops.pki import CA  # controller side (cryptography): only when TLS is measured

        ca = CA.create(self.dir / "ca")
        dirs = {}
        for name, role in (("master", "master"), ("bench", "worker"), ("client", "client")):
            ca.issue(name, role, [name, "127.0.0.1"])
            ca.bundle(name, self.dir / f"tls-{role}")
            dirs[role] = self.dir / f"tls-{role}"
        (dirs["master"] / "crl.pem").write_bytes((ca.dir / "crl.pem").read_bytes())
        return dirs

    def _tls_args(self, role: str) -> tuple:
        if self.tls is None:
            return ()
        return ("--tls-dir", str(self.tls[role])) + (("--name", "bench") if role == "worker" else ())

    def _spawn(self, *args) -> subprocess.Popen:
        log = open(self.dir / f"{args[0]}-{len(self.logs)}.log", "wb")
        self.logs.append(log)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for name in [k for k in env if k.startswith("TASKFLEET_")]:
            del env[name]
        return subprocess.Popen(
            [self.python, "-m", "node", "--log-level", self.log_level, *args],
            cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )

    def start_master(self) -> None:
        for _attempt in range(5):  # a free port may be taken before the master binds it
            port = free_port()
            self.address = f"127.0.0.1:{port}"
            metrics = () if self.metrics is None else ("--metrics-listen", self.metrics)
            self.master = self._spawn("master", "--listen", self.address, "--state-dir", str(self.state),
                                      "--authkey-file", str(self.keyfile), "--durability", self.durability, *metrics,
                                      *self._tls_args("master"))
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline and self.master.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    time.sleep(0.05)
            if self.master.poll() is None:
                self.client = Client.connect(self.address, str(self.keyfile), retry_for=30.0,
                                             tls=self.tls and self.tls["client"])
                return
        raise RuntimeError(f"master did not start; see {self.dir}")

    def start_workers(self, n: int | None = None) -> None:
        n = self.n_workers if n is None else n
        for _ in range(n):
            self.workers.append(self._spawn("worker", "--master", self.address, "--authkey-file",
                                            str(self.keyfile), "--concurrency", str(self.concurrency),
                                            *self._tls_args("worker")))
        self.wait_workers(len(self.workers))

    def alive_workers(self) -> int:
        return sum(1 for w in self.client.status()["workers"] if w.get("alive"))

    def wait_workers(self, n: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while self.alive_workers() < n:
            dead = [w.pid for w in self.workers if w.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"only {self.alive_workers()} of {n} workers connected (dead: {dead})")
            time.sleep(0.05)

    def ledger_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.state.glob("ledger.sqlite3*"))

    def close(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
        except Exception:
            pass
        for proc in self.workers:
            _stop_popen(proc, timeout=40)
        if self.master is not None:
            _stop_popen(self.master)
        for log in self.logs:
            log.close()
        self.tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bench_taskfleet(workload: str, n_tasks: int, n_workers: int, durability: str = "full", tls: bool = False) -> dict:
    task, make = WORKLOADS[workload]
    args = [make(i) for i in range(n_tasks)]
    with Fleet(n_workers, durability=durability, tls=tls) as fleet:
        fleet.start_master()
        fleet.start_workers()
        t0 = time.perf_counter()
        job = fleet.client.submit(task, args)
        results = job.wait()
        elapsed = time.perf_counter() - t0
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"taskfleet: {len(failed)} task(s) failed, e.g. {failed[0].error}")
    _check([r.value for r in results], task, n_tasks)
    return {"seconds": elapsed, "tasks_per_s": n_tasks / elapsed}


# -- the multiprocessing.managers tutorial ---------------------------------------------

_queues: dict = {}


def _task_queue():
    return _queues.setdefault("task", queue.Queue())


def _result_queue():
    return _queues.setdefault("result", queue.Queue())


class TutorialServer(BaseManager):
    pass


class TutorialClient(BaseManager):
    pass


TutorialServer.register("get_task_queue", callable=_task_queue)
TutorialServer.register("get_result_queue", callable=_result_queue)
TutorialClient.register("get_task_queue")
TutorialClient.register("get_result_queue")


def _tutorial_queues(address, authkey: bytes) -> tuple:
    """A tutorial worker's start: connect, get both queues, say it is ready."""
    manager = TutorialClient(address=address, authkey=authkey)
    manager.connect()
    tasks, results = manager.get_task_queue(), manager.get_result_queue()
    results.put(("ready", os.getpid()))
    return tasks, results


def _tutorial_worker(address, authkey: bytes) -> None:
    tasks, results = _tutorial_queues(address, authkey)
    while True:
        item = tasks.get()
        if item is None:
            break
        index, name, args = item
        results.put((index, BUILTIN[name](*args)))


def bench_tutorial(workload: str, n_tasks: int, n_workers: int) -> dict:
    task, make = WORKLOADS[workload]
    authkey = secrets.token_bytes(32)
    server = TutorialServer(address=("127.0.0.1", 0), authkey=authkey, ctx=CTX)
    procs = []
    try:
        server.start()
        tasks, results = server.get_task_queue(), server.get_result_queue()
        for _ in range(n_workers):
            proc = CTX.Process(target=_tutorial_worker, args=(server.address, authkey), daemon=True)
            proc.start()
            procs.append(proc)
        for _ in range(n_workers):  # warm-up: every worker connected
            tag, _pid = results.get(timeout=READY_TIMEOUT)
            assert tag == "ready"
        t0 = time.perf_counter()
        for i in range(n_tasks):
            tasks.put((i, task, make(i)))
        values = [None] * n_tasks
        for _ in range(n_tasks):
            index, value = results.get(timeout=120)
            values[index] = value
        elapsed = time.perf_counter() - t0
        for _ in procs:
            tasks.put(None)
        _check(values, task, n_tasks)
        return {"seconds": elapsed, "tasks_per_s": n_tasks / elapsed}
    finally:
        for proc in procs:
            _stop_process(proc)
        try:
            server.shutdown()
        except Exception:
            pass


# -- multiprocessing.Pool --------------------------------------------------------------

def _call(item):
    name, args = item
    return BUILTIN[name](*args)


def _noop(x):
    return os.getpid()


def bench_pool(workload: str, n_tasks: int, n_workers: int) -> dict:
    task, make = WORKLOADS[workload]
    items = [(task, make(i)) for i in range(n_tasks)]
    if workload == "tiny":
        chunksize, extra = divmod(n_tasks, n_workers * 4)  # what Pool.map picks by default
        chunksize += bool(extra)
    else:
        chunksize = 1
    pool = CTX.Pool(n_workers)
    try:
        deadline = time.monotonic() + READY_TIMEOUT  # warm-up: every process started and answering
        while len(set(pool.map(_noop, range(n_workers * 4), chunksize=1))) < n_workers:
            if time.monotonic() > deadline:
                break
        t0 = time.perf_counter()
        values = pool.map(_call, items, chunksize=chunksize)
        elapsed = time.perf_counter() - t0
    finally:
        pool.terminate()
        pool.join()
    _check(values, task, n_tasks)
    return {"seconds": elapsed, "tasks_per_s": n_tasks / elapsed, "chunksize": chunksize}


BENCHES = {"taskfleet": bench_taskfleet, "taskfleet-fast": functools.partial(bench_taskfleet, durability="fast"),
           "taskfleet-tls": functools.partial(bench_taskfleet, tls=True),
           "tutorial": bench_tutorial, "pool": bench_pool}


# -- CPU per task ----------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CPU_SLEEP = 0.01  # seconds each task sleeps: it uses next to no CPU itself
CPU_BATCH = 100  # tasks per put/get in the batched tutorial pattern
CPU_SETUPS = ((1, 1), (2, 1), (1, 2), (2, 2))  # (workers, concurrency of each)
CPU_SYSTEMS = ("taskfleet", "taskfleet-fast", "tutorial-batched")


def _proc_stat(pid: int):
    """(ppid, utime + stime + cutime + cstime in clock ticks) from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return int(fields[1]), sum(int(f) for f in fields[11:15])


def cpu_ticks(roots) -> dict:
    """{pid: CPU ticks} of the processes `roots` and all their descendants, each with the
    CPU of its reaped children (cutime, cstime): a child that exits between two samples
    still counts, in its parent's figure."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None:
                stats[int(name)] = stat
    children: dict = {}
    for pid, (ppid, _ticks) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [pid for pid in roots if pid in stats]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out[pid] = stats[pid][1]
            todo += children.get(pid, [])
    return out


def cpu_seconds(before: dict, after: dict) -> float:
    """CPU used between two cpu_ticks samples of the same process tree."""
    return (sum(after.values()) - sum(before.values())) / CLOCK_TICKS


def cpu_taskfleet(n_tasks: int, workers: int, concurrency: int, durability: str = "full") -> dict:
    with Fleet(workers, durability=durability, concurrency=concurrency) as fleet:
        fleet.start_master()
        fleet.start_workers()
        roots = [fleet.master.pid, *(w.pid for w in fleet.workers)]
        time.sleep(0.5)  # the agents' pool processes are up
        before = cpu_ticks(roots)
        t0 = time.perf_counter()
        results = fleet.client.submit("sleep", [(CPU_SLEEP,)] * n_tasks).wait()
        elapsed = time.perf_counter() - t0
        after = cpu_ticks(roots)
    if len(results) != n_tasks or not all(r.ok for r in results):
        raise RuntimeError(f"taskfleet: {sum(not r.ok for r in results)} of {n_tasks} sleep tasks failed")
    return {"seconds": elapsed, "cpu_seconds": cpu_seconds(before, after), "processes": len(after)}


def _batched_worker(address, authkey: bytes) -> None:
    """The tutorial's worker, but taking and returning lists of tasks."""
    tasks, results = _tutorial_queues(address, authkey)
    while True:
        batch = tasks.get()
        if batch is None:
            break
        results.put([(index, BUILTIN[name](*args)) for index, name, args in batch])


def cpu_tutorial_batched(n_tasks: int, workers: int, concurrency: int) -> dict:
    """The tutorial pattern with CPU_BATCH tasks per put and get; workers x concurrency
    single-threaded worker processes."""
    authkey = secrets.token_bytes(32)
    server = TutorialServer(address=("127.0.0.1", 0), authkey=authkey, ctx=CTX)
    procs = []
    try:
        server.start()
        tasks, results = server.get_task_queue(), server.get_result_queue()
        for _ in range(workers * concurrency):
            proc = CTX.Process(target=_batched_worker, args=(server.address, authkey), daemon=True)
            proc.start()
            procs.append(proc)
        for _ in procs:
            tag, _pid = results.get(timeout=READY_TIMEOUT)
            assert tag == "ready"
        roots = [server._process.pid, *(proc.pid for proc in procs)]
        before = cpu_ticks(roots)
        t0 = time.perf_counter()
        for start in range(0, n_tasks, CPU_BATCH):
            tasks.put([(i, "sleep", (CPU_SLEEP,)) for i in range(start, min(n_tasks, start + CPU_BATCH))])
        got = 0
        while got < n_tasks:
            got += len(results.get(timeout=120))
        elapsed = time.perf_counter() - t0
        after = cpu_ticks(roots)
        for _ in procs:
            tasks.put(None)
        return {"seconds": elapsed, "cpu_seconds": cpu_seconds(before, after), "processes": len(after)}
    finally:
        for proc in procs:
            _stop_process(proc)
        try:
            server.shutdown()
        except Exception:
            pass


CPU_BENCHES = {"taskfleet": cpu_taskfleet, "taskfleet-fast": functools.partial(cpu_taskfleet, durability="fast"),
               "tutorial-batched": cpu_tutorial_batched}


def run_cpu(n_tasks: int, setups=CPU_SETUPS, systems=CPU_SYSTEMS, verbose: bool = True) -> list[dict]:
    """CPU overhead per task: n_tasks of `sleep CPU_SLEEP` (next to no CPU of their own);
    the CPU of every process serving them (master or manager, worker agents, their pool
    processes; not this benchmark's client) over the run, per task, in microseconds."""
    rows = []
    for workers, concurrency in setups:
        for system in systems:
            if verbose:
                print(f"  {system:<16} {n_tasks} x sleep {CPU_SLEEP * 1000:g} ms, {workers} worker(s) x "
                      f"concurrency {concurrency} ...", end="", flush=True)
            result = CPU_BENCHES[system](n_tasks, workers, concurrency)
            row = {"system": system, "tasks": n_tasks, "workers": workers, "concurrency": concurrency,
                   "seconds": result["seconds"], "tasks_per_s": n_tasks / result["seconds"],
                   "cpu_seconds": result["cpu_seconds"], "processes": result["processes"],
                   "cpu_us_per_task": result["cpu_seconds"] / n_tasks * 1e6}
            rows.append(row)
            if verbose:
                print(f" {row['cpu_us_per_task']:>7.0f} us CPU/task ({row['cpu_seconds']:.2f} s CPU in "
                      f"{row['processes']} processes, {row['tasks_per_s']:,.0f} tasks/s)", flush=True)
    return rows


def print_cpu_table(rows: list[dict]) -> None:
    setups = sorted({(r["workers"], r["concurrency"]) for r in rows})
    cell = {(r["system"], r["workers"], r["concurrency"]): r["cpu_us_per_task"] for r in rows}
    print()
    print(f"CPU per task, us (tasks of sleep {CPU_SLEEP * 1000:g} ms; master/manager, agents, pool processes)")
    header = f"{'system':<18}" + "".join(f"{f'{w}x{c}':>10}" for w, c in setups) + "   (workers x concurrency)"
    print(header)
    for system in dict.fromkeys(r["system"] for r in rows):
        print(f"{system:<18}" + "".join(f"{cell[system, w, c]:>10.0f}" if (system, w, c) in cell else f"{'-':>10}"
                                        for w, c in setups))


# -- history ---------------------------------------------------------------------------

def threads_cpu_ns(pid: int) -> int:
    """CPU time of a process's live threads, in ns (/proc/PID/task/*/schedstat): finer
    than clock ticks, but without threads that ended (none do while the probe runs)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                total += int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def _history_probe(fleet: Fleet, job_tasks: int, repeat: int = 11) -> dict:
    """The time of a status call (median of 21) and a fixed job of `job_tasks` tiny
    tasks run `repeat` times: tasks/s over all the runs (one such job lasts ~15 ms and
    its rate alone varies by half from run to run) and the master's CPU per result (the
    median run's, from its threads' schedstat: clock ticks are too coarse here)."""
    times = []
    for _ in range(21):
        t0 = time.perf_counter()
        fleet.client.status()
        times.append(time.perf_counter() - t0)
    rates, cpus, elapsed = [], [], 0.0
    for _ in range(repeat):
        before = threads_cpu_ns(fleet.master.pid)
        t0 = time.perf_counter()
        results = fleet.client.submit("square", [(i,) for i in range(job_tasks)]).wait()
        seconds = time.perf_counter() - t0
        cpus.append((threads_cpu_ns(fleet.master.pid) - before) / 1e3 / job_tasks)
        _check([r.value for r in results], "square", job_tasks)
        rates.append(job_tasks / seconds)
        elapsed += seconds
    return {"status_ms": sorted(times)[len(times) // 2] * 1000, "job_tasks_per_s": repeat * job_tasks / elapsed,
            "master_cpu_us_per_result": sorted(cpus)[len(cpus) // 2], "job_samples": [round(r, 1) for r in rates],
            "cpu_samples": [round(c, 2) for c in cpus]}


def bench_history(checkpoints=(2_000, 10_000), job_tasks: int = 2_000, workers: int = 2, threads: int = 8,
                  verbose: bool = True) -> dict:
    """One master, `workers` workers: submit one-task jobs (from `threads` threads) until
    each checkpoint's count of finished jobs, and probe the master there (_history_probe)."""
    out: dict = {"job_tasks": job_tasks, "workers": workers, "points": []}
    with Fleet(workers) as fleet:
        fleet.start_master()
        fleet.start_workers()
        _history_probe(fleet, job_tasks, repeat=3)  # warm-up: a fresh master and workers are slower at first
        submitted = 0
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for target in checkpoints:
                t0 = time.perf_counter()
                jobs = list(pool.map(lambda i: fleet.client.submit("square", [(i,)]), range(submitted, target)))
                submit_seconds = time.perf_counter() - t0
                deadline = time.monotonic() + 300
                while fleet.client.status()["tasks"]["open_jobs"]:  # every one finished
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"history: jobs still open 300 s after {target} were submitted")
                    time.sleep(0.05)
                submitted = target
                point = {"finished_jobs": target, "submit_seconds": submit_seconds,
                         "one_task_jobs_per_s": len(jobs) / (time.perf_counter() - t0)}
                point.update(_history_probe(fleet, job_tasks))
                point["jobs_in_ledger"] = fleet.client.status()["tasks"]["jobs"]
                out["points"].append(point)
                if verbose:
                    print(f"  after {target:>6,} one-task jobs ({point['one_task_jobs_per_s']:,.0f} jobs/s): "
                          f"status {point['status_ms']:.2f} ms; a {job_tasks:,}-task job "
                          f"{point['job_tasks_per_s']:,.0f} tasks/s, master "
                          f"{point['master_cpu_us_per_result']:.1f} us CPU/result", flush=True)
    first, last = out["points"][0], out["points"][-1]
    out["status_ratio"] = last["status_ms"] / first["status_ms"]
    out["tasks_per_s_ratio"] = last["job_tasks_per_s"] / first["job_tasks_per_s"]
    out["master_cpu_ratio"] = last["master_cpu_us_per_result"] / max(first["master_cpu_us_per_result"], 1e-9)
    if verbose:
        print(f"  {last['finished_jobs']:,} vs {first['finished_jobs']:,} finished jobs: status time x"
              f"{out['status_ratio']:.2f}, job tasks/s x{out['tasks_per_s_ratio']:.2f}, master CPU/result x"
              f"{out['master_cpu_ratio']:.2f} (1.00: history costs nothing)", flush=True)
    return out


# -- metrics ---------------------------------------------------------------------------

def _scrape(address: str, stop) -> int:
    """Fetch /metrics and /api/status once a second (a Prometheus and an open dashboard)
    until `stop` is set; returns how many scrapes."""
    count = 0
    while not stop.wait(1.0):
        for path in ("/metrics", "/api/status"):
            with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as reply:
                reply.read()
        count += 1
    return count


def bench_metrics_cost(n_tasks: int, workers: int = 2, rounds: int = 7, verbose: bool = True) -> dict:
    """Tiny tasks/s, and the master's CPU per task, with its metrics off and on (scraped
    every second), in alternating rounds of fresh fleets: the medians, and the median of
    each round's on/off ratio (pairs taken close in time are less noisy)."""
    task, make = WORKLOADS["tiny"]
    args = [make(i) for i in range(n_tasks)]
    rates: dict = {"off": [], "on": []}
    cpu: dict = {"off": [], "on": []}  # the master's CPU microseconds per task
    scrapes: list = []  # during each run with metrics on
    for _ in range(rounds):
        for mode in ("off", "on"):
            with Fleet(workers, metrics="off" if mode == "off" else "127.0.0.1:0") as fleet:
                fleet.start_master()
                fleet.start_workers()
                fleet.client.submit(task, args[:1000]).wait()  # warm-up
                stop, scraper = threading.Event(), None
                if mode == "on":
                    address = fleet.client.status()["master"]["metrics"]
                    scraper = concurrent.futures.ThreadPoolExecutor(1).submit(_scrape, address, stop)
                before = cpu_ticks([fleet.master.pid])
                t0 = time.perf_counter()
                results = fleet.client.submit(task, args).wait()
                elapsed = time.perf_counter() - t0
                cpu[mode].append(cpu_seconds(before, cpu_ticks([fleet.master.pid])) / n_tasks * 1e6)
                stop.set()
                if scraper is not None:
                    scrapes.append(scraper.result(timeout=10))
            _check([r.value for r in results], task, n_tasks)
            rates[mode].append(n_tasks / elapsed)

    def median(values):
        return sorted(values)[len(values) // 2]

    ratios = [on / off for on, off in zip(rates["on"], rates["off"])]
    out = {"tasks": n_tasks, "workers": workers, "rounds": rounds, "off_tasks_per_s": median(rates["off"]),
           "on_tasks_per_s": median(rates["on"]), "ratio": median(ratios),
           "master_cpu_us_per_task": {mode: median(values) for mode, values in cpu.items()},
           "samples": {mode: [round(r) for r in values] for mode, values in rates.items()}, "scrapes": scrapes}
    if verbose:
        print(f"  {n_tasks:,} x square, {workers} workers, median of {rounds}: "
              f"metrics off {out['off_tasks_per_s']:,.0f} "
              f"tasks/s, on (scraped every second, {sum(scrapes)} scrapes) {out['on_tasks_per_s']:,.0f} tasks/s; "
              f"on/off {out['ratio']:.3f} (median of the rounds' ratios); master CPU per task "
              f"{out['master_cpu_us_per_task']['off']:.2f} us off, {out['master_cpu_us_per_task']['on']:.2f} us on",
              flush=True)
    return out


# -- the run ---------------------------------------------------------------------------

def run_matrix(counts: dict, workers=(1, 2, 4), systems=SYSTEMS, workloads=("tiny", "burn"),
               verbose: bool = True, repeat: dict | None = None) -> list[dict]:
    """One row per (workload, N, system). With `repeat` ({workload: R}), each cell runs R
    times, each with fresh processes, interleaved across systems so that a noisy moment
    hits all of them; the row's tasks_per_s is the median, `samples` all of them."""
    repeat = repeat or {}
    rows = []
    for workload in workloads:
        for n in workers:
            samples: dict = {system: [] for system in systems}
            for rep in range(repeat.get(workload, 1)):
                for system in systems:
                    if verbose:
                        print(f"  {system:<14} {workload:<4} {counts[workload]:>6} tasks, N={n} #{rep + 1} ...",
                              end="", flush=True)
                    result = BENCHES[system](workload, counts[workload], n)
                    samples[system].append(result)
                    if verbose:
                        print(f" {result['tasks_per_s']:>10,.0f} tasks/s ({result['seconds']:.2f} s)", flush=True)
            for system in systems:
                runs = sorted(samples[system], key=lambda r: r["tasks_per_s"])
                row = {"system": system, "workload": workload, "tasks": counts[workload], "workers": n}
                row.update(runs[len(runs) // 2])
                row["samples"] = [round(r["tasks_per_s"], 1) for r in samples[system]]
                rows.append(row)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    rate = {(r["system"], r["workload"], r["workers"]): r["tasks_per_s"] for r in rows}
    out = []
    for n in sorted({r["workers"] for r in rows}):
        item = {"workers": n}
        if ("taskfleet", "tiny", n) in rate and ("tutorial", "tiny", n) in rate:
            item["tiny_taskfleet_over_tutorial"] = rate["taskfleet", "tiny", n] / rate["tutorial", "tiny", n]
        if ("taskfleet", "burn", n) in rate and ("pool", "burn", n) in rate:
            item["burn_taskfleet_over_pool"] = rate["taskfleet", "burn", n] / rate["pool", "burn", n]
        for workload in ("tiny", "burn"):  # the price of fsyncing every commit, of TLS
            full, fast = rate.get(("taskfleet", workload, n)), rate.get(("taskfleet-fast", workload, n))
            if full and fast:
                item[f"{workload}_full_over_fast"] = full / fast
            tls = rate.get(("taskfleet-tls", workload, n))
            if full and tls:
                item[f"{workload}_tls_over_plaintext"] = tls / full
        out.append(item)
    return out


def print_table(rows: list[dict], ratio_rows: list[dict]) -> None:
    workers = sorted({r["workers"] for r in rows})
    rate = {(r["system"], r["workload"], r["workers"]): r["tasks_per_s"] for r in rows}
    print()
    print("tasks/s (first submit to last result; median of the runs of a cell)")
    header = f"{'workload':<22} {'system':<15}" + "".join(f"{'N=' + str(n):>12}" for n in workers)
    print(header)
    print("-" * len(header))
    for workload in ("tiny", "burn"):
        label = {"tiny": "square", "burn": f"burn {BURN_MS} ms"}[workload]
        count = next((r["tasks"] for r in rows if r["workload"] == workload), None)
        if count is None:
            continue
        for system in SYSTEMS:
            cells = "".join(
                f"{rate[system, workload, n]:>12,.0f}" if (system, workload, n) in rate else f"{'-':>12}"
                for n in workers
            )
            print(f"{label + f' x{count}':<22} {system:<15}{cells}")
    print()
    print("ratios                              target" + "".join(f"{'N=' + str(n):>10}" for n in workers))
    for key, label, target in (("tiny_taskfleet_over_tutorial", "tiny: taskfleet / tutorial", ">= 10"),
                               ("burn_taskfleet_over_pool", "10 ms: taskfleet / Pool", ">= 0.95"),
                               ("tiny_full_over_fast", "tiny: durability full / fast", ""),
                               ("burn_full_over_fast", "10 ms: durability full / fast", ""),
                               ("tiny_tls_over_plaintext", "tiny: TLS / plaintext", ""),
                               ("burn_tls_over_plaintext", "10 ms: TLS / plaintext", "")):
        cells = "".join(f"{r[key]:>10.2f}" if key in r else f"{'-':>10}" for r in ratio_rows)
        print(f"{label:<35} {target:<7}{cells}")


def bench_million(n_tasks: int = 1_000_000, drain_workers: int = 2, drain_limit: float = 300.0) -> dict:
    """Queue n tiny tasks with no worker running; report the master's memory and ledger
    size; then time `drain_workers` workers draining them (gives up after drain_limit s)."""
    out: dict = {"tasks": n_tasks}
    args = [(i,) for i in range(n_tasks)]
    with Fleet(drain_workers) as fleet:
        fleet.start_master()
        pid = fleet.master.pid
        out["rss_before_kib"] = rss_kib(pid)
        out["ledger_before_bytes"] = fleet.ledger_bytes()
        print(f"  master pid {pid}: {out['rss_before_kib']}; submitting {n_tasks:,} tasks ...", flush=True)
        t0 = time.perf_counter()
        job = fleet.client.submit("square", args)
        out["submit_seconds"] = time.perf_counter() - t0
        out["submit_tasks_per_s"] = n_tasks / out["submit_seconds"]
        out["rss_after_submit_kib"] = rss_kib(pid)
        out["ledger_after_submit_bytes"] = fleet.ledger_bytes()
        out["queued"] = fleet.client.status()["tasks"]["queued"]
        print(f"  submitted in {out['submit_seconds']:.1f} s ({out['submit_tasks_per_s']:,.0f} tasks/s); "
              f"master {out['rss_after_submit_kib']}; ledger {out['ledger_after_submit_bytes'] / 1e6:.1f} MB",
              flush=True)
        if drain_workers:
            fleet.start_workers(drain_workers)
            t0 = time.perf_counter()
            done = 0
            while time.perf_counter() - t0 < drain_limit:
                info = job.progress()
                done = info["done"] + info["failed"]
                if done >= n_tasks:
                    break
                time.sleep(0.5)
            out["drain_workers"] = drain_workers
            out["drain_seconds"] = time.perf_counter() - t0
            out["drained"] = done
            out["drain_tasks_per_s"] = done / out["drain_seconds"]
            out["rss_after_drain_kib"] = rss_kib(pid)
            out["ledger_after_drain_bytes"] = fleet.ledger_bytes()
            print(f"  {drain_workers} workers drained {done:,} tasks in {out['drain_seconds']:.1f} s "
                  f"({out['drain_tasks_per_s']:,.0f} tasks/s); master {out['rss_after_drain_kib']}; "
                  f"ledger {out['ledger_after_drain_bytes'] / 1e6:.1f} MB", flush=True)
    return out


def node_version() -> str:
    """The commit node/ was measured at (+dirty if it has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "node"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 2,000 tiny and 200 10 ms tasks")
    parser.add_argument("--million", action="store_true", help="also queue 1,000,000 tiny tasks (master memory)")
    parser.add_argument("--million-only", action="store_true", help="only the 1,000,000-task part")
    parser.add_argument("--cpu", action="store_true",
                        help=f"also measure CPU per task: 2,000 x sleep {CPU_SLEEP * 1000:g} ms on taskfleet (full and "
                             "fast) and a batched tutorial queue, 1-2 workers x concurrency 1-2; the CPU of master, "
                             "agents and pool processes per task")
    parser.add_argument("--history", action="store_true",
                        help="also check that history costs nothing: status time and a 2,000-task job's tasks/s "
                             "after 2,000 and after 10,000 finished one-task jobs")
    parser.add_argument("--metrics-cost", action="store_true",
                        help="also compare tiny tasks/s with the master's metrics off and on (scraped every second)")
    parser.add_argument("--no-matrix", action="store_true", help="skip the tasks/s matrix (run only the extra parts)")
    parser.add_argument("--drain-workers", type=int, default=2, help="workers draining the million (0: skip)")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (default 1,2,4)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each tiny-task cell, median reported (default 3; 10 ms cells run once)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)

    counts = QUICK if args.quick else FULL
    workers = tuple(int(n) for n in args.workers.split(","))
    systems = tuple(s for s in args.systems.split(",") if s)
    report = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "loadavg_before": os.getloadavg(),
              "counts": counts, "node_version": node_version()}
    if not (args.million_only or args.no_matrix):
        print(f"throughput of node/ at {report['node_version']} on {os.cpu_count()} CPUs, "
              f"load average {report['loadavg_before'][0]:.2f}:", flush=True)
        rows = run_matrix(counts, workers, systems, repeat={"tiny": args.repeat})
        report["rows"], report["ratios"] = rows, ratios(rows)
        print_table(rows, report["ratios"])
    if args.cpu and not args.million_only:
        print(f"\nCPU per task ({counts['cpu']:,} x sleep {CPU_SLEEP * 1000:g} ms):", flush=True)
        report["cpu"] = run_cpu(counts["cpu"])
        print_cpu_table(report["cpu"])
    if args.history and not args.million_only:
        print(f"\nhistory: one-task jobs, then a {counts['history_job']:,}-task job, on one master with 2 workers:",
              flush=True)
        report["history"] = bench_history(counts["history"], counts["history_job"])
    if args.metrics_cost and not args.million_only:
        print("\nthe cost of metrics (fresh fleets, alternating off and on):", flush=True)
        report["metrics_cost"] = bench_metrics_cost(counts["tiny"] * 10)  # long enough runs for a few scrapes
    if args.million or args.million_only:
        print("\nmaster memory with 1,000,000 queued tiny tasks:", flush=True)
        report["million"] = bench_million(drain_workers=args.drain_workers)
    report["loadavg_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
