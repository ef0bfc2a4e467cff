"""The shipped form: the zipapp, Python 3.9 (the contract's floor) and the linter."""

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, check_exactly_once, json_lines

PY39 = Path("/root/.pyenv/versions/3.9.18/bin/python3")
RUFF = Path(PYTHON).with_name("ruff")


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    from ops import artifact

    return artifact.build(tmp_path_factory.mktemp("dist"))


def test_build_is_reproducible_and_checksummed(pyz, tmp_path):
    from node import __version__
    from ops import artifact

    assert pyz.name == f"taskfleet-node-{__version__}.pyz"
    again = artifact.build(tmp_path)
    assert again.read_bytes() == pyz.read_bytes()
    digest, name = Path(f"{pyz}.sha256").read_text().split()
    assert name == pyz.name and digest == hashlib.sha256(pyz.read_bytes()).hexdigest()
    check = subprocess.run(["sha256sum", "-c", f"{pyz.name}.sha256"], cwd=pyz.parent, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_pyz_runs_outside_the_checkout(pyz, agents):
    out = subprocess.run([PYTHON, str(pyz), "--version"], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("taskfleet-node ")


def test_master_worker_and_job_from_the_pyz(pyz, agents):
    entry = [str(pyz)]
    agents.start_master(entry=entry)
    agents.start_worker(entry=entry, concurrency=2)
    agents.wait_workers(1)
    out = agents.cli("submit", "square", *map(str, range(10)), "--wait", "--json", entry=entry)
    assert out.returncode == 0, out.stderr
    lines = json_lines(out.stdout)
    check_exactly_once(lines, 10)
    assert sorted(line["result"] for line in lines) == [n * n for n in range(10)]


needs_py39 = pytest.mark.skipif(not PY39.exists(), reason=f"no Python 3.9 at {PY39}")


@needs_py39
def test_python39_help(agents):
    out = agents.cli("--help", python=str(PY39), with_master=False)
    assert out.returncode == 0, out.stderr
    for sub in ("master", "worker", "submit", "status", "results"):
        assert agents.cli(sub, "--help", python=str(PY39), with_master=False).returncode == 0


@needs_py39
def test_python39_round_trip_from_the_pyz(pyz, agents):
    entry = [str(pyz)]
    agents.start_master(entry=entry, python=str(PY39))
    agents.start_worker(entry=entry, python=str(PY39), concurrency=2)
    agents.wait_workers(1)
    out = agents.cli("submit", "square", "2", "3", "--wait", "--json", entry=entry, python=str(PY39))
    assert out.returncode == 0, out.stderr
    assert sorted(line["result"] for line in json_lines(out.stdout)) == [4, 9]
    status = agents.cli("status", "--json", entry=entry, python=str(PY39))
    assert status.returncode == 0, status.stderr


@pytest.mark.skipif(not RUFF.exists() and not shutil.which("ruff"), reason="ruff is not installed")
def test_ruff_passes_on_node():
    ruff = str(RUFF) if RUFF.exists() else shutil.which("ruff")
    out = subprocess.run([ruff, "check", "--no-cache", "node/", "tests/node/"], cwd=str(ROOT), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
