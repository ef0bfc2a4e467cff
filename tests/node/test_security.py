"""The master facing peers without the key: wrong keys, garbage, hostile pickles."""

import errno
import logging
import os
import pickle
import random
import resource
import select
import socket
import struct
import threading
import time

import pytest

from node import server as server_module
from node import wire
from node.errors import MasterUnavailable

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


def assert_serving(agents):
    with agents.client(retry_for=0) as client:
        assert client.status()["master"]["pid"] == agents.procs[0].pid
    assert agents.procs[0].alive()


def test_wrong_authkey_client_worker_and_master_log(agents, tmp_path):
    master = agents.start_master()
    wrong = write_key(tmp_path / "wrong", b"not-the-agents-key")
    out = agents.cli("status", "--master", agents.master_address, "--authkey-file", str(wrong), with_master=False)
    assert out.returncode == 2
    assert "authentication failed" in out.stderr and "Traceback" not in out.stderr
    worker = agents.start_worker(key=wrong)
    assert worker.wait(30) != 0
    assert "authentication failed" in worker.text()
    wait_for(lambda: master.text().count("rejected 127.0.0.1:") >= 2, 10, "the master to log both peers")
    assert "authentication failed" in master.text()
    assert_serving(agents)
    assert agents.alive_workers() == []


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
def test_garbage_on_the_port_is_dropped_and_the_master_keeps_serving(agents, name):
    master = agents.start_master()
    answer = raw(agents.port, GARBAGE[name])
    assert b"#WELCOME#" not in answer and b"Traceback" not in answer
    assert_serving(agents)
    if name != "empty":
        wait_for(lambda: "rejected 127.0.0.1:" in master.text(), 10, "the master to log the peer")
    assert "Traceback" not in master.text()


def test_half_open_connections_do_not_block_other_clients(agents):
    master = agents.start_master()
    silent = [socket.create_connection(("127.0.0.1", agents.port)) for _ in range(20)]
    try:
        for _ in range(3):
            assert_serving(agents)  # served while 20 peers sit in their handshake
        worker = agents.start_worker()
        agents.wait_workers(1)
        with agents.client() as client:
            assert [r.value for r in client.submit("square", [[2], [3]]).wait()] == [4, 9]
        assert worker.alive() and master.alive()
    finally:
        for sock in silent:
            sock.close()


class _Echo:
    def ping(self, value):
        return value


@pytest.fixture
def in_process_server(monkeypatch):
    """A Server in this process (an echo service), with a short handshake deadline."""
    monkeypatch.setattr(wire, "HANDSHAKE_TIMEOUT", 0.5)
    key = b"in-process-key"
    servers = []

    def start(**limits):
        server = server_module.Server(("127.0.0.1", 0), key, [server_module.Service("echo", _Echo(),
                                                                                    frozenset({"ping"}))], **limits)
        server.start()
        servers.append(server)
        return server, wire.Caller(server.address, key, ident="echo")

    yield start
    for server in servers:
        server.stop(grace=1)


def test_handshake_deadline_drops_a_silent_peer(in_process_server, caplog):
    server, caller = in_process_server()
    caplog.set_level(logging.INFO, logger="taskfleet.server")
    with socket.create_connection(server.address) as silent:
        silent.settimeout(10)
        challenge = silent.recv(4096)
        assert b"#CHALLENGE#" in challenge
        assert silent.recv(4096) == b""  # closed by the master after HANDSHAKE_TIMEOUT
    wait_for(lambda: "no valid handshake" in caplog.text, 5, "the rejection to be logged")
    assert "rejected 127.0.0.1:" in caplog.text
    assert caller.call("ping", 7) == 7


def test_the_handshake_deadline_is_total_not_per_read(in_process_server):
    """A peer that trickles a byte every 0.2 s never lets a read time out; the total
    deadline (0.5 s here) still closes it."""
    server, _ = in_process_server()
    with socket.create_connection(server.address) as trickler:
        trickler.settimeout(10)
        trickler.recv(4096)  # the challenge
        started = time.monotonic()
        answer = struct.pack("!i", 40)
        closed = False
        for byte in answer + b"x" * 40:
            try:
                trickler.send(bytes([byte]))
            except OSError:
                closed = True
                break
            ready = select.select([trickler], [], [], 0.2)[0]
            if ready and trickler.recv(4096) == b"":
                closed = True
                break
        assert closed, "a trickling peer kept its handshake open past the deadline"
        assert time.monotonic() - started < 5


def test_oldest_handshakes_give_way_to_new_peers(in_process_server):
    """With every handshake slot held by silent peers, a real client still gets in:
    the oldest unauthenticated connection is cut."""
    server, caller = in_process_server(max_unauthenticated=4)
    silent = [socket.create_connection(server.address) for _ in range(4)]
    try:
        wait_for(lambda: len(server.handshaking) == 4, 5, "four peers in their handshake")
        assert caller.call("ping", "in") == "in"
        assert silent[0].recv(4096, socket.MSG_PEEK) and wait_for(lambda: _closed(silent[0]), 5, "the oldest cut")
    finally:
        for sock in silent:
            sock.close()


