"""The authkey keyring: several keys in the file, the first dialed, any accepted; a changed
file picked up without a restart; a removed key's connections cut and the key refused
plainly; both generations of CPython's challenge answer accepted."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import subprocess
import threading
from multiprocessing import AuthenticationError
from multiprocessing import connection as mpc
from pathlib import Path

import pytest

from node import wire
from node.client import Client
from tests.node.conftest import PYTHON, wait_for, write_key
from tests.node.test_agents import TUTORIAL_PRODUCER, TUTORIAL_WORKER

OLD, NEW, OTHER = b"old-key-" + b"o" * 24, b"new-key-" + b"n" * 24, b"other-key-" + b"x" * 22


def ring(path, *keys):
    """Write the keyring file as Ansible does: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    write_key(tmp, b"\n".join(keys) + b"\n")
    os.replace(tmp, path)
    return path


# -- the challenge, answered as each Python generation does -------------------------------

def answer_legacy(conn, key):
    """Python <= 3.11's answer: a bare HMAC-MD5 of the whole challenge."""
    message = conn.recv_bytes(256)[len(wire.CHALLENGE):]
    conn.send_bytes(hmac.new(key, message, "md5").digest())
    return conn.recv_bytes(256)


def answer_modern(conn, key, digest="sha256"):
    """Python 3.12+'s answer (CPython's _create_response): '{digest}' and an HMAC of the
    whole challenge, its '{sha256}' prefix included."""
    message = conn.recv_bytes(256)[len(wire.CHALLENGE):]
    assert message.startswith(b"{sha256}") and len(message) == len(b"{sha256}") + 40
    conn.send_bytes(b"{" + digest.encode() + b"}" + hmac.new(key, message, digest).digest())
    return conn.recv_bytes(256)


