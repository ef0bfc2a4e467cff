"""`invoke cluster.*`: the local test cluster (Vagrant + LXC on this Linux machine).

`cluster.up` installs what is missing (Debian packages), makes the host-only bridge, builds one
box per Debian suite once (ops/lxc-box.sh, in parallel, cached under .cluster/boxes/), runs
`vagrant up` and waits for SSH on every node. `cluster.down` destroys the nodes and the bridge
and leaves nothing running. Layout and settings: ops/localcluster.py; inventory: inventory/local/.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit

from ops import apt
from ops import localcluster as lc
from ops.paths import CLUSTER_DIR, ROOT

PACKAGES = [
    "vagrant", "vagrant-lxc", "lxc", "debootstrap", "sudo", "iproute2", "iputils-ping", "openssh-client",
]  # fmt: skip
BOX_SCRIPT = ROOT / "ops" / "lxc-box.sh"
SSH_OPTS = [
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes", "-o", "ConnectTimeout=3",
]  # fmt: skip


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _preflight() -> None:
    if not sys.platform.startswith("linux"):
        raise Exit(
            "cluster: the local cluster needs Linux (LXC). On macOS/Windows use the Vagrantfile's "
            "VirtualBox branch by hand: `vagrant up --provider=virtualbox`.",
            code=1,
        )
    if os.geteuid() != 0:
        raise Exit(
            "cluster: run as root (it installs packages, makes a bridge and LXC containers): "
            "`sudo ./invoke cluster.up`.",
            code=1,
        )


def _settings(recorded_first: bool = False) -> lc.Settings:
    try:
        if recorded_first:
            return lc.recorded() or lc.settings(use_record=False)
        return lc.settings()
    except lc.SettingsError as e:
        raise Exit(f"cluster: {e}. Fix or unset it and try again.", code=1) from None


def _run(*cmd: str, check: bool = True, quiet: bool = False, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("text", True)
    if quiet:
        kw.setdefault("capture_output", True)
    proc = subprocess.run(cmd, **kw)
    if check and proc.returncode != 0:
        detail = (proc.stderr or "").strip() if quiet else "(output above)"
        raise Exit(f"cluster: `{' '.join(cmd)}` failed with exit code {proc.returncode}: {detail}", code=1)
    return proc


def _vagrant_env(s: lc.Settings) -> dict[str, str]:
    return {
        **os.environ,
        **s.env(),
        "VAGRANT_HOME": str(lc.VAGRANT_HOME),
        "VAGRANT_DEFAULT_PROVIDER": "lxc",
        "VAGRANT_CHECKPOINT_DISABLE": "1",  # no version check over the network
        "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",
        "VAGRANT_NO_COLOR": "1",
    }


def _vagrant(s: lc.Settings, *args: str, check: bool = True, quiet: bool = False):
    return _run("vagrant", *args, check=check, quiet=quiet, cwd=ROOT, env=_vagrant_env(s))


# --- packages -----------------------------------------------------------------------------


def _ensure_packages() -> None:
    apt.ensure(PACKAGES, "cluster")


# --- host-only bridge ---------------------------------------------------------------------


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _addresses() -> list[tuple[str, str]]:
    """(interface, address/prefix) for every IPv4 address on this machine."""
    out = _run("ip", "-4", "-o", "addr", "show", quiet=True).stdout
    return [(f[1], f[3]) for f in (line.split() for line in out.splitlines()) if len(f) > 3]


def _ensure_bridge(s: lc.Settings) -> None:
    want = f"{s.controller_address}/24"
    for dev, addr in _addresses():
        if dev != s.bridge and addr.startswith(f"{s.subnet}."):
            raise Exit(
                f"cluster: {s.subnet}.0/24 is already used by {dev} ({addr}). Pick another subnet with "
                f"TASKFLEET_SUBNET=... (the inventory and Vagrantfile follow it).",
                code=1,
            )
    if _link_exists(s.bridge) and not Path("/sys/class/net", s.bridge, "bridge").exists():
        raise Exit(f"cluster: {s.bridge} exists and is not a bridge: set TASKFLEET_BRIDGE to a free name", 1)
    if not _link_exists(s.bridge):
        _say(f"creating host-only bridge {s.bridge} ({want}; no NAT, no forwarding)")
        _run("ip", "link", "add", s.bridge, "type", "bridge")
    if (s.bridge, want) not in _addresses():
        _run("ip", "addr", "add", want, "dev", s.bridge)
    _run("ip", "link", "set", s.bridge, "up")


def _remove_bridge(s: lc.Settings) -> None:
    if not _link_exists(s.bridge):
        return
    ports = sorted(p.name for p in Path("/sys/class/net", s.bridge, "brif").glob("*"))
    if ports:
        print(f"cluster: kept bridge {s.bridge}: ports {', '.join(ports)} still attached", file=sys.stderr)
        return
    _say(f"removing bridge {s.bridge}")
    _run("ip", "link", "del", s.bridge)


# --- inotify ------------------------------------------------------------------------------

INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
# Each node's systemd and services hold inotify instances, all counted against root on this
# machine (privileged containers): the kernel's default of 128 runs out near 10 nodes (with the
# controller's own), and then services in the nodes, sshd among them, fail to start.
MIN_INOTIFY_INSTANCES = 8192


def _ensure_inotify() -> None:
    current = int(INOTIFY_INSTANCES.read_text())
    if current < MIN_INOTIFY_INSTANCES:
        _say(f"raising fs.inotify.max_user_instances from {current} to {MIN_INOTIFY_INSTANCES} (LXC nodes' systemd)")
        INOTIFY_INSTANCES.write_text(f"{MIN_INOTIFY_INSTANCES}\n")


# --- box ----------------------------------------------------------------------------------


def _script_digest() -> str:
    return hashlib.sha256(BOX_SCRIPT.read_bytes()).hexdigest()


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip()[:70] if lines else ""


def _run_all(
    what: str, jobs: dict[str, list[str]], logs: dict[str, Path], env: dict | None = None, every: float = 10.0
) -> float:
    """Run the commands of `jobs` (label -> argv) at once, each writing to its log; every `every`
    seconds print the elapsed time and each running job's latest log line (debootstrap's stage).
    Raise Exit naming the failed ones with their logs' tails; return the seconds taken."""
    t0 = time.monotonic()
    procs = {}
    for label, argv in jobs.items():
        logs[label].parent.mkdir(parents=True, exist_ok=True)
        with logs[label].open("wb") as log:
            procs[label] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env
            )
    next_tick = t0 + every
    while any(p.poll() is None for p in procs.values()):
        time.sleep(min(0.5, every))
        if time.monotonic() >= next_tick:
            next_tick += every
            running = [f"{label}: {_last_line(logs[label])}" for label, p in procs.items() if p.poll() is None]
            print(f"    {what}: {time.monotonic() - t0:.0f} s; " + "; ".join(running), flush=True)
    failed = [label for label, p in procs.items() if p.returncode != 0]
    if failed:
        for label in failed:
            tail = logs[label].read_text(errors="replace").strip().splitlines()[-15:]
            print(f"--- {label} (last lines of {logs[label]}):\n" + "\n".join(tail), file=sys.stderr)
        raise Exit(f"cluster: {what} failed for {', '.join(failed)} (logs above)", code=1)
    return time.monotonic() - t0


