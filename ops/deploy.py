"""`invoke deploy`: build the artifact, then run playbooks/site.yml with Ansible.

`run_playbook` runs any of the playbooks the same way (`invoke upgrade` and `rollback` too).
The full Ansible output of every run is kept in .cluster/logs/WHAT-TIMESTAMP.log (0600),
so a deploy can be read again later, and so tests can prove the authkey never shows up.
"""

import os
import re
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from ops import artifact
from ops.paths import CLUSTER_DIR, LOCAL_INVENTORY, ROOT

VENV_BIN = ROOT / ".venv" / "bin"
LOG_DIR = CLUSTER_DIR / "logs"
CONTROL_PATH_DIR = CLUSTER_DIR / "ansible-cp"
DEFAULT_INVENTORY = "inventory/local"
# Opt-in: Mitogen's strategy (one Python interpreter kept per host instead of one per task),
# for every playbook run while TASKFLEET_MITOGEN=1, or a deploy with --mitogen.
MITOGEN_ENV = "TASKFLEET_MITOGEN"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "tf-master : ok=12 changed=0 unreachable=0 failed=0 skipped=3 rescued=0 ignored=0"
RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$")


class _Tee:
    """File-like object for invoke's out_stream: echo to the terminal, keep a plain copy."""

    def __init__(self, log):
        self.log = log

    def write(self, data):
        sys.stdout.write(data)
        self.log.write(ANSI.sub("", data))

    def flush(self):
        sys.stdout.flush()
        self.log.flush()


def parse_recap(output: str) -> dict:
    """Return {host: {"ok": n, "changed": n, "unreachable": n, "failed": n, ...}} from PLAY RECAP."""
    text = ANSI.sub("", output)
    if "PLAY RECAP" not in text:
        return {}
    recap = {}
    for line in text.rsplit("PLAY RECAP", 1)[1].splitlines()[1:]:
        match = RECAP_LINE.match(line.strip())
        if match:
            counts = dict(pair.split("=") for pair in match["counts"].split())
            recap[match["host"]] = {key: int(value) for key, value in counts.items()}
        elif recap and line.strip() == "":
            break
    return recap


def _check_inventory(inventory: Path) -> None:
    is_local = inventory.resolve() == LOCAL_INVENTORY.resolve()
    hint = " Start the local cluster first: invoke cluster.up" if is_local else ""
    if not inventory.exists():
        raise Exit(f"deploy: inventory {inventory} does not exist.{hint}", code=2)
    if inventory.is_dir():
        sources = [p for p in inventory.iterdir() if p.name not in ("group_vars", "host_vars", "secrets")]
        if not sources:
            raise Exit(f"deploy: inventory {inventory} lists no hosts (only variables).{hint}", code=2)


def _leaked_authkey(inventory: Path, output: str) -> bool:
    """True if a controller-generated authkey of this inventory (the key, or the next one
    while a rotation is under way) appears in the output."""
    secrets = (inventory if inventory.is_dir() else inventory.parent) / "secrets"
    for key_file in (secrets / "authkey", secrets / "authkey.next"):
        try:
            key = key_file.read_text().strip()
        except OSError:
            continue
        if key and key in output:
            return True
    return False


def resolve_inventory(inventory: str) -> Path:
    """The inventory path (relative to the working directory, else the checkout), checked."""
    inv = Path(inventory)
    if not inv.is_absolute():
        inv = (Path.cwd() / inv) if (Path.cwd() / inv).exists() else ROOT / inv
    _check_inventory(inv)
    return inv


def mitogen_env() -> dict:
    """The environment that makes ansible-playbook use Mitogen's linear strategy."""
    import importlib.util

    spec = importlib.util.find_spec("ansible_mitogen")
    if spec is None or not spec.submodule_search_locations:
        raise Exit("Mitogen is not installed in .venv: run tasks through ./invoke, which installs it.", 2)
    plugins = Path(list(spec.submodule_search_locations)[0]) / "plugins" / "strategy"
    return {"ANSIBLE_STRATEGY_PLUGINS": str(plugins), "ANSIBLE_STRATEGY": "mitogen_linear"}


