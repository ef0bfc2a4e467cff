"""Deploy time against fleet size, on the local cluster, in one run.

    python bench/deploy.py [--hosts 3,10,20] [--mitogen] [--json FILE]

For each size N (the master and N-1 workers): `invoke cluster.up` with TASKFLEET_WORKERS=N-1
(the default mixed suites), then for each strategy (Ansible's linear; Mitogen's too with
--mitogen): `invoke reset --purge-data --yes` (a cold start: no user, release, unit or key on
any host), a cold `invoke deploy`, and a no-change re-run. The figures are ansible-playbook's
own run time as `invoke deploy` reports it (the artifact build is not counted), and the ratios
the goals are stated in: cold(N) / cold(smallest N), re-run / cold; and the CPU time a cold
deploy took: the whole machine's (the containers, so the hosts, included) and the controller's
(invoke, ansible-playbook and its forks, ssh), and that CPU over this machine's CPUs: the
shortest wall time the cold deploy could take here, however parallel (every host's share of
the work runs on the same CPUs as the controller's). Leaves the last cluster up.
Run it on an idle machine: every container shares the controller's CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOK_TIME = re.compile(r"==> ansible-playbook exited (\d+) after ([\d.]+) s")


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy (all CPUs, containers included), from /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in open("/proc/stat").readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_seconds() -> float:
    """CPU time of this process's finished children (invoke, ansible-playbook, its forks, ssh)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def invoke(*args: str, workers: int, mitogen: bool = False) -> str:
    env = dict(os.environ, TASKFLEET_WORKERS=str(workers))
    env.pop("TASKFLEET_MITOGEN", None)
    if mitogen:
        env["TASKFLEET_MITOGEN"] = "1"
    proc = subprocess.run([str(ROOT / "invoke"), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout[-2000:] + proc.stderr[-2000:]).strip()
        sys.exit(f"bench: invoke {' '.join(args)} exited {proc.returncode}:\n{tail}")
    return proc.stdout


def playbook_seconds(output: str) -> float:
    return float(PLAYBOOK_TIME.findall(output)[-1][1])


def measure(hosts: int, mitogen: bool) -> dict:
    invoke("reset", "--purge-data", "--yes", workers=hosts - 1)
    busy, controller = busy_seconds(), children_seconds()
    cold = playbook_seconds(invoke("deploy", workers=hosts - 1, mitogen=mitogen))
    busy, controller = busy_seconds() - busy, children_seconds() - controller
    rerun = playbook_seconds(invoke("deploy", workers=hosts - 1, mitogen=mitogen))
    return {"hosts": hosts, "strategy": "mitogen_linear" if mitogen else "linear", "cold_s": cold, "rerun_s": rerun,
            "cold_cpu_s": round(busy, 1), "cold_controller_cpu_s": round(controller, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="3,10,20", help="fleet sizes, master included (default 3,10,20)")
    parser.add_argument("--mitogen", action="store_true", help="also measure with Mitogen's strategy")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.hosts.split(","))
    if sizes[0] < 2:
        parser.error("--hosts: a fleet has the master and at least one worker (N >= 2)")
    rows = []
    for n in sizes:
        print(f"bench: {n} hosts: cluster.up", file=sys.stderr, flush=True)
        invoke("cluster.up", workers=n - 1)
        for mitogen in [False, True] if args.mitogen else [False]:
            rows.append(measure(n, mitogen))
            print(f"bench: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"{'hosts':>5}  {'strategy':<15} {'cold s':>7} {'re-run s':>8}  {'cold / cold(' + str(sizes[0]) + ')':>15}"
          f"  {'re-run / cold':>13}  {'cold CPU s: all':>15} {'controller':>10}  {'CPU floor s':>11}")
    for row in rows:
        base = next(r for r in rows if r["hosts"] == sizes[0] and r["strategy"] == row["strategy"])
        row["cold_ratio"] = round(row["cold_s"] / base["cold_s"], 2)
        row["rerun_ratio"] = round(row["rerun_s"] / row["cold_s"], 2)
        row["cold_cpu_floor_s"] = round(row["cold_cpu_s"] / os.cpu_count(), 1)
        print(f"{row['hosts']:>5}  {row['strategy']:<15} {row['cold_s']:>7.1f} {row['rerun_s']:>8.1f}"
              f"  {row['cold_ratio']:>15.2f}  {row['rerun_ratio']:>13.2f}"
              f"  {row['cold_cpu_s']:>15.1f} {row['cold_controller_cpu_s']:>10.1f}  {row['cold_cpu_floor_s']:>11.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