def _ensure_boxes(s: lc.Settings) -> None:
    """Build the box of each suite in use that is missing or was built by another
    ops/lxc-box.sh (all at once: debootstrap mostly waits on the mirror), and add the boxes
    Vagrant lacks or has older copies of. Running nodes keep the box they were made from."""
    suites = sorted(set(s.suites), key=list(lc.SUITES).index)
    made_by = {x: lc.box_file(x).with_name(lc.box_file(x).name + ".script-sha256") for x in suites}
    logs = {x: lc.box_file(x).with_name(lc.box_file(x).name + ".log") for x in suites}
    digest = _script_digest()
    missing = [
        x
        for x in suites
        if not lc.box_file(x).exists() or not made_by[x].exists() or made_by[x].read_text().strip() != digest
    ]
    if missing:
        _say(f"building LXC boxes for {', '.join(missing)} (debootstrap; a minute or two, once per box recipe)")
        took = _run_all(
            "building boxes", {x: ["bash", str(BOX_SCRIPT), x, str(lc.box_file(x))] for x in missing}, logs
        )
        for x in missing:
            made_by[x].write_text(digest + "\n")
        _say(f"boxes built in {took:.0f} s")
    stale = []
    for x in suites:
        box_dir = lc.VAGRANT_HOME / "boxes" / lc.box_name(x).replace("/", "-VAGRANTSLASH-")
        added = box_dir / "0" / "lxc" / "metadata.json"
        if not added.exists() or added.stat().st_mtime < lc.box_file(x).stat().st_mtime:
            stale.append(x)
    if stale:
        _say(f"adding boxes {', '.join(lc.box_name(x) for x in stale)} to Vagrant")
        _run_all(
            "adding boxes",
            {x: ["vagrant", "box", "add", "--force", "--name", lc.box_name(x), str(lc.box_file(x))] for x in stale},
            {x: lc.box_file(x).with_name(lc.box_file(x).name + ".add.log") for x in stale},
            env=_vagrant_env(s),
        )


