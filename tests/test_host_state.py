"""playbooks/roles/common/files/host_state.py, run as the deploy runs it (a fresh
interpreter, one JSON argument) on a scratch tree: which changes its digest sees, and the
stamp it records."""

from __future__ import annotations

import getpass
import grp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "playbooks" / "roles" / "common" / "files" / "host_state.py"


@pytest.fixture
def tree(tmp_path):
    config, install, state = tmp_path / "etc", tmp_path / "opt", tmp_path / "var"
    for d in (config, install / "releases" / "1", state):
        d.mkdir(parents=True)
    (config / "worker.env").write_text("A=1\n")
    (install / "releases" / "1" / "node.pyz").write_bytes(b"zip")
    (install / "current").symlink_to("releases/1")
    (state / "ledger.db").write_text("jobs")
    return tmp_path


def probe(tree: Path, record: str = "", check: bool = True):
    spec = {
        "roots": [str(tree / "etc"), str(tree / "opt"), str(tree / "unit.service")],
        "shallow": [str(tree / "var")],
        "user": getpass.getuser(),
        "group": grp.getgrgid(os.getgid()).gr_name,
        "units": [],
        "nft": "",
        "stamp": str(tree / "opt" / "deployed"),
        "record": record,
    }
    run = subprocess.run([sys.executable, "-c", SCRIPT.read_text(), json.dumps(spec)],
                         capture_output=True, text=True, check=check)
    return json.loads(run.stdout) if check else run


def test_the_digest_is_stable_and_ignores_the_state_dirs_contents(tree):
    first = probe(tree)
    (tree / "var" / "ledger.db").write_text("more jobs")
    (tree / "var" / "new.db").write_text("x")
    assert probe(tree) == first


@pytest.mark.parametrize("change", [
    lambda t: (t / "etc" / "worker.env").write_text("A=2\n"),
    lambda t: (t / "etc" / "worker.env").chmod(0o600),
    lambda t: (t / "etc" / "extra").write_text(""),
    lambda t: (t / "opt" / "releases" / "1" / "node.pyz").unlink(),
    lambda t: ((t / "opt" / "current").unlink(), (t / "opt" / "current").symlink_to("releases/2")),
    lambda t: (t / "unit.service").write_text("[Unit]\n"),
    lambda t: (t / "var").chmod(0o700),
], ids=["content", "mode", "new file", "deleted file", "link target", "a missing path appears", "state dir mode"])
def test_the_digest_sees_each_kind_of_change(tree, change):
    before = probe(tree)["state"]
    change(tree)
    assert probe(tree)["state"] != before


def test_record_writes_the_stamp_and_the_stamp_is_not_part_of_the_state(tree):
    assert probe(tree)["stamp"] == ""
    recorded = probe(tree, record="inputs123")
    stamp = tree / "opt" / "deployed"
    assert stamp.read_text() == f"inputs123 {recorded['state']}\n"
    assert stamp.stat().st_mode & 0o777 == 0o600
    again = probe(tree)
    assert again == {"stamp": f"inputs123 {recorded['state']}", "state": recorded["state"]}
    assert not (tree / "opt" / "deployed.tmp").exists()


def test_a_stamp_that_cannot_be_written_is_one_line_and_leaves_nothing_behind(tree):
    (tree / "opt" / "deployed").mkdir()  # in the way
    before = probe(tree)
    run = probe(tree, record="inputs123", check=False)
    assert run.returncode == 1
    assert run.stderr.strip().startswith(f"cannot write the stamp {tree / 'opt' / 'deployed'}:")
    assert not (tree / "opt" / "deployed.tmp").exists()
    assert probe(tree) == before
