"""The agents' own tests (tests/node) under the nodes' real Pythons, not only the controller's.

The mixed cluster has one node per Debian suite; on each suite whose Python differs from the
controller's (bullseye's 3.9, trixie's 3.13) tests/node runs as root with /usr/bin/python3
(ops/nodetests.py ships the code and pure-Python wheels of pytest). Every skip must say why.
"""

from __future__ import annotations

import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from ops import localcluster, nodetests

CONTROLLER = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _one_node_per_other_python(nodes):
    picked = {}
    for n in nodes:
        version = localcluster.SUITES[n.suite][1]
        if version != CONTROLLER and n.group == "workers":
            picked.setdefault(version, n)
    return picked


def test_node_tests_pass_under_each_suites_python(cluster):
    picked = _one_node_per_other_python(cluster)
    if not picked:
        pytest.skip(f"TASKFLEET_NODE_OS gives no worker a Python other than the controller's {CONTROLLER}")
    with ThreadPoolExecutor(len(picked)) as pool:
        runs = dict(zip(picked, pool.map(nodetests.run, picked.values())))
    failures = []
    for version, proc in runs.items():
        out = proc.stdout.decode(errors="replace")
        node = picked[version]
        print(f"--- tests/node on {node.hostname} ({node.suite}, Python {version}):\n{out[-6000:]}")
        assert f"python {version}." in out, f"{node.hostname}: not run under Python {version}: {out[:300]}"
        summary = out.strip().splitlines()[-1] if out.strip() else proc.stderr.decode(errors="replace")[-2000:]
        if proc.returncode != 0 or not re.search(r"\d+ passed", summary) or " failed" in summary:
            failures.append(f"{node.hostname} (Python {version}): exit {proc.returncode}: {summary}")
        # pytest -rs lists each skip with its reason: none may be empty.
        for line in re.findall(r"^SKIPPED \[\d+\] (.*)$", out, re.M):
            assert re.search(r": \S", line), f"{node.hostname}: a skip without a reason: {line}"
    assert not failures, "\n".join(failures)