# --- nodes --------------------------------------------------------------------------------


def _lxc_state(container: str) -> str:
    out = subprocess.run(["lxc-info", "-n", container, "-sH"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "ABSENT"


def _port_open(addr: str, port: int = 22, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def _ssh_ok(node: lc.Node) -> bool:
    key = lc.private_key(node)
    if not key.exists():
        return False
    cmd = ["ssh", *SSH_OPTS, "-i", str(key), f"vagrant@{node.address}", "sudo", "-n", "true"]
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


def _wait_ssh(nodes: list[lc.Node], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending:
        pending = [n for n in pending if not (_port_open(n.address) and _ssh_ok(n))]
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(f"{n.name} ({n.address})" for n in pending)
            raise Exit(
                f"cluster: no SSH to {names} after {timeout:.0f} s. Look with `invoke cluster.status` and "
                f"`lxc-attach -n CONTAINER -- journalctl -b`; start afresh with `invoke cluster.down` then "
                f"`invoke cluster.up`.",
                code=1,
            )
        time.sleep(1)


def _check_against_record(s: lc.Settings) -> None:
    """Refuse settings that would orphan what an earlier `cluster.up` made. Only the number of
    workers may change on a running cluster: more are added; fewer remove the last ones
    (their containers are destroyed), so a cluster grown for a test can shrink back."""
    rec = lc.recorded()
    if rec is None or not any(_lxc_state(n.container) != "ABSENT" for n in lc.nodes(rec)):
        return
    now, was = s.env(), rec.env()
    diff = [f"{k}={was[k]} (now {now[k]})" for k in was if was[k] != now[k]]
    if any(not d.startswith("TASKFLEET_WORKERS=") for d in diff):
        raise Exit(
            f"cluster: a cluster made with {', '.join(diff)} is up. Run `invoke cluster.down` first "
            f"(it removes what was made), or keep those settings.",
            code=1,
        )
    for n in lc.nodes(rec)[len(lc.nodes(s)):]:
        _say(f"removing {n.name} (TASKFLEET_WORKERS={s.workers}, was {rec.workers})")
        _run("lxc-stop", "-k", "-n", n.container, check=False, quiet=True)
        _vagrant(rec, "destroy", "-f", n.name)


@task(
    help={
        "timeout": "seconds to wait for SSH on every node after `vagrant up` (default 90)",
    }
)
def up(c, timeout=90):
    """Bring the local cluster up (master + TASKFLEET_WORKERS workers, default 2); idempotent.

    Needs root on Linux. Installs missing Debian packages, makes the host-only bridge
    (TASKFLEET_BRIDGE, controller at .1), builds the LXC box of each suite in TASKFLEET_NODE_OS
    once, `vagrant up`, waits for SSH.
    """
    _preflight()
    s = _settings()
    t0 = time.monotonic()
    _ensure_packages()
    _check_against_record(s)
    _ensure_bridge(s)
    _ensure_inotify()
    nodes = lc.nodes(s)
    lc.record(s)  # before `vagrant up`, so that `cluster.down` can clean up a half-made cluster
    if all(_lxc_state(n.container) == "RUNNING" for n in nodes) and all(_ssh_ok(n) for n in nodes):
        _say(f"cluster already up ({len(nodes)} nodes)")
    else:
        _ensure_boxes(s)
        _say(f"vagrant up: master + {s.workers} workers")
        proc = _vagrant(s, "up", "--provider=lxc", check=False)
        if proc.returncode != 0:
            raise Exit(
                "cluster: `vagrant up` failed (output above). Details: rerun with VAGRANT_LOG=debug. "
                "To start afresh: `invoke cluster.down` then `invoke cluster.up`.",
                code=1,
            )
        _wait_ssh(nodes, float(timeout))
    for n in nodes:
        print(f"  {n.hostname:<14} {n.address:<15} {n.group:<8} lxc {n.container}")
    _say(f"cluster up in {time.monotonic() - t0:.0f} s")
    print("  try: .venv/bin/ansible -i inventory/local all -m ping")


@task(
    help={
        "purge": "also delete .cluster/ (box, VAGRANT_HOME) and .vagrant/; the next up rebuilds the box",
    }
)
def down(c, purge=False):
    """Destroy the local cluster: nodes, bridge; nothing is left running.

    Uses the settings `cluster.up` recorded, so it removes what was made even if TASKFLEET_*
    changed since.
    """
    _preflight()
    s = _settings(recorded_first=True)
    t0 = time.monotonic()
    if shutil.which("vagrant") and shutil.which("lxc-info"):
        # Kill first: Vagrant halts each node cleanly, one after another (~6 s each), for nothing.
        for n in lc.nodes(s):
            if _lxc_state(n.container) == "RUNNING":
                _run("lxc-stop", "-k", "-n", n.container, check=False, quiet=True)
        _say(f"vagrant destroy: master + {s.workers} workers")
        proc = _vagrant(s, "destroy", "-f", check=False)
        if proc.returncode != 0:
            print("cluster: `vagrant destroy` failed; removing the containers directly", file=sys.stderr)
    if shutil.which("lxc-ls"):
        # Whatever Vagrant lost track of (e.g. .vagrant/ deleted): containers named as ours.
        names = set(_run("lxc-ls", "-1", quiet=True).stdout.split())
        for n in lc.nodes(s):
            if n.container in names:
                _say(f"removing leftover container {n.container}")
                _run("lxc-stop", "-k", "-n", n.container, check=False, quiet=True)
                _run("lxc-destroy", "-n", n.container)
    _remove_bridge(s)
    lc.forget()
    if purge:
        for path in (CLUSTER_DIR, lc.VAGRANT_DOTFILE_DIR):
            if path.exists():
                _say(f"deleting {path.relative_to(ROOT)}/")
                shutil.rmtree(path)
    _say(f"cluster down in {time.monotonic() - t0:.0f} s")


@task
def status(c):
    """Show each node: container state, ping and SSH on its private address; exit 1 if any is down."""
    _preflight()
    s = _settings()
    print(f"settings: {s}")
    if shutil.which("vagrant"):
        _vagrant(s, "status", check=False)
    bad = 0
    for n in lc.nodes(s):
        state = _lxc_state(n.container) if shutil.which("lxc-info") else "?"
        ping = subprocess.run(["ping", "-c1", "-W1", n.address], capture_output=True).returncode == 0
        ssh = _ssh_ok(n) if ping else False
        bad += not (ping and ssh)
        print(
            f"  {n.hostname:<14} {n.address:<15} lxc {n.container:<20} {state:<8} "
            f"ping {'ok' if ping else 'FAIL'}  ssh {'ok' if ssh else 'FAIL'}"
        )
    if bad:
        raise Exit(f"cluster: {bad} node(s) not reachable; `invoke cluster.up` brings them back up", 1)


ns = Collection("cluster")
ns.add_task(up)
ns.add_task(down)
ns.add_task(status)
