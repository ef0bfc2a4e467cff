"""The master's own accept and request loop, speaking BaseManager's protocol.

One thread per connection. The promises:

- bounded: at most `max_connections` in all and `max_unauthenticated` still in their
  handshake; when the handshake slots are full the *oldest* handshake is cut, so a
  flood of silent or trickling peers cannot lock real clients out (a real handshake
  takes milliseconds) and each handshake has a total deadline (wire.HANDSHAKE_TIMEOUT);
- the accept loop cannot die: descriptor exhaustion (EMFILE) backs off, a thread that
  cannot start costs that one connection, anything else is logged and survived;
- only the documented calls are served: the services' exposed methods and the few
  manager calls stock proxies need (dummy, create, incref, decref, accept_connection,
  get_methods); `shutdown` and the rest are refused and logged;
- over TLS (`tls`), each call is first put to its service's `authorize` with the peer's
  certificate identity: a refusal is logged and answered with PermissionError; when the
  TLS files change (a revocation), every TLS peer is cut and must verify again;
- a keyring: a peer may authenticate with any key of the authkey file (wire.Keyring,
  re-read at each handshake and each `refresh_keys`); when a key leaves the file, the
  connections authenticated with it are cut, so a peer still holding it is refused at
  its next handshake rather than served on;
- exactly one reply per request, never one that was not asked for; a call cut short
  by the master stopping (a service raises ConnectionAbortedError) gets no reply at
  all: the peer sees the connection close and retries, so it cannot mistake anything
  for an answer.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing import AuthenticationError

from node import tls as tlsmod
from node import wire
from node.config import describe_error, format_address
from node.errors import StorageError

log = logging.getLogger("taskfleet.server")

MAX_CONNECTIONS = 1024
MAX_UNAUTHENTICATED = 64
LISTEN_BACKLOG = 128
REJECT_LOG_WINDOW = 60.0  # seconds: at most REJECT_LOG_LINES lines about one peer host in each
REJECT_LOG_LINES = 5
MANAGER_CALLS = frozenset({"dummy", "create", "incref", "decref", "accept_connection", "get_methods"})
TLS_CHECK_EVERY = 1.0  # seconds between looks at the TLS files (a revocation takes effect this fast)


@dataclass
class Service:
    """An object served under `ident`; stock proxies reach it through `typeid`."""

    ident: str
    obj: object
    exposed: frozenset
    typeid: str = ""
    drain: bool = True  # a stopping server waits for calls under way (not for blocking queue gets)
    # (identity, method, args, kwargs) -> None, or raises PermissionError; TLS peers only
    authorize: object = None


@dataclass
class _Rejections:
    count: int = 0
    last: float = 0.0
    reason: str = ""
    window: float = -1e9  # when the current logging window began
    lines: int = 0  # lines logged in it


class Server:
    def __init__(self, address: tuple[str, int], authkey, services: list[Service], *,
                 max_connections: int = MAX_CONNECTIONS, max_unauthenticated: int = MAX_UNAUTHENTICATED,
                 tls: tlsmod.TLS | None = None):
        """`authkey`: a wire.Keyring, or the one key (bytes). `tls`: node.tls.TLS (server
        side) to speak only TLS, or None for plaintext."""
        self.tls = tls
        self.tls_checked = time.monotonic()
        self.keyring = wire.Keyring.of(authkey)
        self.key_ids = [wire.fingerprint(k) for k in self.keyring.keys()]  # the ring last seen, in order
        self.local = threading.local()  # .key_id: the key of the connection this thread serves
        self.services = {s.ident: s for s in services}
        self.typeids = {s.typeid: s for s in services if s.typeid}
        self.max_connections = max_connections
        self.max_unauthenticated = max_unauthenticated
        self.listener = socket.create_server(tuple(address), backlog=LISTEN_BACKLOG,
                                             family=socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        self.listener.settimeout(0.5)  # the accept loop looks at `stopping` this often
        self.address = self.listener.getsockname()[:2]
        self.lock = threading.Lock()
        self.handshaking: dict[wire.Connection, float] = {}  # -> monotonic time accepted (oldest first)
        self.serving: set[wire.Connection] = set()
        self.calls = 0  # calls under way
        self.idle = threading.Condition(self.lock)
        self.stopping = False
        self.rejections: dict[str, _Rejections] = {}  # peer host -> refused handshakes
        self.refused = 0  # refused peers, ever (a counter for metrics: `rejections` forgets hosts)
        self.thread: threading.Thread | None = None

    # -- accepting -------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        backoff = 0.01
        while not self.stopping:
            self._check_tls()
            try:
                sock, peer = self.listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self.stopping:
                    break
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept connections: %s; retrying in %.2f s", describe_error(exc), backoff)
                    time.sleep(backoff)
                    backoff = min(1.0, backoff * 2)
                else:
                    log.warning("accept failed: %s", describe_error(exc))
                    time.sleep(0.05)
                continue
            except Exception:  # never let the loop die
                log.exception("accept failed")
                time.sleep(0.05)
                continue
            backoff = 0.01
            try:
                self._admit(sock, peer)
            except Exception:
                log.exception("could not serve a connection from %s", _host(peer))
                sock.close()

    def _check_tls(self) -> None:
        """Cut every peer when the TLS files changed, so each verifies again against
        the new ones (a revoked certificate is out within TLS_CHECK_EVERY)."""
        if self.tls is None or time.monotonic() - self.tls_checked < TLS_CHECK_EVERY:
            return
        self.tls_checked = time.monotonic()
        try:
            if not self.tls.changed():
                return
        except tlsmod.TLSConfigError as exc:
            log.error("%s: still using the TLS files loaded before", exc)
            return
        with self.lock:
            conns = list(self.handshaking) + list(self.serving)
        log.warning("TLS files in %s changed: every peer (%d) must verify again", self.tls.directory, len(conns))
        for conn in conns:
            conn.abort()

    def _admit(self, sock: socket.socket, peer) -> None:
        conn = wire.Connection(self.tls.wrap_server(sock) if self.tls else sock)
        evict = None
        with self.lock:
            if len(self.handshaking) + len(self.serving) >= self.max_connections:
                self._rejected(peer, "too many connections")
                sock.close()
                return
            if len(self.handshaking) >= self.max_unauthenticated:
                evict = next(iter(self.handshaking))  # the oldest: dicts keep insertion order
                self.handshaking.pop(evict)
            self.handshaking[conn] = time.monotonic()
        if evict is not None:
            evict.abort()
        try:
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()
        except RuntimeError as exc:  # can't start a thread: lose this connection, not the loop
            log.warning("cannot serve %s: %s", _host(peer), exc)
            with self.lock:
                self.handshaking.pop(conn, None)
            conn.close()

    def _rejected(self, peer, reason: str) -> None:
        """Count a refused peer; log at most REJECT_LOG_LINES lines a minute per host,
        so a flood cannot flood the journal (lock held)."""
        host = _host(peer)
        entry = self.rejections.setdefault(host, _Rejections())
        now = time.monotonic()
        entry.count, entry.last, entry.reason = entry.count + 1, now, reason
        self.refused += 1
        if now - entry.window >= REJECT_LOG_WINDOW:
            entry.window, entry.lines = now, 0
        entry.lines += 1
        if entry.lines <= REJECT_LOG_LINES:
            log.warning("rejected %s: %s%s", format_address(peer) if isinstance(peer, tuple) else host, reason,
                        f"; more from {host} are counted, not logged, for a minute (see status)"
                        if entry.lines == REJECT_LOG_LINES else "")
        if len(self.rejections) > 1000:  # a scan from many addresses: keep the newest
            for old in sorted(self.rejections, key=lambda h: self.rejections[h].last)[:500]:
                del self.rejections[old]

    def rejected_peers(self) -> list[dict]:
        """Hosts refused in the last hour: {host, count, seconds_ago, reason}, newest first."""
        now = time.monotonic()
        with self.lock:
            rows = [{"host": host, "count": r.count, "seconds_ago": round(now - r.last, 1), "reason": r.reason}
                    for host, r in self.rejections.items() if now - r.last < 3600]
        return sorted(rows, key=lambda r: r["seconds_ago"])

    # -- one connection --------------------------------------------------------------

    def _serve(self, conn: wire.Connection, peer) -> None:
        try:
            if self._handshake(conn, peer):
                self._request_loop(conn, peer)
        except Exception:
            log.exception("connection from %s failed", _host(peer))
        finally:
            with self.lock:
                self.handshaking.pop(conn, None)
                self.serving.discard(conn)
            conn.close()

    def _handshake(self, conn: wire.Connection, peer) -> bool:
        try:
            wire.serve_handshake(conn, self.refresh_keys())
        except AuthenticationError:
            reason = "authentication failed (wrong authkey)"
        except EOFError:
            if conn in self.handshaking:  # closed without a word: a port probe (health check)
                log.debug("connection from %s closed before authenticating", _host(peer))
                return False
            reason = "handshake cut: too many unauthenticated connections"
        except PermissionError as exc:  # a certificate of our CA without a role
            reason = str(exc)
        except (OSError, AssertionError) as exc:
            reason = f"no valid handshake ({_handshake_error(exc, self.tls is not None)})"
        else:
            with self.lock:
                if self.stopping or self.handshaking.pop(conn, None) is None or conn.key_id not in self.key_ids:
                    return False  # evicted at the last moment, the master is stopping, or its key just left
                self.serving.add(conn)
            wire.tune(conn.sock, keepalive=True)
            conn.timeout = None
            self.local.key_id = conn.key_id
            return True
        with self.lock:
            self._rejected(peer, reason)
        return False

    def _request_loop(self, conn: wire.Connection, peer) -> None:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return
            except Exception as exc:  # unpicklable: a broken peer
                log.warning("dropping %s: unreadable request (%s)", _host(peer), describe_error(exc))
                return
            ident = request[0] if isinstance(request, tuple) and request else None
            service = self.services.get(ident) if isinstance(ident, str) else None
            counted = service is None or service.drain
            with self.lock:
                if self.stopping:
                    return
                self.calls += counted
            try:
                reply = self._dispatch(request, peer, conn.identity)
            except ConnectionAbortedError:  # cut short by the master stopping: no reply
                return
            finally:
                with self.lock:
                    self.calls -= counted
                    self.idle.notify_all()
            try:
                conn.send(reply)
            except (OSError, EOFError):
                return
            except Exception as exc:  # the value would not pickle
                conn.send(("#ERROR", RuntimeError(f"the reply could not be sent: {describe_error(exc)}")))

    def _dispatch(self, request, peer, identity: tlsmod.Identity | None = None):
        """The reply to one request (see the module docstring)."""
        if not (isinstance(request, tuple) and len(request) == 4 and isinstance(request[0], (str, type(None)))
                and isinstance(request[1], str) and isinstance(request[2], tuple) and isinstance(request[3], dict)):
            return self._refuse(peer, f"malformed request {type(request).__name__}")
        ident, method, args, kwargs = request
        if ident is None:
            if method not in MANAGER_CALLS:
                return self._refuse(peer, f"manager call {method!r} is not served")
            try:
                return ("#RETURN", self._manager_call(method, args))
            except LookupError as exc:
                return ("#ERROR", exc)
        service = self.services.get(ident)
        if service is None or method not in service.exposed:
            return self._refuse(peer, f"call {method!r} on {ident!r} is not served")
        if identity is not None:
            try:
                if service.authorize is None:
                    raise PermissionError(f"{identity} may not call {method}")
                service.authorize(identity, method, args, kwargs)
            except PermissionError as exc:
                return self._refuse(peer, str(exc))
        try:
            return ("#RETURN", getattr(service.obj, method)(*args, **kwargs))
        except ConnectionAbortedError:  # the service is stopping: see _request_loop
            raise
        except (ValueError, LookupError, TypeError, PermissionError) as exc:
            return ("#ERROR", exc)
        except StorageError as exc:  # a full disk: said plainly, no traceback; the peer retries
            log.warning("%s from %s: %s", method, _host(peer), exc)
            return ("#ERROR", exc)
        except Exception as exc:
            log.exception("%s from %s failed", method, _host(peer))
            return ("#ERROR", exc)

    def _manager_call(self, method: str, args: tuple):
        if method == "create":  # a stock proxy asks for an object by its typeid
            service = self.typeids.get(args[0] if args else None)
            if service is None:
                raise LookupError(f"no type {args[0] if args else None!r} is served")
            return service.ident, tuple(sorted(service.exposed))
        if method == "get_methods":
            token = args[0] if args else None
            service = self.services.get(getattr(token, "id", None))
            return tuple(sorted(service.exposed)) if service else ()
        return None  # dummy, incref, decref, accept_connection: objects live as long as the master

    def _refuse(self, peer, what: str):
        log.warning("refused %s from %s", what, _host(peer))
        return ("#ERROR", PermissionError(f"refused: {what}"))

    # -- the keyring -----------------------------------------------------------------

    def refresh_keys(self) -> list[bytes]:
        """The ring as the authkey file holds it now. Connections authenticated with a key
        that left it are cut (logged with the key's fingerprint)."""
        keys = self.keyring.keys()
        key_ids = [wire.fingerprint(k) for k in keys]
        with self.lock:
            if key_ids == self.key_ids:
                return keys
            self.key_ids = key_ids
            cut = [c for c in self.serving if c.key_id not in key_ids]
        for conn in cut:
            conn.abort()
        log.info("authkey ring now %s%s", ", ".join(key_ids),
                 f"; cut {len(cut)} connection(s) made with a key no longer in it" if cut else "")
        return keys

    def caller_key(self) -> str | None:
        """Fingerprint of the key the connection making the current call authenticated with."""
        return getattr(self.local, "key_id", None)

    # -- stopping --------------------------------------------------------------------

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; let calls under way finish (up to `grace` s); cut every
        connection. New requests from now on get no reply."""
        with self.lock:
            self.stopping = True
            self.idle.wait_for(lambda: self.calls == 0, timeout=grace)
            conns = list(self.handshaking) + list(self.serving)
        for conn in conns:
            conn.abort()
        if self.thread is not None:
            self.thread.join(2.0)
        self.listener.close()


def _handshake_error(exc: BaseException, over_tls: bool) -> str:
    if over_tls and isinstance(exc, TimeoutError):
        return "timed out: no TLS handshake (a plaintext client?)"
    return describe_error(exc)


def _host(peer) -> str:
    return peer[0] if isinstance(peer, tuple) else str(peer or "unknown peer")
