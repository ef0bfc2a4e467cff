"""`invoke certs.*`: the fleet's TLS identities, from the inventory's CA on the controller.

The CA and the identities it issued live in inventory/NAME/secrets/tls (ops/pki.py);
`invoke deploy` issues and renews them. `certs.status` lists them; `certs.revoke` locks
hosts out at once (playbooks/certs-revoke.yml: the CRL goes to the master).
"""

from __future__ import annotations

from invoke import Collection, task
from invoke.exceptions import Exit

from ops import inventory as inv
from ops.confirm import confirm
from ops.deploy import DEFAULT_INVENTORY, resolve_inventory, run_playbook
from ops.pki import CA, RENEW_BEFORE_DAYS

INVENTORY_HELP = "Ansible inventory of the fleet; default inventory/local"
PLAYBOOK = "certs-revoke.yml"


def _ca(fleet: inv.Fleet) -> CA:
    ca_dir = fleet.inventory / "secrets" / "tls"
    if not (ca_dir / "ca.key").exists():
        raise Exit(f"no CA at {ca_dir}: `invoke deploy` makes it on the first TLS deploy of this inventory", code=2)
    return CA(ca_dir)


def _renew_days(host: inv.Host) -> float:
    """How close to its expiry a deploy renews this host's certificate: the inventory's
    taskfleet_cert_renew_days (a plain number), else the roles' default."""
    try:
        return float(host.vars.get("taskfleet_cert_renew_days", RENEW_BEFORE_DAYS))
    except (TypeError, ValueError):
        return RENEW_BEFORE_DAYS


@task(help={"inventory": INVENTORY_HELP})
def status(c, inventory=DEFAULT_INVENTORY):
    """List each TLS identity: host, role, expiry, and whether it is revoked."""
    fleet = inv.load(resolve_inventory(inventory))
    issued = {i.name: i for i in _ca(fleet).issued()}
    # The controller's identities are renewed with the preflight's first host: the master.
    renew_days = {h.name: _renew_days(h) for h in fleet.hosts}
    rows = [("NAME", "ROLE", "EXPIRES (UTC)", "DAYS LEFT", "STATE")]
    names = [h.name for h in fleet.hosts] + sorted(n for n in issued if n not in {h.name for h in fleet.hosts})
    for name in names:
        cert = issued.get(name)
        if cert is None:
            rows.append((name, "-", "-", "-", "none (revoked, or not deployed yet)"))
            continue
        renew = cert.days_left <= renew_days.get(name, renew_days[fleet.hosts[0].name])
        state = "revoked" if cert.revoked else ("renewed at next deploy" if renew else "valid")
        rows.append((name, cert.role, f"{cert.not_after:%Y-%m-%d %H:%M}", f"{cert.days_left:.0f}", state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@task(positional=["hosts"], auto_shortflags=False,
      help={"hosts": "hosts whose identity to revoke, as the inventory names them: comma- or space-separated",
            "yes": "do not ask for confirmation (for scripts)", "inventory": INVENTORY_HELP})
def revoke(c, hosts, yes=False, inventory=DEFAULT_INVENTORY):
    """Revoke hosts' TLS identities at once: the master locks them out, the others go on."""
    path = resolve_inventory(inventory)
    fleet = inv.load(path)
    names = hosts.replace(",", " ").split()
    known = {h.name for h in fleet.hosts} | {i.name for i in _ca(fleet).issued()}
    unknown = sorted(set(names) - known)
    if not names or unknown:
        raise Exit(f"certs.revoke: no identity named {', '.join(unknown) or '(none given)'} in {path.name} "
                   f"(hosts: {', '.join(h.name for h in fleet.hosts)})", code=2)
    if not yes:
        confirm(f"Revoke the TLS identity of {', '.join(names)}? The master locks them out at once; "
                "`invoke deploy --limit HOST` issues a new one later.")
    run_playbook(c, PLAYBOOK, path, what="certs-revoke", extra_vars={"taskfleet_revoke": ",".join(names)})
    print(f"==> certs.revoke: {', '.join(names)} revoked")


ns = Collection("certs")
ns.add_task(status)
ns.add_task(revoke)