def run_playbook(c, playbook: str, inv: Path, *, what: str = "deploy", limit=None, check=False,
                 extra_vars: dict | None = None, mitogen: bool = False) -> dict:
    """Run playbooks/PLAYBOOK against `inv` with the pinned ansible-playbook, output streamed
    and kept in .cluster/logs/WHAT-TIMESTAMP.log (0600). Returns the PLAY RECAP; raises Exit
    with one line naming the unreachable or failed hosts, or a leaked authkey."""
    playbook_bin = VENV_BIN / "ansible-playbook"
    if not playbook_bin.exists():
        raise Exit(f"{what}: .venv has no ansible-playbook: run tasks through ./invoke, which makes it.", 2)
    cmd = [str(playbook_bin), "-i", str(inv), f"playbooks/{playbook}"]
    if limit:
        cmd += ["--limit", limit]
    if check:
        cmd += ["--check", "--diff"]
    for name, value in (extra_vars or {}).items():
        cmd += ["-e", f"{name}={value}"]

    CONTROL_PATH_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{what}-{datetime.now():%Y%m%d-%H%M%S-%f}.log"
    env = {
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(CONTROL_PATH_DIR),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    if sys.stdout.isatty():
        env["ANSIBLE_FORCE_COLOR"] = "1"  # colours on the terminal; the log is kept plain
    if mitogen or os.environ.get(MITOGEN_ENV, "") not in ("", "0"):
        env.update(mitogen_env())

    strategy = " (strategy: mitogen_linear)" if "ANSIBLE_STRATEGY" in env else ""
    print(f"==> {' '.join(cmd)}{strategy}\n==> full output: {log_path.relative_to(ROOT)}")
    started = time.monotonic()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as log, c.cd(str(ROOT)):
        log.write(f"# {datetime.now().isoformat(timespec='seconds')} {' '.join(cmd)}\n")
        result = c.run(shlex.join(cmd), env=env, warn=True, pty=False,
                       out_stream=_Tee(log), err_stream=_Tee(log), in_stream=False)
        elapsed = time.monotonic() - started
        log.write(f"# exit code {result.exited}, {elapsed:.1f} s\n")

    output = result.stdout + result.stderr
    recap = parse_recap(output)
    print(f"==> ansible-playbook exited {result.exited} after {elapsed:.1f} s")
    if recap:
        total_changed = sum(counts["changed"] for counts in recap.values())
        print(f"==> {len(recap)} hosts, {total_changed} changed{' (check mode)' if check else ''}")

    if _leaked_authkey(inv, output):
        raise Exit(
            f"{what}: SECURITY: the authkey appears in the Ansible output ({log_path}). Rotate it "
            "(invoke key.rotate) and fix the task that leaked it.",
            3,
        )
    unreachable = sorted(h for h, counts in recap.items() if counts.get("unreachable"))
    failed = sorted(h for h, counts in recap.items() if counts.get("failed"))
    if unreachable:
        hint = ""
        if inv.resolve() == LOCAL_INVENTORY.resolve():
            hint = " Is the local cluster up? Start it with: invoke cluster.up"
        raise Exit(f"{what}: unreachable over SSH: {', '.join(unreachable)}.{hint}", 4)
    if failed:
        raise Exit(f"{what}: ansible-playbook failed on {', '.join(failed)} (see above, or {log_path}).", 2)
    if result.exited != 0:
        raise Exit(f"{what}: ansible-playbook failed with exit code {result.exited} (see {log_path}).", 1)
    if not recap:
        raise Exit(f"{what}: no PLAY RECAP: no host matched (check --limit and the inventory).", 1)
    return recap


@task(
    help={
        "inventory": "Ansible inventory (directory or file) to deploy to; default inventory/local",
        "limit": "only these hosts or groups (Ansible --limit pattern, e.g. 'worker1' or 'workers'); "
                 "a new host joins with --limit NEWHOST, changing nothing elsewhere",
        "check": "dry run: show what would change (ansible-playbook --check --diff), change nothing",
        "full": "run every task on every host, also on hosts unchanged since their last deploy "
                "(by default those are skipped)",
        "mitogen": "run Ansible with Mitogen's strategy (about 3x faster on many hosts; TASKFLEET_MITOGEN=1 "
                   "does so for every playbook run)",
    }
)
def deploy(c, inventory=DEFAULT_INVENTORY, limit=None, check=False, full=False, mitogen=False):
    """Deploy the node agents with Ansible (builds the artifact first; workers restart in batches)."""
    inv = resolve_inventory(inventory)
    built = artifact.build()
    print(f"==> built {built.relative_to(ROOT)}")
    run_playbook(c, "site.yml", inv, limit=limit, check=check,
                 extra_vars={"taskfleet_skip_unchanged": False} if full else None, mitogen=mitogen)
