"""What the operator tasks need from an Ansible inventory: hosts, the master, the key.

Read through `ansible-inventory --list`, so every inventory form Ansible accepts works
(the local cluster's script, YAML, group_vars) and variables resolve as Ansible sees them.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from invoke.exceptions import Exit

from node.config import DEFAULT_METRICS_PORT
from ops.paths import LOCAL_INVENTORY, ROOT

ANSIBLE_INVENTORY = ROOT / ".venv" / "bin" / "ansible-inventory"
DEFAULT_PORT = 5000


@dataclass
class Host:
    name: str
    address: str
    user: str | None
    key_file: str | None
    check_host_key: bool
    groups: tuple
    vars: dict  # its variables as Ansible resolves them (vaulted ones stay encrypted)


@dataclass
class Fleet:
    inventory: Path
    hosts: list  # of Host, master first
    master_address: str  # HOST:PORT
    authkey_file: Path
    metrics_listen: str  # the master's taskfleet_metrics_listen, as written in the inventory
    tls: bool = True  # the fleet speaks TLS (taskfleet_tls): the controller uses its identities below

    def tls_dir(self, role: str = "client") -> Path | None:
        """The controller's TLS directory for `role` (client or admin), made by the
        deploy (roles/common/tasks/tls-controller.yml); None for a plaintext fleet."""
        if not self.tls:
            return None
        return Path(os.environ.get("TASKFLEET_TLS_DIR") or self.inventory / "secrets" / "tls" / "controller" / role)

    def select(self, names: str | None) -> list:
        """Hosts by comma-separated inventory names or group names (None: all)."""
        if not names:
            return self.hosts
        wanted = {n.strip() for n in names.split(",") if n.strip()}
        chosen = [h for h in self.hosts if h.name in wanted or wanted & set(h.groups)]
        unknown = wanted - {h.name for h in chosen} - {g for h in chosen for g in h.groups}
        if unknown or not chosen:
            known = ", ".join(h.name for h in self.hosts)
            raise Exit(f"no such host or group in {self.inventory}: {', '.join(sorted(unknown))} (hosts: {known})",
                       code=2)
        return chosen


def load(inventory: str | Path = LOCAL_INVENTORY) -> Fleet:
    path = Path(inventory)
    if not path.is_absolute():
        path = ROOT / path
    hint = " (bring the local cluster up first: invoke cluster.up)" if path == LOCAL_INVENTORY else ""
    if not path.exists():
        raise Exit(f"inventory {path} does not exist{hint}", code=2)
    proc = subprocess.run([str(ANSIBLE_INVENTORY), "-i", str(path), "--list"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Exit(f"ansible-inventory could not read {path}:\n{proc.stderr.strip()}", code=2)
    data = json.loads(proc.stdout)
    hostvars = data.get("_meta", {}).get("hostvars", {})
    masters = data.get("master", {}).get("hosts", [])
    workers = data.get("workers", {}).get("hosts", [])
    if len(masters) != 1:
        raise Exit(f"inventory {path} must have exactly one host in group 'master' (has {len(masters)}){hint}", code=2)
    hosts = []
    for name in masters + [w for w in workers if w not in masters]:
        hv = hostvars.get(name, {})
        groups = tuple(g for g in ("master", "workers") if name in data.get(g, {}).get("hosts", []))
        hosts.append(Host(name, hv.get("ansible_host", name), hv.get("ansible_user"),
                          hv.get("ansible_ssh_private_key_file"),
                          bool(hv.get("ansible_host_key_checking", True)), groups, hv))
    master_vars = hostvars.get(masters[0], {})
    address = master_vars.get("taskfleet_master_address", hosts[0].address)
    port = master_vars.get("taskfleet_master_port", DEFAULT_PORT)
    key = Path(os.environ.get("TASKFLEET_AUTHKEY_FILE") or path / "secrets" / "authkey")
    # The role default when the inventory does not set it (roles/common/defaults).
    metrics = str(master_vars.get("taskfleet_metrics_listen", f"127.0.0.1:{DEFAULT_METRICS_PORT}"))
    tls = _truthy(master_vars.get("taskfleet_tls", True))
    return Fleet(path, hosts, os.environ.get("TASKFLEET_MASTER") or f"{address}:{port}", key, metrics, tls)


def _truthy(value) -> bool:
    """An Ansible boolean as the inventory may write it (true, "yes", "false", 0, ...)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "y", "t")
    return bool(value)
