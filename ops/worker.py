"""`invoke worker.remove`: take worker hosts out of the fleet (playbooks/remove-worker.yml)."""

from __future__ import annotations

import time

from invoke import Collection, task
from invoke.exceptions import Exit

from ops import inventory as inv
from ops.confirm import confirm
from ops.deploy import DEFAULT_INVENTORY, resolve_inventory, run_playbook

PLAYBOOK = "remove-worker.yml"


@task(positional=["hosts"], auto_shortflags=False,
      help={"hosts": "worker hosts to remove, as the inventory names them: comma- or space-separated",
            "inventory": "Ansible inventory of the fleet; default inventory/local",
            "yes": "do not ask for confirmation (for scripts)"})
def remove(c, hosts, inventory=DEFAULT_INVENTORY, yes=False):
    """Drain and remove worker hosts: stop, disable, delete their files, unit and user; the master forgets them."""
    path = resolve_inventory(inventory)
    fleet = inv.load(path)
    names = hosts.replace(",", " ").split()
    chosen = fleet.select(",".join(names))
    if not names or any("workers" not in h.groups or "master" in h.groups for h in chosen):
        raise Exit(f"worker.remove: name worker hosts only (workers: "
                   f"{', '.join(h.name for h in fleet.hosts if 'workers' in h.groups)})", 2)
    if not yes:
        confirm(f"Remove {', '.join(names)} from the fleet of {path.name}? Each worker drains (running tasks finish, "
                "the rest go back to the master), then its taskfleet files, unit and user are deleted.")
    started = time.monotonic()
    run_playbook(c, PLAYBOOK, path, what="remove-worker", extra_vars={"taskfleet_remove": ",".join(names)})
    print(f"==> worker.remove: {', '.join(names)} removed in {time.monotonic() - started:.1f} s; "
          f"bring one back with: invoke deploy --limit HOST")


ns = Collection("worker")
ns.add_task(remove)
