"""Versions: each build of a changed tree is its own release; the master's protocol skew rule."""

import io
import shutil
import subprocess
import tarfile
import zipfile

import pytest

from conftest import ROOT, wait_for
from node import OLDEST_WORKER_PROTOCOL, PROTOCOL, RELEASE, __version__, version, wire
from node.errors import Incompatible
from ops import artifact


def _tree(tmp_path):
    node_dir = tmp_path / "node"
    shutil.copytree(artifact.NODE_DIR, node_dir, ignore=shutil.ignore_patterns("__pycache__"))
    return node_dir


def test_an_unchanged_tree_keeps_its_version_a_changed_one_gets_a_new_one(tmp_path):
    node_dir = _tree(tmp_path)
    first = version.source_version(RELEASE, node_dir)
    assert first == version.source_version(RELEASE, node_dir) == __version__  # a copy is the same tree
    assert first.startswith(f"{RELEASE}+") and len(first.split("+")[1]) == 12
    (node_dir / "worker" / "pool.py").write_bytes((node_dir / "worker" / "pool.py").read_bytes() + b"\n# changed\n")
    changed = version.source_version(RELEASE, node_dir)
    assert changed != first
    (node_dir / "extra.py").write_text("")  # a new file changes it too
    assert version.source_version(RELEASE, node_dir) not in (first, changed)
    (node_dir / "extra.py").unlink()
    assert version.source_version(RELEASE, node_dir) == changed


def test_the_generated_build_module_is_not_part_of_the_digest(tmp_path):
    node_dir = _tree(tmp_path)
    before = version.digest(node_dir)
    (node_dir / version.BUILD_MODULE).write_text('VERSION = "whatever"\n')
    assert version.digest(node_dir) == before


def test_the_artifact_carries_its_version_and_dist_names_the_last_build(tmp_path):
    pyz = artifact.build(tmp_path)
    assert pyz.name == f"taskfleet-node-{__version__}.pyz"
    assert (tmp_path / "VERSION").read_text().strip() == __version__
    with zipfile.ZipFile(pyz) as zf:
        assert zf.read("node/_build.py").decode() == f'VERSION = "{__version__}"\n'


def test_the_master_serves_its_protocol_and_the_one_before_and_refuses_others_plainly(agents):
    assert OLDEST_WORKER_PROTOCOL == PROTOCOL - 1
    agents.start_master()
    caller = wire.Caller(("127.0.0.1", agents.port), agents.key.read_bytes())
    try:
        with pytest.raises(Incompatible, match=f"speaks {PROTOCOL + 1}: upgrade the master first"):
            caller.call("hello", "w-new", "h", 1, 1, [], None, PROTOCOL + 1, "9.9.9")
        with pytest.raises(Incompatible, match=f"speaks {PROTOCOL - 2}: upgrade the worker"):
            caller.call("hello", "w-old", "h", 1, 1, [], None, PROTOCOL - 2)
        # A worker of the protocol before sends no version: it is served, its version unknown.
        caller.call("hello", "w-prev", "h1", 1, 1, [], None, PROTOCOL - 1)
        caller.call("hello", "w-now", "h2", 2, 1, [], None, PROTOCOL, "0.1.0+0123456789ab")
        workers = {w["id"]: w for w in caller.call("status")["workers"]}
        assert set(workers) == {"w-prev", "w-now"}
        assert (workers["w-prev"]["version"], workers["w-prev"]["protocol"]) == (None, PROTOCOL - 1)
        assert (workers["w-now"]["version"], workers["w-now"]["protocol"]) == ("0.1.0+0123456789ab", PROTOCOL)
    finally:
        caller.close()


def test_status_shows_the_masters_and_each_workers_version(agents):
    agents.start_master()
    agents.start_worker()
    agents.wait_workers(1)
    status = agents.status()
    assert status["master"]["version"] == __version__
    assert status["master"]["worker_protocols"] == [PROTOCOL - 1, PROTOCOL]
    assert [w["version"] for w in status["workers"]] == [__version__]
    out = agents.cli("status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"taskfleet {__version__}" in lines[0]
    header = next(line.split() for line in lines if line.strip().startswith("HOST"))
    row = next(line.split() for line in lines if " alive " in line)
    assert row[header.index("VERSION")] == __version__


PROTOCOL_2_COMMIT = "e570d85"  # the last commit whose agents speak protocol 2


@pytest.fixture
def protocol_2_pyz(tmp_path):
    """The agents of PROTOCOL_2_COMMIT as a zipapp (from git: the real older release)."""
    if shutil.which("git") is None:  # the cluster's nodes run tests/node without git or history
        pytest.skip(f"git is not installed: the agents of commit {PROTOCOL_2_COMMIT} come from this repository")
    out = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", PROTOCOL_2_COMMIT, "node"],
                         capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"no commit {PROTOCOL_2_COMMIT} in this checkout: {out.stderr.decode().strip()}")
    pyz = tmp_path / "protocol2.pyz"
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar, zipfile.ZipFile(pyz, "w") as zf:
        zf.writestr("__main__.py", artifact.MAIN)
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".py"):
                zf.writestr(member.name, tar.extractfile(member).read())
    return pyz


def test_a_worker_one_protocol_older_is_served(agents, protocol_2_pyz):
    agents.start_master()
    agents.start_worker(entry=[str(protocol_2_pyz)], concurrency=2)
    (worker,) = agents.wait_workers(1)
    assert (worker["protocol"], worker["version"]) == (PROTOCOL - 1, None)
    with agents.client() as client:
        results = client.submit("square", [(n,) for n in range(20)]).wait()
    assert [r.value for r in results] == [n * n for n in range(20)]
    assert f"protocol {PROTOCOL - 1}" in agents.cli("status").stdout


def test_a_worker_newer_than_its_master_is_refused_plainly_and_keeps_trying(agents, protocol_2_pyz):
    agents.start_master(entry=[str(protocol_2_pyz)])
    worker = agents.start_worker()
    wait_for(lambda: "refused this worker" in worker.text(), 30, "the worker to log the refusal")
    assert f"speaks protocol {PROTOCOL - 1}, the worker {PROTOCOL}" in worker.text()
    assert "Traceback" not in worker.text() and worker.alive()
    assert [w for w in agents.status()["workers"] if w["alive"]] == []