def challenge(answer, keys, key, **kw):
    """(what deliver_challenge returned or raised, what the peer read back)."""
    a, b = socket.socketpair()
    server, peer = wire.Connection(a), wire.Connection(b)
    server.timeout = peer.timeout = 5
    got = {}

    def run():
        try:
            got["key"] = wire.deliver_challenge(server, keys)
        except AuthenticationError as exc:
            got["key"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    reply = answer(peer, key, **kw)
    thread.join(5)
    a.close(), b.close()
    return got["key"], reply


@pytest.mark.parametrize("answer", [answer_legacy, answer_modern], ids=["python<=3.11", "python>=3.12"])
def test_either_generation_answering_with_any_key_of_the_ring_is_welcome(answer):
    for key in (OLD, NEW):
        assert challenge(answer, [NEW, OLD], key) == (key, wire.WELCOME)
    refused, reply = challenge(answer, [NEW, OLD], OTHER)
    assert isinstance(refused, AuthenticationError) and reply == wire.FAILURE


def test_a_modern_peer_may_answer_with_a_stronger_digest_but_not_an_unknown_one():
    assert challenge(answer_modern, [OLD], OLD, digest="sha384") == (OLD, wire.WELCOME)
    refused, reply = challenge(answer_modern, [OLD], OLD, digest="sha1")
    assert isinstance(refused, AuthenticationError) and reply == wire.FAILURE


def test_this_pythons_own_answer_is_welcome():
    a, b = socket.socketpair()
    server, peer = wire.Connection(a), wire.Connection(b)
    server.timeout = peer.timeout = 5
    thread = threading.Thread(target=mpc.answer_challenge, args=(peer, NEW))
    thread.start()
    assert wire.deliver_challenge(server, [OLD, NEW]) == NEW
    thread.join(5)
    a.close(), b.close()


# -- the key file ---------------------------------------------------------------------------

def test_keyring_reads_one_key_a_line_and_follows_the_file(tmp_path):
    path = ring(tmp_path / "authkey", OLD)
    keyring = wire.Keyring(str(path))
    assert keyring.keys() == [OLD] and keyring.dial_key() == OLD
    ring(path, OLD, NEW)
    assert keyring.keys() == [OLD, NEW] and keyring.dial_key() == OLD
    ring(path, NEW, OLD)
    assert keyring.dial_key() == NEW


def test_a_key_file_gone_bad_mid_rotation_keeps_the_last_good_ring(tmp_path, caplog):
    path = ring(tmp_path / "authkey", OLD, NEW)
    keyring = wire.Keyring(str(path))
    path.write_bytes(b"\n")
    assert keyring.keys() == [OLD, NEW]
    assert "is empty; keeping the keys read before" in caplog.text
    assert OLD.decode() not in caplog.text and NEW.decode() not in caplog.text
    ring(path, NEW)
    assert keyring.keys() == [NEW]


def test_fingerprint_is_a_short_sha256_prefix_not_the_key():
    assert wire.fingerprint(OLD) == hashlib.sha256(OLD).hexdigest()[:8] != OLD.decode()[:8]


# -- agents on 127.0.0.1 ----------------------------------------------------------------------

def test_a_master_accepts_every_key_of_its_ring_and_reports_which(agents, tmp_path):
    ring(agents.key, NEW, OLD)
    agents.start_master()
    worker = agents.start_worker(key=ring(tmp_path / "worker-key", OLD, NEW))  # dials with its first: OLD
    (joined,) = agents.wait_workers(1)
    assert joined["key"] == wire.fingerprint(OLD) and worker.alive()
    with Client(agents.master_address, NEW) as new_client, Client(agents.master_address, OLD) as old_client:
        assert new_client.status()["keyring"] == {"ring": [wire.fingerprint(NEW), wire.fingerprint(OLD)],
                                                   "caller": wire.fingerprint(NEW)}
        assert old_client.status()["keyring"]["caller"] == wire.fingerprint(OLD)
    refused = agents.cli("status", "--master", agents.master_address, "--authkey-file",
                         str(write_key(tmp_path / "other", OTHER)), with_master=False)
    assert refused.returncode == 2
    assert refused.stderr == (f"taskfleet: error: authentication failed with the master at {agents.master_address}: "
                              f"it refused authkey {wire.fingerprint(OTHER)} (the authkey file's first key is not "
                              "in the master's)\n")


def test_rotation_under_a_running_job_install_use_remove_without_a_restart(agents, tmp_path):
    ring(agents.key, OLD)
    master = agents.start_master()
    worker_key = ring(tmp_path / "worker-key", OLD)
    worker = agents.start_worker(key=worker_key, concurrency=2)
    agents.wait_workers(1)
    old_client = Client(agents.master_address, OLD)  # holds the old key, whatever the files say
    job = old_client.submit("sleep", [[0.05]] * 120)

    def worker_key_is(key):
        return [w["key"] for w in agents.alive_workers()] == [wire.fingerprint(key)]

    ring(agents.key, OLD, NEW)  # install, on the master ...
    ring(worker_key, OLD, NEW)  # ... and the worker
    wait_for(lambda: agents.status()["keyring"]["ring"] == [wire.fingerprint(OLD), wire.fingerprint(NEW)], 10,
             "the master to read the new ring")
    ring(agents.key, NEW, OLD)  # use
    ring(worker_key, NEW, OLD)
    wait_for(lambda: worker_key_is(NEW), 15, "the worker to dial with the new key")
    assert old_client.status()["keyring"]["caller"] == wire.fingerprint(OLD)  # still served until the remove step
    results = job.wait()
    assert len(results) == 120 and all(r.ok and r.attempts == 1 for r in results)

    ring(agents.key, NEW)  # remove
    ring(worker_key, NEW)
    with pytest.raises(AuthenticationError, match=f"it refused authkey {wire.fingerprint(OLD)}"):
        wait_for(lambda: old_client.status() and False, 10, "the old key's connection to be cut")
    old_client.close()
    assert "cut 1 connection(s) made with a key no longer in it" in master.text()
    with Client(agents.master_address, NEW) as client:
        assert [r.value for r in client.submit("square", [[3]]).wait()] == [9]
    assert worker_key_is(NEW) and worker.alive() and master.alive()
    assert worker.text().count("connected to the master") == 1, "no reconnect, no restart"
    for key in (OLD, NEW):
        assert key.decode() not in master.text() + worker.text()


def test_the_tutorials_scripts_work_with_any_key_of_a_masters_ring(agents, tmp_path):
    ring(agents.key, NEW, OLD)
    agents.start_master()
    (tmp_path / "tutorial_worker.py").write_text(TUTORIAL_WORKER)
    (tmp_path / "tutorial_producer.py").write_text(TUTORIAL_PRODUCER)
    worker = agents._spawn("tutorial-worker", [str(tmp_path / "tutorial_worker.py"), "127.0.0.1", str(agents.port),
                                              str(write_key(tmp_path / "old", OLD))])
    produced = subprocess.run([PYTHON, str(tmp_path / "tutorial_producer.py"), str(agents.port),
                               str(write_key(tmp_path / "new", NEW))],
                              capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert produced.returncode == 0, produced.stderr
    assert produced.stdout.strip() == str(sorted(n * n for n in range(10)))
    assert worker.wait(30) == 0


PYENV = Path("/root/.pyenv/versions")
CROSS = [("3.13.0", "3.9.18"), ("3.9.18", "3.13.0"), ("3.12.1", "3.12.1")]  # (the master's Python, the peers')


@pytest.mark.parametrize("master_python, peer_python", CROSS, ids=[f"master{m}-peers{p}" for m, p in CROSS])
def test_a_keyring_master_and_peers_of_other_python_versions(agents, tmp_path, master_python, peer_python):
    """Python 3.12 changed the challenge's digest: a master on one version accepts either key
    from the tutorial's scripts and taskfleet's CLI on another."""
    master_py, peer_py = (PYENV / v / "bin" / "python3" for v in (master_python, peer_python))
    if not (master_py.exists() and peer_py.exists()):
        pytest.skip(f"needs {master_py} and {peer_py}")
    ring(agents.key, NEW, OLD)
    agents.start_master(python=str(master_py))
    old_file, new_file = write_key(tmp_path / "old", OLD), write_key(tmp_path / "new", NEW)
    (tmp_path / "tutorial_worker.py").write_text(TUTORIAL_WORKER)
    (tmp_path / "tutorial_producer.py").write_text(TUTORIAL_PRODUCER)
    worker = agents._spawn("tutorial-worker", [str(tmp_path / "tutorial_worker.py"), "127.0.0.1", str(agents.port),
                                              str(old_file)], python=str(peer_py))
    produced = subprocess.run([str(peer_py), str(tmp_path / "tutorial_producer.py"), str(agents.port), str(new_file)],
                              capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert produced.returncode == 0, produced.stderr
    assert produced.stdout.strip() == str(sorted(n * n for n in range(10)))
    assert worker.wait(30) == 0
    for key_file, key in ((old_file, OLD), (new_file, NEW)):
        out = agents.cli("status", "--json", "--master", agents.master_address, "--authkey-file", str(key_file),
                         python=str(peer_py), with_master=False)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["keyring"]["caller"] == wire.fingerprint(key)
    refused = agents.cli("status", "--master", agents.master_address, "--authkey-file",
                         str(write_key(tmp_path / "other", OTHER)), python=str(peer_py), with_master=False)
    assert refused.returncode == 2 and "refused authkey" in refused.stderr
