"""`invoke bench`: end-to-end throughput of taskfleet vs the managers tutorial and Pool (bench/throughput.py)."""

import shlex
import sys

from invoke import task

from ops.paths import ROOT


@task(help={
    "quick": "smoke test: 2,000 tiny and 200 10 ms tasks",
    "million": "also queue 1,000,000 tiny tasks and report the master's memory and ledger size",
    "workers": "comma-separated worker counts (default 1,2,4)",
    "repeat": "runs of each tiny-task cell, the median is reported (default 3)",
    "json": "also write the figures to this JSON file",
})
def bench(c, quick=False, million=False, workers="1,2,4", repeat=3, json=""):
    """Throughput: taskfleet vs the multiprocessing.managers tutorial vs multiprocessing.Pool (loopback)."""
    args = [sys.executable, "bench/throughput.py", "--workers", workers, "--repeat", str(repeat)]
    if quick:
        args.append("--quick")
    if million:
        args.append("--million")
    if json:
        args += ["--json", json]
    with c.cd(str(ROOT)):
        c.run(shlex.join(args), pty=False)
