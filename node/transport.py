"""The BaseManager transport, hardened.

The master serves objects with a `multiprocessing.managers` Server behind the shared
authkey (HMAC challenge both ways). What the stock classes lack, added here:

- the handshake runs under a deadline and a failed one is logged with the peer's
  address and closed: nothing from an unauthenticated peer is ever unpickled (the
  challenge reads at most 256 raw bytes) and no traceback is sent back;
- authenticated connections get TCP keepalive (a vanished client frees its thread)
  and TCP_NODELAY;
- clients connect with a timeout and put a receive timeout on their sockets, so an
  unreachable or silent master becomes an error instead of a hang. CPython's proxies
  never reconnect, so callers build a fresh manager after any such error.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from multiprocessing import AuthenticationError, connection, managers, util
from traceback import format_exc

from node.config import describe_error, format_address

log = logging.getLogger("taskfleet.transport")

HANDSHAKE_TIMEOUT = 10.0  # seconds an unauthenticated peer may take to answer
CONNECT_TIMEOUT = 10.0
REPLY_TIMEOUT = 120.0  # longest any single call may take before the master counts as lost
LISTEN_BACKLOG = 128  # the stock Server listens with 16 (gh-101225)
SERIALIZER = "taskfleet"

# The methods of the master's fleet service, as seen through a proxy.
FLEET_METHODS = (
    "hello",
    "heartbeat",
    "goodbye",
    "lease",
    "complete",
    "release",
    "submit",
    "job",
    "results",
    "status",
)


class MasterUnavailable(ConnectionError):
    """The master cannot be reached or stopped answering."""


def _recv_timeout(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6))
    )


def _on_fd(fd: int, seconds: float) -> None:
    sock = socket.socket(fileno=fd)
    try:
        _recv_timeout(sock, seconds)
    finally:
        sock.detach()


def _tune_served(fd: int) -> None:
    """Keepalive (a vanished peer frees its thread) and no Nagle: replies over 16 KiB
    go out as two writes, which Nagle plus delayed ACKs would stall by ~40 ms each."""
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    finally:
        sock.detach()


def timed_client(address, family=None, authkey=None):
    """Like multiprocessing.connection.Client, with connect and reply timeouts."""
    sock = socket.create_connection(tuple(address), timeout=CONNECT_TIMEOUT)
    try:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _recv_timeout(sock, REPLY_TIMEOUT)
        conn = connection.Connection(sock.detach())
    finally:
        sock.close()
    try:
        if authkey is not None:
            connection.answer_challenge(conn, authkey)
            connection.deliver_challenge(conn, authkey)
    except BaseException:
        conn.close()
        raise
    return conn


# Proxies look their client function up by serializer name; ours speaks the same wire format.
managers.listener_client[SERIALIZER] = (connection.Listener, timed_client)

FleetProxy = managers.MakeProxyType("FleetProxy", FLEET_METHODS)


class FleetServer(managers.Server):
    """managers.Server with logged, time-limited authentication (see the module docstring)."""

    def __init__(self, registry, address, authkey, serializer="pickle"):
        super().__init__(registry, address, authkey, serializer)
        try:  # private attribute; a bigger backlog is an optimisation only
            self.listener._listener._socket.listen(LISTEN_BACKLOG)
        except AttributeError:
            pass
        self.stop_event = threading.Event()

    def accepter(self):
        while not self.stop_event.is_set():
            try:
                conn = self.listener.accept()
            except OSError:
                continue
            peer = self.listener.last_accepted
            threading.Thread(target=self.handle_request, args=(conn, peer), daemon=True).start()

    def handle_request(self, conn, peer=None):
        try:
            _on_fd(conn.fileno(), HANDSHAKE_TIMEOUT)
            try:
                connection.deliver_challenge(conn, self.authkey)
                connection.answer_challenge(conn, self.authkey)
            except AuthenticationError as exc:
                log.warning("rejected %s: authentication failed (%s)", _peer(peer), exc)
                return
            except EOFError:  # closed without a word: a port probe (health check, wait_for)
                log.info("connection from %s closed before authenticating", _peer(peer))
                return
            except OSError as exc:
                log.warning("rejected %s: no valid handshake (%s)", _peer(peer), describe_error(exc))
                return
            _on_fd(conn.fileno(), 0)  # authenticated: long-lived, may idle
            _tune_served(conn.fileno())
            self._serve_authenticated(conn)
        except SystemExit:  # Server.serve_client() exits this way on EOF
            pass
        except Exception:
            log.exception("connection from %s failed", _peer(peer))
        finally:
            conn.close()

    def _serve_authenticated(self, conn):
        # As Server._handle_request after its handshake.
        try:
            ignore, funcname, args, kwds = conn.recv()
            assert funcname in self.public, f"{funcname!r} unrecognized"
            func = getattr(self, funcname)
        except Exception:
            msg = ("#TRACEBACK", format_exc())
        else:
            try:
                msg = ("#RETURN", func(conn, *args, **kwds))
            except Exception:
                msg = ("#TRACEBACK", format_exc())
        conn.send(msg)


def _peer(peer) -> str:
    return format_address(peer) if isinstance(peer, tuple) else str(peer or "unknown peer")


class FleetManager(managers.BaseManager):
    """Client side: `get_fleet()` returns a proxy to the master's fleet service; the
    classic `get_task_queue()` / `get_result_queue()` pair is there too."""


FleetManager.register("get_fleet", proxytype=FleetProxy)
FleetManager.register("get_task_queue")
FleetManager.register("get_result_queue")


def connect(address: tuple[str, int], authkey: bytes):
    """A connected FleetManager and a fresh fleet proxy. Raises MasterUnavailable or
    AuthenticationError with a message an operator can act on."""
    where = format_address(address)
    manager = FleetManager(address=tuple(address), authkey=authkey, serializer=SERIALIZER)
    try:
        manager.connect()
        fleet = manager.get_fleet()
        # CPython caches one connection per thread and *address*, shared by every proxy to
        # it: discarding one proxy would cut the others', which then silently reconnect
        # (to a restarted master, with an object id it never issued). Each proxy gets its own.
        fleet._tls = util.ForkAwareLocal()
        return manager, fleet
    except AuthenticationError:
        raise AuthenticationError(
            f"authentication failed with the master at {where}: the authkey file does not hold the master's key"
        ) from None
    except (OSError, EOFError) as exc:
        raise MasterUnavailable(f"cannot reach the master at {where}: {describe_error(exc)}") from None


def serve(address: tuple[str, int], authkey: bytes, objects: dict) -> FleetServer:
    """A FleetServer (not yet accepting) that serves `objects`: typeid -> object."""

    class _Registry(managers.BaseManager):
        pass

    for typeid, obj in objects.items():
        methods = FLEET_METHODS if typeid == "get_fleet" else None
        _Registry.register(typeid, callable=(lambda o=obj: o), exposed=methods)
    return FleetServer(_Registry._registry, tuple(address), authkey)


def discard(proxy) -> None:
    """Forget a proxy after its master went away: close the connection CPython caches
    per thread and address (else a fresh proxy to a restarted master reuses the dead
    socket) and skip the decref call that would try to reach the dead master."""
    if proxy is None:
        return
    finalizer = getattr(proxy, "_close", None)
    if finalizer is not None:
        finalizer.cancel()
    tls = getattr(proxy, "_tls", None)
    conn = getattr(tls, "connection", None)
    if conn is not None:
        del tls.connection
        conn.close()
