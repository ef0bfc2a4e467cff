"""`invoke key.rotate`: a new shared authkey for the fleet, with no downtime and no restart.

Runs playbooks/key-rotate.yml three times, Consul-keyring style: install (every host's
key file holds [old, new]), use ([new, old]: every agent dials new), remove ([new]: old
is refused). Each step is checked by the playbook on the master's view (the ring and each
worker's key, by fingerprint) and, with the controller-generated key, from here too,
before the next one starts.
"""

from __future__ import annotations

import os
import time
from multiprocessing import AuthenticationError

from invoke import Collection, task
from invoke.exceptions import Exit

from node import wire
from node.client import Client
from ops import inventory as inv
from ops.confirm import confirm
from ops.deploy import DEFAULT_INVENTORY, resolve_inventory, run_playbook

PLAYBOOK = "key-rotate.yml"
STEPS = ("install", "use", "remove")
VAULT_HINT = ("the authkey is the vaulted variable taskfleet_authkey in {inventory}: set the new one beside it as a "
              "vaulted taskfleet_authkey_next (ansible-vault encrypt_string, 32 characters or more), then run "
              "invoke key.rotate again")


def _agents(status: dict) -> set:
    """The running agents, by process: the master's pid and each live worker's id (host, pid)."""
    return {f"master pid {status['master']['pid']}"} | {w["id"] for w in status["workers"] if w["alive"]}


def _check_from_here(fleet: inv.Fleet, step: str, old: bytes, new: bytes) -> set:
    """What the controller sees after `step`: the key it should dial is served (and, after
    remove, the old one refused). Returns the running agents (_agents)."""
    dial = old if step == "install" else new
    ring = {"install": [old, new], "use": [new, old], "remove": [new]}[step]
    with Client(fleet.master_address, dial, retry_for=10, tls=fleet.tls_dir()) as client:
        status = client.status()
    seen = status["keyring"]
    expected = {"ring": [wire.fingerprint(k) for k in ring], "caller": wire.fingerprint(dial)}
    if seen != expected:
        raise Exit(f"key.rotate: after {step} the master reports {seen}, expected {expected}; "
                   "run invoke key.rotate again (each step is safe to repeat)", 1)
    if step == "remove":
        try:
            with Client(fleet.master_address, old, retry_for=0, tls=fleet.tls_dir()) as client:
                client.status()
        except AuthenticationError:
            return _agents(status)
        raise Exit("key.rotate: the master still serves the old key after remove; run invoke key.rotate again", 1)
    return _agents(status)


@task(help={"inventory": "Ansible inventory of the fleet; default inventory/local",
            "yes": "do not ask for confirmation (for scripts)"})
def rotate(c, inventory=DEFAULT_INVENTORY, yes=False):
    """Rotate the shared authkey with no downtime: install, use, remove, each checked fleet-wide."""
    path = resolve_inventory(inventory)
    fleet = inv.load(path)
    master_vars = fleet.hosts[0].vars
    vaulted = bool(master_vars.get("taskfleet_authkey"))
    if vaulted and not master_vars.get("taskfleet_authkey_next"):
        raise Exit(f"key.rotate: {VAULT_HINT.format(inventory=path)}", 2)
    current = path / "secrets" / "authkey"
    following = path / "secrets" / "authkey.next"
    if not vaulted and not current.exists():
        raise Exit(f"key.rotate: no authkey at {current}: deploy the fleet first (invoke deploy)", 2)
    if not yes:
        confirm(f"Rotate the authkey of the {len(fleet.hosts)} host(s) of {path.name} (running work carries on)?")
    started = time.monotonic()
    seen = []  # the running agents after each step
    for step in STEPS:
        step_started = time.monotonic()
        run_playbook(c, PLAYBOOK, path, what=f"key-rotate-{step}", extra_vars={"taskfleet_key_step": step})
        if not vaulted:  # the play generated secrets/authkey.next at install if it was missing
            seen.append(_check_from_here(fleet, step, wire.Keyring(str(current)).dial_key(),
                                         wire.Keyring(str(following)).dial_key()))
        print(f"==> key.rotate: {step} done and checked in {time.monotonic() - step_started:.1f} s")
    if vaulted:
        print("==> key.rotate: every host now holds taskfleet_authkey_next alone. Move its value to "
              "taskfleet_authkey and delete taskfleet_authkey_next: until then invoke deploy refuses to run.")
        return
    old, new = (wire.fingerprint(wire.Keyring(str(f)).dial_key()) for f in (current, following))
    os.replace(following, current)  # the controller now holds the new key alone
    print(f"==> key.rotate: authkey {old} replaced by {new} in {time.monotonic() - started:.1f} s")
    if seen[0] == seen[-1]:
        print(f"==> key.rotate: the same {len(seen[0])} agent process(es) ran throughout: none restarted")
    else:
        print(f"==> key.rotate: WARNING: agents changed during the rotation: {sorted(seen[0] ^ seen[-1])} "
              "(see invoke logs)")


ns = Collection("key")
ns.add_task(rotate)
