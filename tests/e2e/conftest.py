"""End-to-end tier: the real local cluster (Vagrant + LXC), deployed with `invoke deploy`.

The session brings the cluster up (or reuses one that is up), deploys once, and hands the
tests the deploy's output, the fleet (master address, authkey) and testinfra hosts over
the same Ansible inventory. `invoke test` takes down a cluster that it brought up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import testinfra

from node.client import Client
from ops import inventory, localcluster
from ops.paths import LOCAL_INVENTORY, ROOT

INVOKE = ROOT / "invoke"

# testinfra runs `ansible-inventory` and `ansible` from PATH: the pinned ones beside this
# interpreter (.venv/bin), also when pytest is started as .venv/bin/pytest without ./invoke.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


def run_invoke(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ./invoke as an operator would; echo its output into the test log."""
    proc = subprocess.run([str(INVOKE), *args], cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        pytest.fail(f"invoke {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def cluster():
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("the end-to-end tier needs Linux and root (LXC containers)")
    run_invoke("cluster.up")
    return localcluster.nodes(localcluster.settings())


@pytest.fixture(scope="session")
def first_deploy(cluster) -> subprocess.CompletedProcess:
    return run_invoke("deploy")


@pytest.fixture(scope="session")
def fleet(first_deploy) -> inventory.Fleet:
    return inventory.load(LOCAL_INVENTORY)


@pytest.fixture(scope="session")
def authkey(fleet) -> str:
    return fleet.authkey_file.read_text().strip()


@pytest.fixture
def client(fleet):
    with Client.connect(fleet.master_address, str(fleet.authkey_file), tls=fleet.tls_dir()) as c:
        yield c


def host(name: str):
    return testinfra.get_host(f"ansible://{name}?sudo=true", ansible_inventory=str(LOCAL_INVENTORY))


@pytest.fixture(scope="session")
def master_host(first_deploy):
    return host("tf-master")


@pytest.fixture(scope="session")
def worker_hosts(fleet):
    return [host(h.name) for h in fleet.hosts if "workers" in h.groups]


@pytest.fixture(scope="session")
def operator():
    """`operator("deploy")` runs ./invoke deploy and returns the finished process."""
    return run_invoke
