"""The deployed hosts, checked with testinfra over the Ansible inventory."""

from __future__ import annotations

import errno
import hashlib
import re
import stat

import pytest
import yaml

from ops import artifact
from ops.paths import LOCAL_INVENTORY, ROOT
from tests.e2e.conftest import where_secrets_must_not_be

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


def _role_settings() -> dict:
    """Role common's defaults, with what the local inventory's group_vars override."""
    settings = yaml.safe_load((ROOT / "playbooks/roles/common/defaults/main.yml").read_text())
    settings.update(yaml.safe_load((LOCAL_INVENTORY / "group_vars/all.yml").read_text()) or {})
    return settings


def _show(h, unit: str, keys) -> dict:
    """`systemctl show UNIT -p KEY...` as {key: value}."""
    out = h.check_output(f"systemctl show {unit} " + " ".join(f"-p {key}" for key in sorted(set(keys))))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _timespan(seconds: int) -> str:
    """How systemctl show writes a whole number of seconds: 60 -> '1min', 90 -> '1min 30s'."""
    minutes, rest = divmod(int(seconds), 60)
    return " ".join(part for part in (f"{minutes}min" if minutes else "", f"{rest}s" if rest else "") if part)


def _syscall_groups(h) -> dict:
    """systemd-analyze syscall-filter on the host: {'@group': [syscall or @group, ...]}."""
    groups, current = {}, None
    for line in h.check_output("systemd-analyze syscall-filter --no-pager").splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def _expand(groups: dict, name: str) -> set:
    return set().union(*(_expand(groups, m) if m.startswith("@") else {m} for m in groups[name]))


def _directive_holds(h, key: str, wanted: str, shown: str) -> bool:
    """Whether `systemctl show`'s value is what the unit file's KEY=wanted asks for."""
    if key == "RestrictAddressFamilies":
        return set(shown.split()) == set(wanted.split())
    if key == "SystemCallErrorNumber":  # shown as a number
        return errno.errorcode.get(int(shown)) == wanted if shown.isdigit() else shown == wanted
    if key == "SystemCallFilter":  # shown as the syscalls the groups allow (that libseccomp knows)
        groups, allowed = _syscall_groups(h), set(shown.split())
        expected = set().union(*(_expand(groups, w) if w.startswith("@") else {w} for w in wanted.split()))
        return allowed <= expected and {"read", "write", "openat", "socket", "connect", "clone"} <= allowed
    return shown == wanted


def test_units_are_sandboxed_with_every_directive_of_the_list(master_host, worker_hosts):
    settings = _role_settings()
    listed = settings["taskfleet_unit_hardening"] + settings["taskfleet_unit_extra_hardening"]
    directives = [directive.split("=", 1) for directive in listed]
    assert len(directives) >= 25
    for h, unit in [(master_host, "taskfleet-master")] + [(w, "taskfleet-worker") for w in worker_hosts]:
        shown = _show(h, unit, ["LoadState", "User", *(key for key, _ in directives)])
        assert (shown["LoadState"], shown["User"]) == ("loaded", "taskfleet"), unit
        wrong = {f"{key}={wanted}": shown.get(key) for key, wanted in directives
                 if not _directive_holds(h, key, wanted, shown.get(key, "(not shown)"))}
        assert not wrong, f"{unit} on {h.backend.host}: asked for -> shown: {wrong}"


def test_units_are_notify_with_a_watchdog_and_a_descriptor_limit(master_host, worker_hosts):
    settings = _role_settings()
    nofile = settings["taskfleet_limit_nofile"]
    wanted = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogUSec": _timespan(settings["taskfleet_watchdog_sec"]),
        "TimeoutStartUSec": _timespan(settings["taskfleet_start_timeout"]),
        "LimitNOFILE": str(nofile), "LimitNOFILESoft": str(nofile),
        "Restart": "on-failure", "RestartPreventExitStatus": "2", "ActiveState": "active", "SubState": "running",
    }
    for h, unit in [(master_host, "taskfleet-master")] + [(w, "taskfleet-worker") for w in worker_hosts]:
        assert _show(h, unit, wanted) == wanted, f"{unit} on {h.backend.host}"
        # The agent gets the limit, or the most the host allows: systemd cannot raise it above
        # its own hard limit (on the local LXC nodes, what the container was started with).
        allowed = min(nofile, _open_files_limit(h, "1")[1])
        assert _open_files_limit(h, _show(h, unit, ["MainPID"])["MainPID"]) == (allowed, allowed), unit


def _open_files_limit(h, pid: str) -> tuple:
    """(soft, hard) open files limit of a process on the host."""
    limits = h.check_output(f"cat /proc/{pid}/limits")
    soft, hard = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M).groups()
    return int(soft), int(hard)


def test_controller_keeps_the_key_private(fleet, authkey):
    assert len(authkey) >= 64  # 32+ random bytes, hex-encoded
    assert stat.S_IMODE(fleet.authkey_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(fleet.authkey_file.parent.stat().st_mode) == 0o700


def test_authkey_never_leaks_on_the_hosts(master_host, worker_hosts, authkey):
    for h in [master_host, *worker_hosts]:
        assert authkey in h.check_output("cat /etc/taskfleet/authkey")  # the check can see it...
        for where, text in where_secrets_must_not_be(h).items():  # ...and it is nowhere else
            assert authkey not in text, f"authkey found in the {where} of {h.backend.host}"


def test_authkey_never_leaks_into_ansible_output(first_deploy, authkey):
    from ops.deploy import LOG_DIR

    assert "PLAY RECAP" in first_deploy.stdout
    assert authkey not in first_deploy.stdout + first_deploy.stderr
    logs = sorted(LOG_DIR.glob("deploy-*.log"))
    assert logs, "invoke deploy keeps a log of every run"
    for log in logs:
        assert authkey not in log.read_text()
