"""The master facing peers without the key: wrong keys, garbage, hostile pickles."""

import errno
import logging
import os
import pickle
import random
import socket
import struct
import threading

import pytest

from node import transport
from node.ledger import Ledger
from node.master import FleetService
from node.tasks import Registry

from conftest import wait_for, write_key


def frame(payload: bytes) -> bytes:
    """As multiprocessing.connection frames a message: 4-byte big-endian length, payload."""
    return struct.pack("!i", len(payload)) + payload


def raw(port: int, data: bytes = b"", read_first: bool = False, timeout: float = 15.0) -> bytes:
    """Send `data` to the master on a raw socket; return whatever it answers before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        received = b""
        if read_first:
            received = sock.recv(4096)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        except OSError as exc:  # the master may drop us before our shutdown(): ENOTCONN
            if exc.errno != errno.ENOTCONN:
                raise
        return received


def assert_serving(fleet):
    with fleet.client(retry_for=0) as client:
        assert client.status()["master"]["pid"] == fleet.procs[0].pid
    assert fleet.procs[0].alive()


def test_wrong_authkey_client_worker_and_master_log(fleet, tmp_path):
    master = fleet.start_master()
    wrong = write_key(tmp_path / "wrong", b"not-the-fleet-key")
    out = fleet.cli("status", "--master", fleet.master_address, "--authkey-file", str(wrong), with_master=False)
    assert out.returncode == 2
    assert "authentication failed" in out.stderr and "Traceback" not in out.stderr
    worker = fleet.start_worker(key=wrong)
    assert worker.wait(30) != 0
    assert "authentication failed" in worker.text()
    wait_for(lambda: master.text().count("rejected 127.0.0.1:") >= 2, 10, "the master to log both peers")
    assert "authentication failed" in master.text()
    assert_serving(fleet)
    assert fleet.alive_workers() == []


GARBAGE = {
    "random bytes": bytes(random.Random(7).getrandbits(8) for _ in range(3000)),
    "http request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8\r\n\r\n",
    "huge length prefix": b"\x7f\xff\xff\xff" + b"A" * 100,
    "64-bit length prefix": b"\xff\xff\xff\xff" + struct.pack("!Q", 2**62) + b"B" * 100,
    "negative length": b"\x80\x00\x00\x00hello",
    "tls hello": bytes.fromhex("16030100a5010000a10303") + os.urandom(160),
    "empty": b"",
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_on_the_port_is_dropped_and_the_master_keeps_serving(fleet, name):
    master = fleet.start_master()
    answer = raw(fleet.port, GARBAGE[name])
    assert b"#WELCOME#" not in answer and b"Traceback" not in answer
    assert_serving(fleet)
    if name != "empty":
        wait_for(lambda: "rejected 127.0.0.1:" in master.text(), 10, "the master to log the peer")
    assert "Traceback" not in master.text()


def test_half_open_connections_do_not_block_other_clients(fleet):
    master = fleet.start_master()
    silent = [socket.create_connection(("127.0.0.1", fleet.port)) for _ in range(20)]
    try:
        for _ in range(3):
            assert_serving(fleet)  # served while 20 peers sit in their handshake
        worker = fleet.start_worker()
        fleet.wait_workers(1)
        with fleet.client() as client:
            assert [r.value for r in client.submit("square", [[2], [3]]).wait()] == [4, 9]
        assert worker.alive() and master.alive()
    finally:
        for sock in silent:
            sock.close()


@pytest.fixture
def in_process_master(tmp_path, monkeypatch):
    """A master served from this process, to patch its handshake deadline."""
    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT", 0.5)
    key = b"in-process-key"
    ledger = Ledger(tmp_path / "state")
    service = FleetService(ledger, Registry(), worker_ttl=5)
    server = transport.serve(("127.0.0.1", 0), key, {"get_fleet": service})
    thread = threading.Thread(target=server.accepter, daemon=True)
    thread.start()
    try:
        yield server, key
    finally:
        server.stop_event.set()
        sock = server.listener._listener._socket
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() the accepter sits in
        except OSError:
            pass
        server.listener.close()
        thread.join(5)
        ledger.close()


def test_handshake_deadline_drops_a_silent_peer(in_process_master, caplog):
    server, key = in_process_master
    caplog.set_level(logging.INFO, logger="taskfleet.transport")
    with socket.create_connection(server.address) as silent:
        silent.settimeout(10)
        challenge = silent.recv(4096)
        assert b"#CHALLENGE#" in challenge
        assert silent.recv(4096) == b""  # closed by the master after HANDSHAKE_TIMEOUT
    wait_for(lambda: "no valid handshake" in caplog.text, 5, "the rejection to be logged")
    assert "rejected 127.0.0.1:" in caplog.text
    manager, fleet = transport.connect(server.address, key)
    try:
        assert fleet.status()["tasks"]["jobs"] == 0
    finally:
        transport.discard(fleet)


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_nothing_from_an_unauthenticated_peer_is_unpickled(fleet, tmp_path):
    master = fleet.start_master()
    markers = [tmp_path / f"pwned-{n}" for n in range(4)]
    # sanity: these pickles do create their marker when unpickled
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Touch(str(probe)))).close()
    assert probe.exists()

    evil = [pickle.dumps(_Touch(str(markers[0]))), pickle.dumps(_System(f"touch {markers[1]}")),
            pickle.dumps(_Touch(str(markers[2]))), pickle.dumps(_System(f"touch {markers[3]}"))]
    # as the answer to the master's challenge
    answer = raw(fleet.port, frame(evil[0]), read_first=True)
    assert b"#FAILURE#" in answer
    raw(fleet.port, frame(evil[1]), read_first=True)
    # as a first "request", without any handshake
    raw(fleet.port, frame(evil[2]))
    raw(fleet.port, frame(evil[3]) + frame(pickle.dumps((None, "create", ("get_fleet",), {}))))
    wait_for(lambda: master.text().count("rejected 127.0.0.1:") >= 4, 10, "four rejections")
    assert_serving(fleet)
    assert not any(marker.exists() for marker in markers)
