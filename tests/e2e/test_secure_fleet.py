"""The deployed fleet is encrypted and least-privilege: TLS on every link (nothing readable
on the wire), tight modes on every key, a firewall that admits only the fleet and the
controller, and revocation that locks one host out at once while the others work on.

Each test starts from the deployed fleet (`fleet` deploys once per session) and puts
back what it changes.
"""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
import time
import uuid

import pytest

from ops import localcluster
from ops.deploy import parse_recap
from tests.e2e.conftest import where_secrets_must_not_be
from tests.waiting import wait_for

PORT = 5000


def test_keys_and_certificates_have_tight_modes(fleet, master_host, worker_hosts):
    for host in [master_host, *worker_hosts]:
        tls = host.file("/etc/taskfleet/tls")
        assert (tls.mode, tls.user, tls.group) == (0o750, "root", "taskfleet")
        key = host.file("/etc/taskfleet/tls/node.key")
        assert (key.mode, key.user, key.group) == (0o640, "root", "taskfleet")
        for public in ("ca.crt", "node.crt"):
            assert host.file(f"/etc/taskfleet/tls/{public}").mode == 0o644
        assert not host.file("/etc/taskfleet/tls/ca.key").exists, "the CA's key never leaves the controller"
    assert master_host.file("/etc/taskfleet/tls/crl.pem").exists
    ca = fleet.inventory / "secrets" / "tls"
    assert stat.S_IMODE(ca.stat().st_mode) == 0o700
    keys = [ca / "ca.key", *(ca / "issued").glob("*.key"), *(ca / "controller").glob("*/node.key")]
    assert len(keys) >= 1 + len(fleet.hosts) + 2
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def _key_body(pem: str) -> str:
    """A private key's first 48 base64 characters: enough to recognise it anywhere."""
    return "".join(line.strip() for line in pem.splitlines() if line.strip() and "PRIVATE KEY" not in line)[:48]


def test_private_keys_never_leak_into_ansible_output(fleet, first_deploy):
    from ops.deploy import LOG_DIR

    ca = fleet.inventory / "secrets" / "tls"
    bodies = {key.name: _key_body(key.read_text()) for key in [ca / "ca.key", *(ca / "issued").glob("*.key")]}
    outputs = [first_deploy.stdout + first_deploy.stderr, *(log.read_text() for log in LOG_DIR.glob("*.log"))]
    for name, body in bodies.items():
        assert len(body) == 48 and not any(body in out for out in outputs), f"{name} appears in Ansible output"


def test_private_keys_never_leak_on_the_hosts(master_host, worker_hosts):
    for h in [master_host, *worker_hosts]:
        body = _key_body(h.check_output("cat /etc/taskfleet/tls/node.key"))
        assert len(body) == 48  # the check can see it...
        for where, text in where_secrets_must_not_be(h).items():  # ...and it is nowhere else
            assert body not in text, f"the TLS key found in the {where} of {h.backend.host}"


@pytest.fixture
def bridge():
    return localcluster.settings().bridge


def test_no_task_argument_crosses_the_network_in_clear(client, fleet, bridge, tmp_path):
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed (./invoke test installs it)")
    marker = f"tf-marker-{uuid.uuid4().hex}"
    capture = tmp_path / "bridge.pcap"
    dump = subprocess.Popen(["tcpdump", "-i", bridge, "-U", "-s", "0", "-w", str(capture), "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: capture.exists(), 10, "tcpdump to start capturing")
        time.sleep(0.5)
        job = client.submit("fail", [[marker]] * 20, retries=0)  # the marker goes out as arguments and comes back
        results = job.wait()                                      # in every failure's message
        assert len(results) == 20 and all(marker in r.error for r in results)
        # control: the capture sees payloads: the marker sent in clear to the master's SSH port shows up
        with socket.create_connection((fleet.master_address.rsplit(":", 1)[0], 22), timeout=5) as probe:
            probe.sendall(f"control-{marker}\r\n".encode())
            time.sleep(0.5)
    finally:
        time.sleep(1)
        dump.terminate()
        dump.wait(10)
    seen = capture.read_bytes()
    assert f"control-{marker}".encode() in seen, "control: the capture on the bridge did not see the probe"
    assert seen.replace(f"control-{marker}".encode(), b"").count(marker.encode()) == 0, \
        "a task's argument or result crossed the bridge in clear"


def _connects(target: str, source: str | None) -> bool:
    sock = socket.socket()
    sock.settimeout(3)
    try:
        if source:
            sock.bind((source, 0))
        sock.connect((target, PORT))
        return True
    except (TimeoutError, socket.timeout, ConnectionRefusedError, OSError):
        return False
    finally:
        sock.close()


def test_the_firewall_admits_only_the_fleet_and_the_controller(fleet, bridge, master_host):
    settings = localcluster.settings()
    master = fleet.master_address.rsplit(":", 1)[0]
    outsider = f"{settings.subnet}.250"
    subprocess.run(["ip", "addr", "add", f"{outsider}/24", "dev", bridge], check=True)
    try:
        assert _connects(master, settings.controller_address), "the controller is let in"
        assert not _connects(master, outsider), f"{outsider} is outside the fleet, yet reached the master's port"
        counters = master_host.check_output("nft list chain inet taskfleet input")
        assert "drop" in counters and "packets 0 " not in counters.split("counter")[-1]
        def allowed(address: str) -> bool:
            return master_host.run(f"nft get element inet taskfleet allowed4 {{ {address} }}").rc == 0

        assert all(allowed(h.address) for h in fleet.hosts) and not allowed(outsider)
    finally:
        subprocess.run(["ip", "addr", "del", f"{outsider}/24", "dev", bridge], check=False)


def test_a_revoked_worker_is_locked_out_at_once_and_comes_back_with_a_new_certificate(client, fleet, operator):
    workers = [h.name for h in fleet.hosts if "workers" in h.groups]
    victim, others = workers[-1], workers[:-1]
    job = client.submit("burn", [(30,)] * 300)
    try:
        out = operator("certs.revoke", victim, "--yes").stdout
        assert f"{victim} revoked" in out
        wait_for(lambda: victim not in {w["host"] for w in client.status()["workers"] if w["alive"]}, 40,
                 f"{victim} to be locked out")
        status = operator("certs.status").stdout
        assert any(line.startswith(victim) and "none" in line for line in status.splitlines()), status
        results = job.wait()
        assert len(results) == 300 and all(r.ok for r in results), "nothing lost, nothing failed"
        assert {r.host for r in results} & set(others), "the other workers went on"
    finally:
        operator("deploy", "--limit", victim)
    wait_for(lambda: victim in {w["host"] for w in client.status()["workers"] if w["alive"]}, 60,
             f"{victim} to rejoin with its new certificate")
    assert any(line.startswith(victim) and "valid" in line for line in operator("certs.status").stdout.splitlines())


def test_a_firewall_emptied_by_hand_is_restored_by_the_next_deploy(master_host, operator):
    table = "nft -s list table inet taskfleet"
    loaded = master_host.check_output(table)
    assert "@allowed4" in loaded, loaded
    master_host.run_test("nft flush table inet taskfleet")
    assert "@allowed4" not in master_host.check_output(table), "the table's rules are gone"
    proc = operator("deploy")
    assert master_host.check_output(table) == loaded
    assert parse_recap(proc.stdout)["tf-master"]["changed"] >= 1, "the repair is reported"
    assert parse_recap(operator("deploy").stdout)["tf-master"]["changed"] == 0
