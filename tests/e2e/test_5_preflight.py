"""Preflight refuses hosts it cannot serve, naming each and what is missing, before anything
changes on any host.

The deploy goes to the real local cluster through an inventory that is the local one plus
host_vars making two real hosts unfit: the bullseye worker (its real Python 3.9.2) must have
Python >= 3.10, and the trixie worker's interpreter is a path that does not exist there.
"""

from __future__ import annotations

import re

from ops.deploy import parse_recap
from ops.paths import LOCAL_INVENTORY

STATE = "readlink /opt/taskfleet/current; systemctl show -p MainPID --value taskfleet-master taskfleet-worker"


def test_preflight_refuses_unfit_hosts_and_changes_nothing(cluster, master_host, worker_hosts, operator, tmp_path):
    by_suite = {n.suite: n for n in cluster if n.group == "workers"}
    old, absent = by_suite["bullseye"].hostname, by_suite["trixie"].hostname
    inv = tmp_path / "unfit"
    (inv / "host_vars").mkdir(parents=True)
    (inv / "hosts.py").symlink_to(LOCAL_INVENTORY / "hosts.py")
    (inv / "group_vars").symlink_to(LOCAL_INVENTORY / "group_vars")
    (inv / "host_vars" / f"{old}.yml").write_text('taskfleet_min_python_version: "3.10"\n')
    (inv / "host_vars" / f"{absent}.yml").write_text("taskfleet_python: /usr/bin/python3.8\n")
    hosts = [n.hostname for n in cluster]
    # The installed release and the agents' main PIDs: a deploy that touched a host changes them.
    before = [h.check_output(STATE) for h in (master_host, *worker_hosts)]

    proc = operator("deploy", "--inventory", str(inv), check=False)

    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    refused = rf"{old} cannot run taskfleet: Python 3\.9\.\d+ \(/usr/bin/python3\) is older than 3\.10\."
    assert re.search(refused, out), out
    refused = rf"{absent} cannot run taskfleet: /usr/bin/python3\.8 does not run there .*needs Python >= 3\.9"
    assert re.search(refused, out), out
    assert "PLAY [Deploy the master]" not in out and "PLAY [Deploy the workers]" not in out
    recap = parse_recap(out)
    assert set(recap) == set(hosts) and all(c["changed"] == 0 for c in recap.values()), recap
    assert recap[old]["failed"] == 1 and recap[absent]["failed"] == 1
    assert not (inv / "secrets").exists()  # not even the controller-side authkey was made
    assert [h.check_output(STATE) for h in (master_host, *worker_hosts)] == before

