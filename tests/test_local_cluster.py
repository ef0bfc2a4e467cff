"""Unit tests of the local cluster's layout, inventory and tasks that need no cluster."""

import json
import re
import subprocess
import sys

import pytest

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
    assert [(n.name, n.hostname, n.group, n.address) for n in nodes] == [
        ("master", "tf-master", "master", "192.168.56.10"),
        ("worker1", "tf-worker1", "workers", "192.168.56.11"),
        ("worker2", "tf-worker2", "workers", "192.168.56.12"),
    ]
    assert nodes[1].container == "taskfleet-worker1" and nodes[1].veth == "tfv-worker1"
    assert s.controller_address == "192.168.56.1"


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
    assert localcluster.BOX_NAME in text and localcluster.BOX_FILE.name in text


def test_tasks_document_every_argument():
    for name in cluster.ns.task_names:
        t = cluster.ns[name]
        assert t.__doc__ and t.__doc__.strip().splitlines()[0], name
        assert all(a.help for a in t.get_arguments()), name
