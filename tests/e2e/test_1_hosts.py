"""The deployed hosts, checked with testinfra over the Ansible inventory."""

from __future__ import annotations

import hashlib
import stat

import pytest

from ops import artifact

MASTER_PORT = 5000


def test_master_service_active_and_enabled_on_the_master_only(master_host, worker_hosts):
    assert master_host.service("taskfleet-master").is_running
    assert master_host.service("taskfleet-master").is_enabled
    for worker in worker_hosts:
        assert not worker.file("/etc/systemd/system/taskfleet-master.service").exists


def test_worker_services_active_and_enabled(worker_hosts):
    assert len(worker_hosts) >= 2
    for worker in worker_hosts:
        assert worker.service("taskfleet-worker").is_running
        assert worker.service("taskfleet-worker").is_enabled


def test_master_port_listens_on_the_master_only(master_host, worker_hosts, fleet):
    address = fleet.master_address.rsplit(":", 1)[0]
    assert master_host.socket(f"tcp://{address}:{MASTER_PORT}").is_listening
    for worker in worker_hosts:
        listening = worker.socket.get_listening_sockets()
        assert not [s for s in listening if s.endswith(f":{MASTER_PORT}")], listening


def test_service_user_is_a_system_account_without_login(master_host, worker_hosts):
    for h in [master_host, *worker_hosts]:
        user = h.user("taskfleet")
        assert user.exists
        assert user.uid < 1000
        assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")


@pytest.mark.parametrize(
    "path, mode, owner, group",
    [
        ("/etc/taskfleet/authkey", 0o640, "root", "taskfleet"),
        ("/etc/taskfleet", 0o750, "root", "taskfleet"),
        ("/var/lib/taskfleet", 0o750, "taskfleet", "taskfleet"),
    ],
)
def test_modes_and_owners(master_host, worker_hosts, path, mode, owner, group):
    for h in [master_host, *worker_hosts]:
        f = h.file(path)
        assert f.exists, f"{path} missing on {h.backend.host}"
        assert (f.mode, f.user, f.group) == (mode, owner, group), path


def test_env_files_are_not_world_readable(master_host, worker_hosts):
    for h, name in [(master_host, "master.env")] + [(w, "worker.env") for w in worker_hosts]:
        f = h.file(f"/etc/taskfleet/{name}")
        assert f.exists
        assert not f.mode & stat.S_IROTH and (f.user, f.group) == ("root", "taskfleet")


def test_ledger_lives_in_the_state_dir_owned_by_the_service(master_host):
    ledger = master_host.file("/var/lib/taskfleet/ledger.sqlite3")
    assert ledger.exists and ledger.user == "taskfleet" and not ledger.mode & stat.S_IROTH


def test_release_matches_the_built_artifact(master_host, worker_hosts):
    built = artifact.artifact_path()
    digest = hashlib.sha256(built.read_bytes()).hexdigest()
    for h in [master_host, *worker_hosts]:
        current = h.file("/opt/taskfleet/current")
        assert current.is_symlink
        assert current.linked_to == f"/opt/taskfleet/releases/{artifact.version()}"
        assert h.file("/opt/taskfleet/current/taskfleet-node.pyz").sha256sum == digest


def test_units_are_sandboxed(master_host, worker_hosts):
    for h, unit in [(master_host, "taskfleet-master")] + [(w, "taskfleet-worker") for w in worker_hosts]:
        props = h.check_output(
            f"systemctl show {unit} -p User -p NoNewPrivileges -p ProtectSystem -p PrivateTmp -p ProtectHome"
        )
        assert "User=taskfleet" in props
        assert "NoNewPrivileges=yes" in props
        assert "ProtectSystem=strict" in props
        assert "PrivateTmp=yes" in props


def test_controller_keeps_the_key_private(fleet, authkey):
    assert len(authkey) >= 64  # 32+ random bytes, hex-encoded
    assert stat.S_IMODE(fleet.authkey_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(fleet.authkey_file.parent.stat().st_mode) == 0o700


def test_authkey_never_leaks_on_the_hosts(master_host, worker_hosts, authkey):
    for h in [master_host, *worker_hosts]:
        assert authkey in h.check_output("cat /etc/taskfleet/authkey")  # the check can see it...
        places = {
            "process list": h.check_output("ps -eo args"),
            "unit files": h.check_output("cat /etc/systemd/system/taskfleet-*.service"),
            "env files": h.check_output("cat /etc/taskfleet/*.env"),
            "journal": h.check_output("journalctl --no-pager -o cat -n 5000"),
        }
        for where, text in places.items():  # ...and it is nowhere else
            assert authkey not in text, f"authkey found in the {where} of {h.backend.host}"


def test_authkey_never_leaks_into_ansible_output(first_deploy, authkey):
    from ops.deploy import LOG_DIR

    assert "PLAY RECAP" in first_deploy.stdout
    assert authkey not in first_deploy.stdout + first_deploy.stderr
    logs = sorted(LOG_DIR.glob("deploy-*.log"))
    assert logs, "invoke deploy keeps a log of every run"
    for log in logs:
        assert authkey not in log.read_text()
