"""Hostile and slow peers on a master's port, for the chaos tier (run as its own process).

    python tests/chaos/hostile.py PORT SILENT TRICKLE GARBAGE SEED

Keeps SILENT connections that send nothing, TRICKLE connections that send one byte a
second (a plausible 4-byte length prefix first, so a naive reader waits on them), and
GARBAGE connections that send random bytes every second. A connection the master closes
(or that did not open) is opened again each second, so the pressure stays until this
process is killed. Prints "hostile: N peers connected" once the first ones are open.
Only ever connects to 127.0.0.1.
"""

from __future__ import annotations

import errno
import random
import select
import socket
import sys
import time

PREFIX = b"\x00\x00\x00\x40"  # "a 64-byte message follows"
CONNECT_WAIT = 5.0  # seconds the first connections get to open


def start_connect(port: int) -> socket.socket | None:
    """A non-blocking connect to 127.0.0.1:port under way, or None if it failed at once."""
    sock = socket.socket()
    sock.setblocking(False)
    if sock.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
        sock.close()
        return None
    return sock


def wait_connected(socks: list, seconds: float) -> None:
    """Give pending connects up to `seconds` to complete (bounded; poll, as fds may pass 1024)."""
    deadline = time.monotonic() + seconds
    poller, pending = select.poll(), set()
    for sock in socks:
        if sock is not None:
            poller.register(sock, select.POLLOUT)
            pending.add(sock.fileno())
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            poller.unregister(fd)
            pending.discard(fd)


def usable(sock: socket.socket | None) -> bool:
    """Connected and not closed by the master (what it sent is read and dropped)."""
    if sock is None or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
        return False
    try:
        while True:
            if not sock.recv(65536):
                return False
    except BlockingIOError:
        return True
    except OSError as exc:
        return exc.errno == errno.ENOTCONN  # still connecting: give it another second


def poke(sock: socket.socket, kind: str, sent: int, rng: random.Random) -> bool:
    """Send this second's bytes for a peer of `kind`; False if the connection is gone."""
    try:
        if kind == "trickle":
            sock.send(PREFIX[sent:sent + 1] if sent < len(PREFIX) else bytes([rng.randrange(256)]))
        elif kind == "garbage":
            sock.send(bytes(rng.randrange(256) for _ in range(rng.randint(1, 2048))))
        return True
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    port, silent, trickle, garbage, seed = (int(a) for a in argv)
    rng = random.Random(seed)
    kinds = ["silent"] * silent + ["trickle"] * trickle + ["garbage"] * garbage
    peers = [[start_connect(port), kind, 0] for kind in kinds]  # socket, kind, bytes sent
    wait_connected([p[0] for p in peers], CONNECT_WAIT)
    opened = sum(1 for p in peers if usable(p[0]))
    print(f"hostile: {opened} of {len(peers)} peers connected ({silent} silent, {trickle} trickle, "
          f"{garbage} garbage)", flush=True)
    reopened = reported = 0
    while True:
        time.sleep(1.0)
        for peer in peers:
            sock, kind, sent = peer
            if usable(sock) and poke(sock, kind, sent, rng):
                peer[2] = sent + 1
                continue
            if sock is not None:
                sock.close()
            peer[0], peer[2] = start_connect(port), 0
            reopened += 1
        if reopened != reported:
            print(f"hostile: {reopened} connection(s) reopened so far", flush=True)
            reported = reopened


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
