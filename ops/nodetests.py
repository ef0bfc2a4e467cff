"""Run the agents' own tests (tests/node) on a node of the local cluster, under its Python.

The nodes run the agents in production form: Debian's /usr/bin/python3 (3.9 on bullseye, 3.13
on trixie). They have no route out, so pytest and the few test dependencies go with the code:
pure-Python wheels that `pip download` fetches on the controller for that Python version
(cached under .cluster/wheels/), unpacked on the node into a directory on PYTHONPATH. Tests
that need what a node lacks (a browser, ruff, a second interpreter) skip, saying why; a test
module that needs another package must import it inside the test (or pytest.importorskip it),
or add it to TEST_REQUIREMENTS if it is pure Python.
"""

from __future__ import annotations

import io
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

from ops import localcluster as lc
from ops.cluster import SSH_OPTS
from ops.paths import CLUSTER_DIR, ROOT

# What tests/node imports beyond the standard library (at requirements.txt's pins).
TEST_REQUIREMENTS = ("pytest", "pytest-timeout", "prometheus-client")
# pytest's backports for Python < 3.11, named because `pip download --python-version` evaluates
# dependencies' markers (python_version < "3.11") for the running Python, not the target.
BACKPORTS = ("exceptiongroup", "tomli", "typing-extensions")
# What the tests read from the checkout: the agents, the tests and their helpers, the zipapp
# builder, pytest's config (tests/test_nodetests.py checks every import of tests/node is here).
SHIPPED = ("node", "tests/node", "tests/waiting.py", "tests/browser.py", "ops/__init__.py", "ops/paths.py",
           "ops/artifact.py", "pyproject.toml")  # fmt: skip
REMOTE_DIR = "/var/tmp/taskfleet-node-tests"


def wheels(python_version: str) -> list[Path]:
    """Pure-Python wheels of TEST_REQUIREMENTS and their dependencies for `python_version`
    (e.g. "3.9"), downloaded once into .cluster/wheels/pyX.Y/. The direct ones at requirements.txt's
    pins; their dependencies as pip resolves them for that Python (constraints.txt pins some that
    need a newer Python than 3.9)."""
    dest = CLUSTER_DIR / "wheels" / f"py{python_version}"
    stamp = dest / ".complete"
    if not stamp.exists():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--python-version", python_version, "--dest", str(dest),
               *_pins(TEST_REQUIREMENTS)]  # fmt: skip
        if tuple(map(int, python_version.split("."))) < (3, 11):
            cmd += BACKPORTS
        subprocess.run(cmd, check=True)
        stamp.write_text("")
    found = sorted(dest.glob("*.whl"))
    impure = [w.name for w in found if not w.name.endswith("-none-any.whl")]
    if impure:
        raise RuntimeError(f"not pure-Python wheels, cannot run on the nodes: {', '.join(impure)}")
    return found


def _pins(names) -> list[str]:
    """`name==version` for each of `names` as requirements.txt pins it."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return [f"{n}=={pins[n]}" for n in names]


def _bundle(python_version: str) -> bytes:
    """A tar.gz of the shipped checkout files plus the wheels under wheels/."""
    buf = io.BytesIO()
    skip = re.compile(r"(__pycache__|\.pyc$|\.pytest_cache)")
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in SHIPPED:
            tar.add(ROOT / name, arcname=name, filter=lambda ti: None if skip.search(ti.name) else ti)
        for whl in wheels(python_version):
            tar.add(whl, arcname=f"wheels/{whl.name}")
    return buf.getvalue()


def run(node: lc.Node, pytest_args: tuple[str, ...] = (), timeout: float = 1200) -> subprocess.CompletedProcess:
    """Ship the tests to `node` and run them there as root with the node's /usr/bin/python3;
    return the finished ssh process (pytest's exit code and output)."""
    python_version = lc.SUITES[node.suite][1]
    script = f"""set -e
rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR}/site && cd {REMOTE_DIR} && tar xzf -
for w in wheels/*.whl; do python3 -m zipfile -e "$w" site/; done
export PYTHONPATH={REMOTE_DIR}/site PYTHONDONTWRITEBYTECODE=1
python3 -c 'import sys; print("python", sys.version.split()[0])'
exec python3 -m pytest -p no:cacheprovider -q -rfEs --tb=short {" ".join(pytest_args)} tests/node"""
    key = lc.private_key(node)
    cmd = ["ssh", *SSH_OPTS, "-o", "ServerAliveInterval=5", "-i", str(key), f"vagrant@{node.address}",
           "sudo", "-n", "bash", "-c", shlex.quote(script)]  # fmt: skip
    return subprocess.run(cmd, input=_bundle(python_version), capture_output=True, timeout=timeout)

