"""Unit tests of the local cluster's layout, inventory and tasks that need no cluster."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from invoke.exceptions import Exit

from ops import cluster, localcluster
from ops.paths import ROOT

HOSTS = ROOT / "inventory" / "local" / "hosts.py"


@pytest.fixture
def no_record(tmp_path, monkeypatch):
    monkeypatch.setattr(localcluster, "STATE_FILE", tmp_path / "cluster.json")
    return tmp_path / "cluster.json"


def test_defaults_and_layout(no_record):
    s = localcluster.settings(env={})
    assert s == localcluster.Settings()
    nodes = localcluster.nodes(s)
    assert [(n.name, n.hostname, n.group, n.address, n.suite) for n in nodes] == [
        ("master", "tf-master", "master", "192.168.56.10", "bookworm"),
        ("worker1", "tf-worker1", "workers", "192.168.56.11", "bullseye"),
        ("worker2", "tf-worker2", "workers", "192.168.56.12", "trixie"),
    ]
    assert nodes[1].container == "taskfleet-worker1" and nodes[1].veth == "tfv-worker1"
    assert s.controller_address == "192.168.56.1"


def test_node_os_is_cycled_over_the_nodes_and_recorded(no_record):
    s = localcluster.settings(env={"TASKFLEET_WORKERS": "4", "TASKFLEET_NODE_OS": "trixie, bullseye"})
    assert [n.suite for n in localcluster.nodes(s)] == ["trixie", "bullseye", "trixie", "bullseye", "trixie"]
    assert s.env()["TASKFLEET_NODE_OS"] == "trixie,bullseye"
    localcluster.record(s)
    assert localcluster.settings(env={}).node_os == "trixie,bullseye"
    assert json.loads(no_record.read_text())["settings"]["node_os"] == "trixie,bullseye"
    one = localcluster.settings(env={"TASKFLEET_NODE_OS": "bookworm"}, use_record=False)
    assert {n.suite for n in localcluster.nodes(one)} == {"bookworm"}
    assert localcluster.box_name("bullseye") == "taskfleet/debian11-lxc"
    assert localcluster.box_file("trixie").name == "taskfleet-debian13-lxc.box"


def test_env_overrides_record_which_overrides_defaults(no_record):
    localcluster.record(localcluster.Settings(workers=4, bridge="tfbr7"))
    s = localcluster.settings(env={"TASKFLEET_WORKERS": "3"})
    assert (s.workers, s.bridge) == (3, "tfbr7")
    assert localcluster.settings(env={}, use_record=False) == localcluster.Settings()
    localcluster.forget()
    assert localcluster.recorded() is None


@pytest.mark.parametrize(
    "env, word",
    [
        ({"TASKFLEET_WORKERS": "two"}, "whole number"),
        ({"TASKFLEET_WORKERS": "0"}, "out of range"),
        ({"TASKFLEET_SUBNET": "10.0.0.0"}, "three octets"),
        ({"TASKFLEET_SUBNET": "192.168.300"}, "three octets"),
        ({"TASKFLEET_BRIDGE": "a-bridge-name-too-long"}, "interface name"),
        ({"TASKFLEET_VETH_PREFIX": "very-long-"}, "over 15"),
        ({"TASKFLEET_NODE_OS": "bookworm,buster"}, "unknown suite 'buster'"),
        ({"TASKFLEET_NODE_OS": "bookworm,,trixie"}, "unknown suite ''"),
    ],
)
def test_bad_settings_say_which_and_why(no_record, env, word):
    with pytest.raises(localcluster.SettingsError, match=word):
        localcluster.settings(env=env)


def _inventory(env_extra):
    env = {"PATH": "/usr/bin:/bin", **env_extra}
    out = subprocess.run([sys.executable, str(HOSTS), "--list"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_inventory_follows_taskfleet_workers():
    inv = _inventory({"TASKFLEET_WORKERS": "3", "TASKFLEET_SUBNET": "192.168.56"})
    assert inv["master"]["hosts"] == ["tf-master"]
    assert inv["workers"]["hosts"] == ["tf-worker1", "tf-worker2", "tf-worker3"]
    hv = inv["_meta"]["hostvars"]["tf-worker3"]
    assert hv["ansible_host"] == "192.168.56.13"
    assert hv["ansible_user"] == "vagrant"
    assert hv["ansible_ssh_private_key_file"].endswith("/.vagrant/machines/worker3/lxc/private_key")


def test_inventory_reports_bad_settings():
    env = {"TASKFLEET_WORKERS": "-1"}
    out = subprocess.run([sys.executable, str(HOSTS), "--list"], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "TASKFLEET_WORKERS" in out.stderr


def test_vagrantfile_defaults_match_localcluster():
    text = (ROOT / "Vagrantfile").read_text()
    d = localcluster.Settings()
    assert f'env_int("TASKFLEET_WORKERS", {d.workers},' in text
    assert f'env_int("TASKFLEET_NODE_MEMORY_MB", {d.memory_mb},' in text
    for var, value in [
        ("TASKFLEET_SUBNET", d.subnet),
        ("TASKFLEET_BRIDGE", d.bridge),
        ("TASKFLEET_LXC_PREFIX", d.lxc_prefix),
        ("TASKFLEET_VETH_PREFIX", d.veth_prefix),
    ]:
        assert re.search(rf'"{var}".*"{re.escape(value)}"', text), var
    assert f'"TASKFLEET_NODE_OS", "").then {{ |v| v.empty? ? "{d.node_os}"' in text
    for suite, (release, _python) in localcluster.SUITES.items():
        assert f'"{suite}" => {release}' in text, suite
    assert '"taskfleet/debian#{SUITES[suite]}-lxc"' in text
    assert '"taskfleet-debian#{SUITES[suite]}-lxc.box"' in text


@pytest.mark.skipif(not shutil.which("ruby"), reason="needs ruby to load the Vagrantfile")
def test_vagrantfile_cycles_and_validates_node_os():
    """The Vagrantfile (as Vagrant loads it, with a stand-in `Vagrant` module) makes the same
    machines and boxes as localcluster.nodes, and refuses an unknown suite in one line."""
    stub = (
        "module Vagrant; def self.require_version(*); end; def self.configure(*); end; end; "
        "load ARGV[0]; NODES.each { |n, ip, suite| puts [n, ip, suite, lxc_box(suite)].join(' ') }"
    )
    env = {"PATH": "/usr/bin:/bin", "TASKFLEET_WORKERS": "3", "TASKFLEET_NODE_OS": "trixie,bookworm"}
    out = subprocess.run(["ruby", "-e", stub, str(ROOT / "Vagrantfile")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    s = localcluster.settings(env=env, use_record=False)
    want = [f"{n.name} {n.address} {n.suite} {localcluster.box_name(n.suite)}" for n in localcluster.nodes(s)]
    assert out.stdout.splitlines() == want
    env["TASKFLEET_NODE_OS"] = "bookworm,jessie"
    out = subprocess.run(["ruby", "-e", stub, str(ROOT / "Vagrantfile")], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and 'unknown suite "jessie"' in out.stderr


def test_up_raises_the_inotify_instance_limit_never_lowers_it(tmp_path, monkeypatch, capsys):
    limit = tmp_path / "max_user_instances"
    monkeypatch.setattr(cluster, "INOTIFY_INSTANCES", limit)
    limit.write_text("128\n")
    cluster._ensure_inotify()
    assert int(limit.read_text()) == cluster.MIN_INOTIFY_INSTANCES
    assert "from 128 to" in capsys.readouterr().out
    limit.write_text("1048576\n")
    cluster._ensure_inotify()
    assert limit.read_text() == "1048576\n"


def test_long_steps_print_elapsed_time_and_stage(tmp_path, capsys):
    """cluster.up's box steps are not silent: a line with the elapsed seconds and each running
    job's latest output line (debootstrap's stage) while they run; a failure shows its log."""
    step = "echo 'I: Retrieving libc6'; sleep 1.2; echo 'I: Configuring libc6'; sleep 1.2"
    logs = {"bullseye": tmp_path / "a.log", "trixie": tmp_path / "b.log"}
    cluster._run_all("building boxes", {k: ["sh", "-c", step] for k in logs}, logs, every=0.4)
    out = capsys.readouterr().out
    assert re.search(r"building boxes: \d+ s; bullseye: I: Retrieving libc6; trixie: I: Retrieving libc6", out)
    assert re.search(r"building boxes: \d+ s; bullseye: I: Configuring libc6", out)
    with pytest.raises(Exit, match="building boxes failed for trixie"):
        cluster._run_all(
            "building boxes", {"bullseye": ["true"], "trixie": ["sh", "-c", "echo 'E: no such suite'; exit 1"]}, logs
        )
    assert "E: no such suite" in capsys.readouterr().err


def test_tasks_document_every_argument():
    for name in cluster.ns.task_names:
        t = cluster.ns[name]
        assert t.__doc__ and t.__doc__.strip().splitlines()[0], name
        assert all(a.help for a in t.get_arguments()), name
