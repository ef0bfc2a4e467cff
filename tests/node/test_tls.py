"""TLS on every link: mutual certificates from the fleet's CA (ops/pki.py), roles, revocation.

Real agents on 127.0.0.1 with real certificates; the CA is made per test in tmp.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import AuthenticationError
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="the test CA needs the cryptography package (controller side)")

from node.client import Client  # noqa: E402
from node.config import read_authkey  # noqa: E402
from node.tls import TLS, TLSConfigError  # noqa: E402
from node.wire import Caller  # noqa: E402
from ops.pki import CA  # noqa: E402
from tests.node.conftest import PYTHON, TEST_TASKS, free_port  # noqa: E402
from tests.node.test_agents import TUTORIAL_PRODUCER, TUTORIAL_WORKER  # noqa: E402
from tests.waiting import wait_for  # noqa: E402

LOOPBACK = "127.0.0.1"


def tls_dir(ca: CA, name: str, role: str, dest: Path, master: bool = False, days: int = 90) -> Path:
    """The files an agent named `name` gets from a deploy: the CA's certificate, its own
    certificate and key (and, on the master, the CRL)."""
    ca.issue(name, role, [name, LOOPBACK], days=days)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca.dir / "ca.crt", dest / "ca.crt")
    shutil.copy(ca.dir / "issued" / f"{name}.crt", dest / "node.crt")
    shutil.copy(ca.dir / "issued" / f"{name}.key", dest / "node.key")
    if master:
        shutil.copy(ca.dir / "crl.pem", dest / "crl.pem")
    return dest


@pytest.fixture
def pki(tmp_path):
    return CA.create(tmp_path / "ca")


@pytest.fixture
def tls_agents(agents, pki, tmp_path):
    """`agents` speaking TLS: master `tf-master`, workers named `w1`, clients `op`."""
    agents.tls = {
        "master": tls_dir(pki, "tf-master", "master", tmp_path / "tls-master", master=True),
        "worker": tls_dir(pki, "w1", "worker", tmp_path / "tls-w1"),
        "client": tls_dir(pki, "op", "client", tmp_path / "tls-op"),
    }
    return agents


def caller(agents, tls_path: Path | None, ident: str = "master") -> Caller:
    return Caller(("127.0.0.1", agents.port), read_authkey(str(agents.key)), ident=ident,
                  tls=TLS(tls_path) if tls_path else None)


def test_a_job_runs_over_tls_end_to_end(tls_agents):
    agents = tls_agents
    master = agents.start_master()
    agents.start_worker("--name", "w1", concurrency=2)
    agents.wait_workers(1)
    with agents.client() as client:
        results = client.submit("square", [[i] for i in range(50)]).wait()
    assert [r.value for r in sorted(results, key=lambda r: r.index)] == [i * i for i in range(50)]
    assert "(TLS, files in" in master.text()
    assert [w["host"] for w in agents.status()["workers"]] == ["w1"]


class Recorder:
    """A TCP relay between a client and the master that keeps every byte it carries."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("over_tls", [True, False], ids=["tls", "plaintext-control"])
def test_task_arguments_and_results_are_not_readable_on_the_wire(agents, pki, tmp_path, over_tls):
    if over_tls:
        agents.tls = {"master": tls_dir(pki, "tf-master", "master", tmp_path / "m", master=True),
                      "client": tls_dir(pki, "op", "client", tmp_path / "c"),
                      "worker": tls_dir(pki, "w1", "worker", tmp_path / "w")}
    agents.start_master("--tasks-module", str(TEST_TASKS))
    agents.start_worker("--name", "w1", "--tasks-module", str(TEST_TASKS))
    agents.wait_workers(1)
    relay = Recorder(agents.port)
    marker = "secret-marker-7f3a9c"
    try:
        client = Client(("127.0.0.1", relay.port), read_authkey(str(agents.key)), retry_for=10,
                        tls=agents.tls["client"] if over_tls else None)
        with client:
            [result] = client.submit("echo", [[marker]]).wait()
        assert result.value == marker
    finally:
        relay.close()
    with relay.lock:
        seen = bytes(relay.seen)
    assert len(seen) > 200, "the relay carried the job"
    if over_tls:
        assert marker.encode() not in seen, "the task's argument crossed the wire in clear"
    else:
        assert marker.encode() in seen, "control: without TLS the marker is visible (the check can fail)"


def test_a_plaintext_client_gets_nothing_from_the_tls_port_and_is_logged(tls_agents, tmp_path):
    agents = tls_agents
    master = agents.start_master()
    plain = Client(("127.0.0.1", agents.port), read_authkey(str(agents.key)), retry_for=0)
    started = time.monotonic()
    with pytest.raises(Exception) as caught:
        plain.status()
    plain.close()
    assert time.monotonic() - started < 20, "the handshake deadline bounds a plaintext peer"
    assert not isinstance(caught.value, dict)
    wait_for(lambda: "no TLS handshake (a plaintext client?)" in master.text(), 15,
             "the master to log the plaintext peer")
    # the tutorial's unchanged producer cannot reach the TLS port either
    (tmp_path / "producer.py").write_text(TUTORIAL_PRODUCER)
    produced = subprocess.run([PYTHON, str(tmp_path / "producer.py"), str(agents.port), str(agents.key)],
                              capture_output=True, text=True, timeout=60)
    assert produced.returncode != 0


