"""`invoke upgrade` and `invoke rollback`: roll a release across an installed fleet.

Both run the same rolling plays (playbooks/play-*.yml): the master and the workers in batches,
each batch joined again on the release before the next. `upgrade` builds this tree and
goes master first (playbooks/upgrade.yml); `rollback` flips the hosts back to a release they
still keep, workers first (playbooks/rollback.yml), and asks first. Version skew and what
to do when one stops halfway: docs/operations.md.
"""

import re
import time

from invoke import task
from invoke.exceptions import Exit

from ops import artifact
from ops.confirm import confirm
from ops.deploy import DEFAULT_INVENTORY, resolve_inventory, run_playbook
from ops.paths import ROOT

DEFAULT_BATCH = "25%"
BATCH = re.compile(r"([1-9]\d*)%?")


def batch_size(text: str) -> str:
    """A batch of workers as the plays' `serial` takes it: N (workers) or N% (1..100)."""
    match = BATCH.fullmatch(str(text).strip())
    if not match or (text.strip().endswith("%") and int(match[1]) > 100):
        raise Exit(f"--batch {text!r}: want a number of workers (e.g. 2) or a percentage of them (e.g. 25%)", 2)
    return text.strip()


def _rolling_vars(batch: str) -> dict:
    return {"taskfleet_worker_batch": batch_size(batch)}


@task(
    help={
        "inventory": "Ansible inventory of the fleet; default inventory/local",
        "batch": f"workers restarted at once: N or N% of them (default {DEFAULT_BATCH}, at least one)",
        "no_build": "roll out the last build (dist/VERSION, e.g. made by CI) instead of building this tree",
    }
)
def upgrade(c, inventory=DEFAULT_INVENTORY, batch=DEFAULT_BATCH, no_build=False):
    """Rolling upgrade to this tree's build: master first, then workers in batches, none lost."""
    extra = _rolling_vars(batch)
    inv = resolve_inventory(inventory)
    if no_build:
        latest = artifact.DIST / artifact.LATEST
        if not latest.exists():
            raise Exit("upgrade: no build in dist/ (dist/VERSION is missing): run `invoke build` or drop --no-build", 2)
        print(f"==> rolling out the last build, {latest.read_text().strip()}")
    else:
        built = artifact.build()
        print(f"==> built {built.relative_to(ROOT)}")
    started = time.monotonic()
    run_playbook(c, "upgrade.yml", inv, what="upgrade", extra_vars=extra)
    print(f"==> upgraded in {time.monotonic() - started:.1f} s")


@task(
    help={
        "inventory": "Ansible inventory of the fleet; default inventory/local",
        "to": "release to go back to (as in /opt/taskfleet/releases/); default: the one before the current one",
        "batch": f"workers restarted at once: N or N% of them (default {DEFAULT_BATCH}, at least one)",
        "yes": "do not ask for confirmation (for scripts)",
    }
)
def rollback(c, inventory=DEFAULT_INVENTORY, to=None, batch=DEFAULT_BATCH, yes=False):
    """Roll back to the previous (or --to) release kept on the hosts: workers first, no rebuild."""
    extra = _rolling_vars(batch)
    if to is not None:
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", to):
            raise Exit(f"rollback: --to {to!r} is not a release name (e.g. 0.1.0+0123456789ab)", 2)
        extra["taskfleet_rollback_to"] = to
    inv = resolve_inventory(inventory)
    if not yes:
        confirm(f"Roll every host of {inv.name} back to {to or 'the previous release'}, restarting each agent "
                "(workers first, in batches)?")
    started = time.monotonic()
    run_playbook(c, "rollback.yml", inv, what="rollback", extra_vars=extra)
    print(f"==> rolled back in {time.monotonic() - started:.1f} s")
