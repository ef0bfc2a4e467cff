"""The local cluster's layout: which nodes, their addresses and their names on this machine.

Standard library only: `inventory/local/hosts.py` imports it too. The Vagrantfile reads the same
environment variables with the same defaults (keep the two in step):

| env var | default | what |
|---|---|---|
| TASKFLEET_WORKERS | 2 (or what `cluster.up` recorded) | number of workers |
| TASKFLEET_SUBNET | 192.168.56 | /24 prefix of the host-only network |
| TASKFLEET_BRIDGE | tfbr0 | host-only bridge on this machine |
| TASKFLEET_LXC_PREFIX | taskfleet- | LXC container name = prefix + machine name |
| TASKFLEET_VETH_PREFIX | tfv- | host side of each node's veth = prefix + machine name |
| TASKFLEET_NODE_MEMORY_MB | 512 | memory limit of each LXC node |
| TASKFLEET_NODE_OS | bookworm,bullseye,trixie | Debian suites, cycled over master, worker1, worker2, ... |

The default cluster mixes Debian 12 (Python 3.11), 11 (3.9) and 13 (3.13): one LXC box per suite,
built locally by ops/lxc-box.sh.

Node and bridge names are global on the machine, hence configurable. `cluster.up` records the
settings it used in `.cluster/cluster.json`, so `cluster.down` removes exactly what was made
even when the environment changed in between.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ops.paths import CLUSTER_DIR, ROOT

STATE_FILE = CLUSTER_DIR / "cluster.json"
# Debian suites a node can run, with their release number and Python (what the nodes get).
SUITES = {"bullseye": ("11", "3.9"), "bookworm": ("12", "3.11"), "trixie": ("13", "3.13")}
DEFAULT_NODE_OS = "bookworm,bullseye,trixie"
VAGRANT_HOME = CLUSTER_DIR / "vagrant.d"
VAGRANT_DOTFILE_DIR = ROOT / ".vagrant"
MAX_WORKERS = 200
IFNAMSIZ = 15  # longest Linux interface name


class SettingsError(ValueError):
    """A TASKFLEET_* setting is invalid: the message says which and why."""


@dataclass(frozen=True)
class Settings:
    workers: int = 2
    subnet: str = "192.168.56"
    bridge: str = "tfbr0"
    lxc_prefix: str = "taskfleet-"
    veth_prefix: str = "tfv-"
    memory_mb: int = 512
    node_os: str = DEFAULT_NODE_OS  # comma-separated suites, cycled over the nodes

    @property
    def suites(self) -> list[str]:
        """The suites in TASKFLEET_NODE_OS order, as given (a suite may repeat)."""
        return self.node_os.split(",")

    @property
    def controller_address(self) -> str:
        return f"{self.subnet}.1"

    def env(self) -> dict[str, str]:
        """The TASKFLEET_* variables that make the Vagrantfile see these settings."""
        return {
            "TASKFLEET_WORKERS": str(self.workers),
            "TASKFLEET_SUBNET": self.subnet,
            "TASKFLEET_BRIDGE": self.bridge,
            "TASKFLEET_LXC_PREFIX": self.lxc_prefix,
            "TASKFLEET_VETH_PREFIX": self.veth_prefix,
            "TASKFLEET_NODE_MEMORY_MB": str(self.memory_mb),
            "TASKFLEET_NODE_OS": self.node_os,
        }


@dataclass(frozen=True)
class Node:
    name: str  # Vagrant machine name: master, worker1, ...
    hostname: str  # tf-master, tf-worker1, ... (also the Ansible inventory name)
    group: str  # master | workers
    address: str  # on the host-only network
    container: str  # LXC container name
    veth: str  # host side of the node's veth pair
    suite: str  # Debian suite of its box: bullseye, bookworm, trixie


def box_name(suite: str) -> str:
    """Vagrant's name of the suite's box, e.g. taskfleet/debian11-lxc."""
    return f"taskfleet/debian{SUITES[suite][0]}-lxc"


def box_file(suite: str) -> Path:
    """Where `cluster.up` keeps the suite's built box."""
    return CLUSTER_DIR / "boxes" / f"taskfleet-debian{SUITES[suite][0]}-lxc.box"