def _closed(sock) -> bool:
    sock.settimeout(0.2)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except socket.timeout:
        return False
    except OSError:
        return True


def test_connections_over_the_cap_are_refused_and_the_master_keeps_serving(in_process_server):
    server, caller = in_process_server(max_connections=8, max_unauthenticated=8)
    callers = [wire.Caller(server.address, b"in-process-key", ident="echo") for _ in range(8)]
    for c in callers:
        c.connect()  # 8 authenticated connections: the cap
    try:
        with pytest.raises(MasterUnavailable):
            caller.call("ping", 1)
        assert "too many connections" in [r["reason"] for r in server.rejected_peers()]
        callers[0].close()
        assert wait_for(lambda: _try_ping(caller), 5, "a freed slot to be usable") == 1
    finally:
        for c in callers:
            c.close()


def _try_ping(caller):
    try:
        return caller.call("ping", 1)
    except MasterUnavailable:
        return None


def test_200_hostile_peers_do_not_starve_workers_and_clients(agents):
    """Silent, trickling and garbage-sending peers, 200 at once, for longer than the
    handshake deadline: a worker joins and runs a job, clients are served."""
    master = agents.start_master()
    stop = threading.Event()
    opened = []

    def hostile(kind: int):
        while not stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", agents.port), timeout=5)
            except OSError:
                stop.wait(0.1)
                continue
            opened.append(sock)
            try:
                while not stop.is_set():
                    if kind == 1:
                        sock.send(b"x")  # trickle a byte a second
                    elif kind == 2:
                        sock.send(os.urandom(64))
                    if stop.wait(1.0):
                        break
            except OSError:
                pass
            finally:
                sock.close()

    threads = [threading.Thread(target=hostile, args=(n % 3,), daemon=True) for n in range(200)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(opened) >= 200, 30, "200 hostile connections")
        worker = agents.start_worker(concurrency=2)
        agents.wait_workers(1, timeout=30)
        deadline = time.monotonic() + 8  # past the 5 s handshake deadline
        while time.monotonic() < deadline:
            with agents.client(retry_for=10) as client:
                assert [r.value for r in client.submit("square", [[2], [3]]).wait()] == [4, 9]
        assert worker.alive() and master.alive()
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    assert agents.status()["rejected"], "the refused peers show in status"


def test_shutdown_and_other_undocumented_calls_are_refused(agents):
    master = agents.start_master()
    conn = wire.dial(("127.0.0.1", agents.port), agents.key.read_bytes())
    try:
        for request in [(None, "shutdown", (), {}), (None, "debug_info", (), {}), ("master", "upkeep", (), {}),
                        ("master", "__init__", (), {}), ("nope", "status", (), {}), "not a request"]:
            conn.send(request)
            kind, value = conn.recv()
            assert kind == "#ERROR" and isinstance(value, PermissionError), (request, kind, value)
    finally:
        conn.close()
    assert master.alive()
    assert_serving(agents)
    assert master.text().count("refused") >= 6


def test_a_master_at_its_descriptor_limit_backs_off_and_recovers(agents):
    """At RLIMIT_NOFILE the accept loop must not spin, and must serve again once
    descriptors are free."""
    master = agents.start_master(preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    socks = []
    try:
        for _ in range(120):
            try:
                socks.append(socket.create_connection(("127.0.0.1", agents.port), timeout=2))
            except OSError:
                break
        wait_for(lambda: "cannot accept connections" in master.text(), 15, "the master to hit its limit")
        before = _cpu_seconds(master.pid)
        time.sleep(3)
        spent = _cpu_seconds(master.pid) - before
        assert spent < 1.0, f"the master used {spent:.2f} s of CPU in 3 s at its descriptor limit: spinning"
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: agents.try_status() is not None, 20, "the master to serve again")
    assert master.alive()


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def test_nothing_from_an_unauthenticated_peer_is_unpickled(agents, tmp_path):
    master = agents.start_master()
    markers = [tmp_path / f"pwned-{n}" for n in range(4)]
    # sanity: these pickles do create their marker when unpickled
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Touch(str(probe)))).close()
    assert probe.exists()

    evil = [pickle.dumps(_Touch(str(markers[0]))), pickle.dumps(_System(f"touch {markers[1]}")),
            pickle.dumps(_Touch(str(markers[2]))), pickle.dumps(_System(f"touch {markers[3]}"))]
    # as the answer to the master's challenge
    answer = raw(agents.port, frame(evil[0]), read_first=True)
    assert b"#FAILURE#" in answer
    raw(agents.port, frame(evil[1]), read_first=True)
    # as a first "request", without any handshake
    raw(agents.port, frame(evil[2]))
    raw(agents.port, frame(evil[3]) + frame(pickle.dumps((None, "create", ("get_master",), {}))))
    wait_for(lambda: master.text().count("rejected 127.0.0.1:") >= 4, 10, "four rejections")
    assert_serving(agents)
    assert not any(marker.exists() for marker in markers)
