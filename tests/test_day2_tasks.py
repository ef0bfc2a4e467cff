"""The Day-2 operator tasks' front door, without a cluster: confirmations, bad host names,
a vaulted key without its successor, and the leak check that covers the next key."""

from __future__ import annotations

import io

import pytest
from invoke import Context
from invoke.exceptions import Exit

from ops import certs, deploy, key, reset, worker
from ops.confirm import confirm
from ops.pki import CA

INVENTORY = """\
all:
  children:
    master:
      hosts:
        m1: {ansible_host: 10.9.9.10}
    workers:
      hosts:
        w1: {ansible_host: 10.9.9.11}
        w2: {ansible_host: 10.9.9.12}
"""


@pytest.fixture
def inventory(tmp_path):
    path = tmp_path / "prod"
    path.mkdir()
    (path / "hosts.yml").write_text(INVENTORY)
    return path


@pytest.fixture
def no_playbook(monkeypatch):
    """Fail the test if a task gets as far as running a playbook."""
    def play(*args, **kwargs):
        raise AssertionError(f"a playbook ran: {args}")
    for module in (key, reset, worker):
        monkeypatch.setattr(module, "run_playbook", play)


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_confirm_needs_the_answer_typed_back(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", Tty("prod\n"))
    confirm("Remove it all?", answer="prod")
    monkeypatch.setattr("sys.stdin", Tty("y\n"))
    with pytest.raises(Exit, match="not confirmed: nothing changed"):
        confirm("Remove it all?", answer="prod")
    assert "Type 'prod' to go on" in capsys.readouterr().out


def test_destructive_tasks_refuse_without_a_terminal_or_yes(inventory, no_playbook, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    for run in (lambda: reset.reset(Context(), inventory=str(inventory)),
                lambda: worker.remove(Context(), "w1", inventory=str(inventory)),
                lambda: key.rotate(Context(), inventory=str(inventory))):
        (inventory / "secrets").mkdir(exist_ok=True)
        (inventory / "secrets" / "authkey").write_text("k" * 64)
        with pytest.raises(Exit, match="pass --yes to run it from a script"):
            run()


@pytest.mark.parametrize("hosts", ["m1", "w1,m1", "nope"])
def test_worker_remove_takes_workers_only(inventory, no_playbook, hosts):
    with pytest.raises(Exit) as err:
        worker.remove(Context(), hosts, inventory=str(inventory), yes=True)
    assert err.value.code == 2
    assert "workers: w1, w2" in str(err.value.message) or "no such host or group" in str(err.value.message)


def test_key_rotate_with_a_vaulted_key_says_what_to_set(inventory, no_playbook):
    (inventory / "group_vars").mkdir()
    (inventory / "group_vars" / "all.yml").write_text("taskfleet_authkey: " + "v" * 40 + "\n")
    with pytest.raises(Exit) as err:
        key.rotate(Context(), inventory=str(inventory), yes=True)
    assert err.value.code == 2
    assert "set the new one beside it as a vaulted taskfleet_authkey_next" in err.value.message


def test_key_rotate_needs_a_deployed_key(inventory, no_playbook):
    with pytest.raises(Exit, match="no authkey at .*secrets/authkey: deploy the fleet first"):
        key.rotate(Context(), inventory=str(inventory), yes=True)


def test_the_leak_check_covers_the_next_key_during_a_rotation(inventory):
    (inventory / "secrets").mkdir()
    (inventory / "secrets" / "authkey").write_text("a" * 64)
    (inventory / "secrets" / "authkey.next").write_text("b" * 64)
    assert deploy._leaked_authkey(inventory, "x " + "b" * 64)
    assert deploy._leaked_authkey(inventory, "a" * 64)
    assert not deploy._leaked_authkey(inventory, "fingerprints only: 1234abcd")


def test_certs_status_says_renewal_as_the_inventory_sets_it(inventory, capsys):
    """A certificate with 90 days left is due for renewal where the inventory renews 100
    days ahead (all hosts), and not where a host var says 10."""
    (inventory / "group_vars").mkdir()
    (inventory / "group_vars" / "all.yml").write_text("taskfleet_cert_renew_days: 100\n")
    (inventory / "host_vars").mkdir()
    (inventory / "host_vars" / "w2.yml").write_text("taskfleet_cert_renew_days: 10\n")
    ca = CA.create(inventory / "secrets" / "tls")
    for name, role in [("m1", "master"), ("w1", "worker"), ("w2", "worker"), ("controller-client", "client")]:
        ca.issue(name, role, days=90)
    certs.status(Context(), inventory=str(inventory))
    state = {line.split()[0]: line.split(None, 5)[5] for line in capsys.readouterr().out.splitlines()[1:]}
    assert state == {"m1": "renewed at next deploy", "w1": "renewed at next deploy", "w2": "valid",
                     "controller-client": "renewed at next deploy"}, state