def test_a_tls_client_of_a_plaintext_master_is_told_so(agents, pki, tmp_path):
    agents.start_master()
    client_dir = tls_dir(pki, "op", "client", tmp_path / "c")
    with pytest.raises(AuthenticationError, match="does not speak TLS"):
        Client.connect(agents.master_address, str(agents.key), retry_for=0, tls=client_dir)


def _refused(agents, tls_path: Path) -> str:
    with pytest.raises(AuthenticationError) as caught:
        Client.connect(agents.master_address, str(agents.key), retry_for=0, tls=tls_path)
    return str(caught.value)


def test_certificates_from_another_ca_expired_or_revoked_are_refused(tls_agents, tmp_path):
    agents = tls_agents
    master = agents.start_master()
    fleet_ca = CA(tmp_path / "ca")

    other = CA.create(tmp_path / "other-ca")
    stranger = tls_dir(other, "op", "client", tmp_path / "stranger")
    shutil.copy(fleet_ca.dir / "ca.crt", stranger / "ca.crt")  # trusts the master, but its own cert is foreign
    assert "refused this agent's certificate" in _refused(agents, stranger)

    expired = tls_dir(fleet_ca, "old", "client", tmp_path / "expired", days=0)
    time.sleep(1.1)
    assert "refused this agent's certificate" in _refused(agents, expired)

    good = tls_dir(fleet_ca, "op2", "client", tmp_path / "op2")
    Client.connect(agents.master_address, str(agents.key), retry_for=0, tls=good).close()
    fleet_ca.revoke("op2")
    shutil.copy(fleet_ca.dir / "crl.pem", agents.tls["master"] / "crl.pem")
    wait_for(lambda: "TLS files in" in master.text() and "changed" in master.text(), 10,
             "the master to notice the new CRL")
    assert "revoked" in _refused(agents, good)
    with agents.client() as client:  # the others are untouched
        assert client.status()["tasks"]["queued"] == 0


def test_a_revoked_worker_is_locked_out_at_once_and_the_others_keep_working(tls_agents, pki, tmp_path):
    agents = tls_agents
    agents.start_master()
    w2_dir = tls_dir(pki, "w2", "worker", tmp_path / "tls-w2")
    agents.start_worker("--name", "w1")
    agents.tls["worker"] = w2_dir
    w2 = agents.start_worker("--name", "w2")
    agents.wait_workers(2)
    pki.revoke("w2")
    shutil.copy(pki.dir / "crl.pem", agents.tls["master"] / "crl.pem")
    wait_for(lambda: {w["host"] for w in agents.alive_workers()} == {"w1"}, 30, "w2 to drop out")
    wait_for(lambda: "revoked" in w2.text(), 15, "w2 to log that its certificate was refused")
    with agents.client() as client:
        job = client.submit("square", [[i] for i in range(20)])
        wait_for(lambda: job.progress()["done"] == 20, 60, "w1 to run the whole job")
        results = job.wait()
    assert len(results) == 20 and all(r.ok for r in results)
    assert {w["host"] for w in agents.status()["workers"] if w["alive"]} == {"w1"}


def test_roles_hold_clients_cannot_work_and_workers_act_only_as_themselves(tls_agents, pki, tmp_path):
    agents = tls_agents
    master = agents.start_master()
    client_tls = agents.tls["client"]
    worker_tls = agents.tls["worker"]
    with agents.client() as client:
        job = client.submit("square", [[3]])

    as_client = caller(agents, client_tls)
    with pytest.raises(PermissionError, match="client op may not call complete"):
        as_client.call("complete", "op-1-abc", "op", [(1, True, b"", None, 0.0)])
    with pytest.raises(PermissionError, match="may not call hello"):
        as_client.call("hello", "op-1-abc", "op", 1, 1)

    as_worker = caller(agents, worker_tls)
    with pytest.raises(PermissionError, match="only as itself"):
        as_worker.call("hello", "w2-1-abc", "w2", 1, 1)
    with pytest.raises(PermissionError, match="only as itself"):
        as_worker.call("goodbye", "w2-7-ffffff")
    with pytest.raises(PermissionError, match="may not call submit"):
        as_worker.call("submit", "k", "square", [[1]])
    with pytest.raises(PermissionError, match="may not use the tutorial's queues"):
        caller(agents, worker_tls, ident="task_queue").call("put", 1)
    with pytest.raises(PermissionError, match="not served"):  # nobody stops the master over the wire
        caller(agents, tls_dir(pki, "root", "admin", tmp_path / "admin"), ident=None).call("shutdown")

    admin = caller(agents, tmp_path / "admin")
    assert admin.call("status")["tasks"]["queued"] == 1
    with pytest.raises(PermissionError, match="admin root may not call complete"):  # operators never act as workers
        admin.call("complete", "root-1-abc", "root", [(1, True, b"", None, 0.0)])
    with pytest.raises(PermissionError, match="may not call lease"):
        admin.call("lease", "root-1-abc", 1)
    assert "may not call complete" in master.text()
    with agents.client() as client:
        assert client.job(job.id).info["done"] == 0, "the forged result changed nothing"


