"""`invoke reset`: remove taskfleet from every host of an inventory (playbooks/reset.yml)."""

from __future__ import annotations

import time

from invoke import task

from ops import inventory as inv
from ops.confirm import confirm
from ops.deploy import DEFAULT_INVENTORY, resolve_inventory, run_playbook

PLAYBOOK = "reset.yml"


@task(help={"inventory": "Ansible inventory of the fleet; default inventory/local",
            "purge_data": "delete the master's ledger too (jobs and results); without it a later deploy serves "
                          "them again",
            "yes": "do not ask for the inventory's name (for scripts)"})
def reset(c, inventory=DEFAULT_INVENTORY, purge_data=False, yes=False):
    """Remove taskfleet from every host: units, user, releases, config, key, processes (--purge-data: the ledger)."""
    path = resolve_inventory(inventory)
    fleet = inv.load(path)
    if not yes:
        kept = "DELETED" if purge_data else "kept (a later deploy serves it again)"
        confirm(f"Remove taskfleet from the {len(fleet.hosts)} host(s) of {path.name} "
                f"({', '.join(h.name for h in fleet.hosts)}): running work stops; the master's ledger is {kept}.",
                answer=path.name)
    started = time.monotonic()
    run_playbook(c, PLAYBOOK, path, what="reset",
                 extra_vars={"taskfleet_purge_data": str(bool(purge_data)).lower()})
    print(f"==> reset: taskfleet removed from {len(fleet.hosts)} host(s) in {time.monotonic() - started:.1f} s"
          f"{'' if purge_data else '; the ledger is kept'}; install again with: invoke deploy")
