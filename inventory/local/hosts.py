#!/usr/bin/env python3
"""Ansible inventory of the local cluster (`invoke cluster.up`): `ansible -i inventory/local ...`.

Groups `master` (tf-master) and `workers` (tf-worker1..N, N = TASKFLEET_WORKERS, else what
`cluster.up` recorded, else 2). Inventory names are the node hostnames (not the Vagrant machine
names: a host `master` would clash with the group `master`); `ansible_host` is the node's private
address (192.168.56.x), which is also the address the agents use. SSH as `vagrant` with the key
Vagrant made for each machine; become by sudo (passwordless, method set in ansible.cfg).
Host key checking is turned off for this inventory only by group_vars/all.yml beside this file
(the nodes are remade with new host keys on every `cluster.up`).

Extra host vars for tests that inject faults: `taskfleet_lxc_container` (LXC container name) and
`taskfleet_host_veth` (host side of the node's network link).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops import localcluster  # noqa: E402


def inventory() -> dict:
    nodes = localcluster.nodes(localcluster.settings())
    hostvars = {
        n.hostname: {
            "ansible_host": n.address,
            "ansible_user": "vagrant",
            "ansible_ssh_private_key_file": str(localcluster.private_key(n)),
            "taskfleet_lxc_container": n.container,
            "taskfleet_host_veth": n.veth,
        }
        for n in nodes
    }
    groups = {"master": [], "workers": []}
    for n in nodes:
        groups[n.group].append(n.hostname)
    return {
        "_meta": {"hostvars": hostvars},
        "all": {"children": ["ungrouped", *groups]},
        **{name: {"hosts": hosts} for name, hosts in groups.items()},
    }


def main(argv: list[str]) -> int:
    try:
        inv = inventory()
    except localcluster.SettingsError as e:
        print(f"inventory/local: {e}", file=sys.stderr)
        return 1
    if len(argv) == 2 and argv[1] == "--list":
        json.dump(inv, sys.stdout, indent=2)
    elif len(argv) == 3 and argv[1] == "--host":
        json.dump(inv["_meta"]["hostvars"].get(argv[2], {}), sys.stdout, indent=2)
    else:
        print("usage: hosts.py --list | --host NAME", file=sys.stderr)
        return 2
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