def recorded() -> Settings | None:
    """The settings `cluster.up` last used, or None when no cluster was brought up."""
    try:
        data = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None
    fields = Settings.__dataclass_fields__
    return Settings(**{k: v for k, v in data.get("settings", {}).items() if k in fields})


def record(settings: Settings) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps({"settings": asdict(settings)}, indent=2) + "\n")


def forget() -> None:
    STATE_FILE.unlink(missing_ok=True)


def _int(env, key: str, default: int, low: int, high: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise SettingsError(f"{key}={value} is out of range ({low}..{high})")
    return value


def settings(env=None, use_record: bool = True) -> Settings:
    """Settings from the environment; unset variables fall back to what `cluster.up` recorded
    (when use_record), then to the defaults."""
    env = os.environ if env is None else env
    base = (recorded() if use_record else None) or Settings()
    s = Settings(
        workers=_int(env, "TASKFLEET_WORKERS", base.workers, 1, MAX_WORKERS),
        subnet=env.get("TASKFLEET_SUBNET") or base.subnet,
        bridge=env.get("TASKFLEET_BRIDGE") or base.bridge,
        lxc_prefix=env.get("TASKFLEET_LXC_PREFIX") or base.lxc_prefix,
        veth_prefix=env.get("TASKFLEET_VETH_PREFIX") or base.veth_prefix,
        memory_mb=_int(env, "TASKFLEET_NODE_MEMORY_MB", base.memory_mb, 64, 65536),
        node_os=(env.get("TASKFLEET_NODE_OS") or base.node_os).replace(" ", ""),
    )
    unknown = [x for x in s.suites if x not in SUITES]
    if unknown:
        raise SettingsError(
            f"TASKFLEET_NODE_OS={s.node_os!r}: unknown suite {unknown[0]!r} (want a comma-separated list of "
            f"{', '.join(SUITES)})"
        )
    if not re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})", s.subnet) or any(
        int(p) > 255 for p in s.subnet.split(".")
    ):
        raise SettingsError(f"TASKFLEET_SUBNET={s.subnet!r}: want the first three octets, e.g. 192.168.56")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.bridge) or len(s.bridge) > IFNAMSIZ:
        raise SettingsError(f"TASKFLEET_BRIDGE={s.bridge!r}: want an interface name of 1-{IFNAMSIZ} chars")
    if not re.fullmatch(r"[A-Za-z0-9_.-]*", s.lxc_prefix):
        raise SettingsError(f"TASKFLEET_LXC_PREFIX={s.lxc_prefix!r}: letters, digits, '_', '.', '-' only")
    longest = f"{s.veth_prefix}worker{s.workers}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]*", s.veth_prefix) or len(longest) > IFNAMSIZ:
        raise SettingsError(
            f"TASKFLEET_VETH_PREFIX={s.veth_prefix!r}: interface {longest!r} would be over {IFNAMSIZ} chars"
        )
    return s


def nodes(s: Settings) -> list[Node]:
    """The master then worker1..N: the same list the Vagrantfile makes."""
    names = [("master", "master")] + [(f"worker{i}", "workers") for i in range(1, s.workers + 1)]
    return [
        Node(
            name=name,
            hostname=f"tf-{name}",
            group=group,
            address=f"{s.subnet}.{10 + i}",
            container=f"{s.lxc_prefix}{name}",
            veth=f"{s.veth_prefix}{name}",
            suite=s.suites[i % len(s.suites)],
        )
        for i, (name, group) in enumerate(names)
    ]


def private_key(node: Node) -> Path:
    """The SSH key Vagrant generated for the node (whichever provider made it)."""
    made = sorted(VAGRANT_DOTFILE_DIR.glob(f"machines/{node.name}/*/private_key"))
    return made[0] if made else VAGRANT_DOTFILE_DIR / "machines" / node.name / "lxc" / "private_key"