def test_plain_listen_serves_only_the_tutorial_queues_in_plaintext(tls_agents, tmp_path):
    agents = tls_agents
    plain_port = free_port()
    master = agents.start_master("--plain-listen", f"127.0.0.1:{plain_port}")
    assert "PLAINTEXT on 127.0.0.1:" in master.text()
    (tmp_path / "w.py").write_text(TUTORIAL_WORKER)
    (tmp_path / "p.py").write_text(TUTORIAL_PRODUCER)
    worker = agents._spawn("tutorial-worker", [str(tmp_path / "w.py"), "127.0.0.1", str(plain_port), str(agents.key)])
    produced = subprocess.run([PYTHON, str(tmp_path / "p.py"), str(plain_port), str(agents.key)],
                              capture_output=True, text=True, timeout=60)
    assert produced.returncode == 0, produced.stderr
    assert produced.stdout.strip() == str(sorted(n * n for n in range(10)))
    assert worker.wait(30) == 0
    plain = Caller(("127.0.0.1", plain_port), read_authkey(str(agents.key)))
    with pytest.raises(PermissionError, match="not served"):
        plain.call("status")


@pytest.mark.parametrize("missing", ["ca.crt", "node.crt", "node.key", "crl.pem"])
def test_missing_tls_material_is_one_line_naming_the_file(agents, pki, tmp_path, missing):
    material = tls_dir(pki, "tf-master", "master", tmp_path / "m", master=True)
    (material / missing).unlink()
    proc = agents._spawn("master", ["-m", "node", "master", "--listen", f"127.0.0.1:{free_port()}", "--state-dir",
                                    str(tmp_path / "s"), "--authkey-file", str(agents.key), "--tls-dir", str(material)])
    assert proc.wait(30) == 2
    lines = proc.text().strip().splitlines()
    assert lines == [f"taskfleet: error: TLS file {material / missing} is missing"]


def test_a_bad_key_file_is_named(agents, pki, tmp_path):
    material = tls_dir(pki, "op", "client", tmp_path / "c")
    (material / "node.key").write_text("not a key\n")
    run = agents.cli("status", "--master", "127.0.0.1:9", "--authkey-file", str(agents.key), "--tls-dir",
                     str(material), with_master=False)
    assert run.returncode == 2
    [line] = run.stderr.strip().splitlines()
    assert line.startswith(f"taskfleet: error: TLS files {material / 'node.crt'} and {material / 'node.key'} are "
                           "not a usable certificate and key pair (pem lib")
    with pytest.raises(TLSConfigError, match="node.key"):
        TLS(material)


def test_the_ca_keeps_its_keys_private_and_reissues_only_when_needed(pki, tmp_path):
    assert (pki.dir.stat().st_mode & 0o777) == 0o700
    assert (pki.dir / "ca.key").stat().st_mode & 0o777 == 0o600
    assert pki.issue("h1", "worker", ["h1", "10.0.0.5"]) is True
    assert (pki.dir / "issued" / "h1.key").stat().st_mode & 0o777 == 0o600
    assert pki.issue("h1", "worker", ["h1", "10.0.0.5"]) is False, "valid and unchanged: kept"
    assert pki.issue("h1", "worker", ["h1", "10.0.0.6"]) is True, "a new address: reissued"
    assert pki.issue("h1", "client", ["h1", "10.0.0.6"]) is True, "a new role: reissued"
    assert pki.issue("h1", "client", ["h1", "10.0.0.6"], renew_before=100) is True, "nearing expiry: renewed"
    [issued] = pki.issued()
    assert (issued.name, issued.role, issued.revoked) == ("h1", "client", False)
    assert 89 < issued.days_left <= 90


def test_issue_hosts_issues_the_listed_identities_where_needed(pki):
    """The deploy's preflight issues every host's certificate in one run: `pki.py issue-hosts`."""
    script = Path(__file__).resolve().parents[2] / "ops" / "pki.py"

    def issue_hosts(hosts, *opts):
        return subprocess.run([sys.executable, str(script), "issue-hosts", str(pki.dir), *opts],
                              input=json.dumps(hosts), capture_output=True, text=True, check=True).stdout.strip()

    hosts = [{"name": "m", "role": "master", "sans": ["m", "10.0.0.1"]},
             {"name": "w", "role": "worker", "sans": ["w", "10.0.0.2"]}]
    assert issue_hosts(hosts) == "changed"
    assert {(i.name, i.role) for i in pki.issued()} == {("m", "master"), ("w", "worker")}
    assert issue_hosts(hosts) == "ok"
    serials = {i.name: i.serial for i in pki.issued()}
    hosts[1]["sans"] = ["w", "10.0.0.3"]
    assert issue_hosts(hosts) == "changed"
    assert {i.name: i.serial == serials[i.name] for i in pki.issued()} == {"m": True, "w": False}
    assert issue_hosts(hosts, "--renew-before", "100") == "changed", "nearing expiry: renewed"
