"""`invoke bench`: end-to-end throughput of taskfleet vs the managers tutorial and Pool (bench/throughput.py)."""

import shlex
import sys

from invoke import task

from ops.paths import ROOT


@task(help={
    "quick": "smoke test: 2,000 tiny and 200 10 ms tasks (and smaller --cpu and --history runs)",
    "cpu": "also measure CPU per task: 2,000 x sleep 10 ms on taskfleet (durability full and fast) and a batched "
           "tutorial queue (100 tasks per put/get), 1-2 workers x concurrency 1-2; the CPU (utime+stime, children's "
           "included) of master, worker agents and pool processes, in microseconds per task",
    "history": "also check that history costs nothing: a status call's time and a 2,000-task job's tasks/s (and the "
               "master's CPU per result) after 2,000 and after 10,000 finished one-task jobs, and their ratios",
    "million": "also queue 1,000,000 tiny tasks and report the master's memory and ledger size",
    "workers": "comma-separated worker counts (default 1,2,4)",
    "repeat": "runs of each tiny-task cell, the median is reported (default 3)",
    "json": "also write the figures to this JSON file",
}, auto_shortflags=False)  # long options only: -h stays help (not --history)
def bench(c, quick=False, cpu=False, history=False, million=False, workers="1,2,4", repeat=3, json=""):
    """Throughput: taskfleet (durability full, and fast: taskfleet-fast) vs the multiprocessing.managers tutorial
    vs multiprocessing.Pool (loopback); with --cpu, CPU per task; with --history, costs against history."""
    args = [sys.executable, "bench/throughput.py", "--workers", workers, "--repeat", str(repeat)]
    for flag, on in (("--quick", quick), ("--cpu", cpu), ("--history", history), ("--million", million)):
        if on:
            args.append(flag)
    if json:
        args += ["--json", json]
    with c.cd(str(ROOT)):
        c.run(shlex.join(args), pty=False)
