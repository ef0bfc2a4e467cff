"""The link between agents: BaseManager's framing and authkey handshake, owned here.

The wire format is `multiprocessing.connection`'s (a 4-byte big-endian length, or -1
and an 8-byte one, then a pickle) and the handshake is its HMAC challenge both ways,
so the tutorial's unchanged BaseManager scripts talk to a taskfleet master. What the
stock classes lack, added here:

- a keyring: the authkey file may hold several keys, one per line; an agent dials with
  the first, a master accepts any. `Keyring` re-reads the file when it changes, so a
  rotation (install, use, remove) needs no restart. The master's challenge is Python
  3.12's (`{sha256}` and 40 random bytes); answers of both kinds Python 3.9 to 3.13
  give (a bare HMAC-MD5, or `{digest}` and an HMAC, over the whole challenge) are
  checked here against each key of the ring (`deliver_challenge`);
- optional TLS 1.3 around it all (node/tls.py): the TLS handshake, then the authkey
  challenge inside it, both within the same deadline;
- `Connection` works over a socket (not a raw fd) and takes a *total* deadline: a peer
  that trickles a byte at a time cannot hold a handshake open past it;
- nothing is unpickled before the peer has authenticated (`recv_bytes(256)` only);
- `Caller` makes calls on one remote object from any number of threads over a small
  pool of authenticated connections, and turns every way of losing the master into
  `MasterUnavailable`; it never reuses a connection whose call failed.

A request is `(ident, method, args, kwargs)`; a reply is `("#RETURN", value)`,
`("#ERROR", exception)` or `("#TRACEBACK", text)`, exactly one per request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import socket
import ssl
import struct
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing import connection as mpc

from node import tls as tlsmod
from node.config import ConfigError, describe_error, format_address, read_keyring
from node.errors import MasterUnavailable, RemoteError

log = logging.getLogger("taskfleet.wire")

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 5.0  # seconds, in all, an unauthenticated peer may take
REPLY_TIMEOUT = 120.0  # longest any one call may take before the master counts as lost
MAX_MESSAGE = 256 * 1024 * 1024  # bytes of one authenticated message, at most
SMALL_MESSAGE = 16 * 1024  # header and body go out in one write below this

# multiprocessing.connection's handshake (the same bytes from Python 3.9 to 3.13).
CHALLENGE, WELCOME, FAILURE = b"#CHALLENGE#", b"#WELCOME#", b"#FAILURE#"
CHALLENGE_DIGEST = "sha256"  # what Python 3.12+ challenges with
ANSWER_DIGESTS = frozenset({"md5", "sha256", "sha384", "sha3_256", "sha3_384"})  # a 3.12+ peer may answer with
LEGACY_ANSWER_LENGTH = 16  # a bare HMAC-MD5: the answer of Python <= 3.11

_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")


class Connection:
    """A framed, pickling connection over a connected socket.

    `deadline` (a time.monotonic() value, or None) bounds every receive and send in
    all, not each system call: past it they raise TimeoutError."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline: float | None = None
        self.timeout: float | None = None  # per-operation, when no deadline is set
        self.closed = False
        self.key_id: str | None = None  # fingerprint of the key it authenticated with
        self.identity: tlsmod.Identity | None = None  # the peer's certificate (TLS only)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _arm(self) -> None:
        if self.deadline is None:
            self.sock.settimeout(self.timeout)
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(left)

    def _read(self, size: int) -> bytes:
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            self._arm()
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise EOFError("connection closed by the peer")
            got += n
        return bytes(buf)

    def send_bytes(self, data: bytes) -> None:
        size = len(data)
        header = _HEADER.pack(size) if size <= 0x7FFFFFFF else _HEADER.pack(-1) + _LONG_HEADER.pack(size)
        self._arm()
        if size <= SMALL_MESSAGE:
            self.sock.sendall(header + data)
        else:
            self.sock.sendall(header)
            self._arm()
            self.sock.sendall(data)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        (size,) = _HEADER.unpack(self._read(4))
        if size == -1:
            (size,) = _LONG_HEADER.unpack(self._read(8))
        if size < 0 or (maxlength is not None and size > maxlength):
            raise OSError(f"bad message length {size}")
        return self._read(size)

    def send(self, obj) -> None:
        self.send_bytes(pickle.dumps(obj, protocol=4))

    def recv(self, maxlength: int = MAX_MESSAGE):
        return pickle.loads(self.recv_bytes(maxlength))

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Wake a thread blocked on this connection (from another thread): it gets EOF."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def tune(sock: socket.socket, keepalive: bool = False) -> None:
    """No Nagle (a large message is header plus body: Nagle and delayed ACKs would stall
    the second write); keepalive on long-lived served connections (a vanished peer
    frees its thread)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def fingerprint(key: bytes) -> str:
    """A key's public name: the first 8 hex digits of its sha256 (never the key)."""
    return hashlib.sha256(key).hexdigest()[:8]


class Keyring:
    """The keys of an authkey file (config.read_keyring), the one to dial with first.

    The file is read again whenever its inode, size or modification time changes (checked
    at every `keys()`: one stat). A file that turns unreadable or empty after a good read
    leaves the last good ring in use, logged once: a rotation under way never takes an
    agent down. A bad file at the first read raises ConfigError. `Keyring.of(b"key")`
    holds fixed keys."""

    def __init__(self, path: str | None, keys: list | None = None):
        self.path = path
        self.fixed = keys is not None
        self._keys: list[bytes] = list(keys or [])
        self._stamp = None
        self._warned = None
        self._lock = threading.Lock()
        self.keys()  # ConfigError now if the file is unusable (no path, missing, empty, open to others)

    @classmethod
    def of(cls, authkey) -> Keyring:
        """A Keyring from a Keyring, one key (bytes) or a list of keys."""
        if isinstance(authkey, Keyring):
            return authkey
        return cls(None, [authkey] if isinstance(authkey, bytes) else list(authkey))

    def keys(self) -> list[bytes]:
        if self.fixed:
            return self._keys
        try:
            st = os.stat(self.path or "")
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        with self._lock:
            if stamp is not None and stamp == self._stamp:
                return self._keys
            try:
                keys = read_keyring(self.path)
            except ConfigError as exc:
                if not self._keys:
                    raise
                if self._warned != stamp:
                    self._warned = stamp
                    log.warning("%s; keeping the keys read before (%s)", exc, self.describe())
                return self._keys
            if self._keys and keys != self._keys:
                log.info("authkey file %s changed: keys now %s", self.path,
                         ", ".join(fingerprint(k) for k in keys))
            self._keys, self._stamp = keys, stamp
            return keys

    def dial_key(self) -> bytes:
        return self.keys()[0]

    def describe(self) -> str:
        return ", ".join(fingerprint(k) for k in self._keys)


def deliver_challenge(conn: Connection, keys: list[bytes]) -> bytes:
    """Challenge the peer and check its answer against each of `keys`; returns the key it
    answered with, or raises AuthenticationError (after telling the peer: #FAILURE#).

    The answer is an HMAC over the whole challenge (its `{sha256}` prefix included): a
    bare 16-byte HMAC-MD5 from Python <= 3.11, `{digest}HMAC` from 3.12+ (CPython's
    documented scheme; digests as its _ALLOWED_DIGESTS)."""
    message = b"{" + CHALLENGE_DIGEST.encode() + b"}" + os.urandom(40)
    conn.send_bytes(CHALLENGE + message)
    answer = conn.recv_bytes(256)
    digest, mac = "", b""
    if len(answer) == LEGACY_ANSWER_LENGTH:
        digest, mac = "md5", answer
    elif answer.startswith(b"{"):
        name, closed, mac = answer[1:].partition(b"}")
        digest = name.decode("ascii", "replace") if closed else ""
    if digest in ANSWER_DIGESTS:
        for key in keys:
            try:
                expected = hmac.new(key, message, digest).digest()
            except ValueError:  # a digest this Python lacks (md5 under FIPS)
                break
            if hmac.compare_digest(expected, mac):
                conn.send_bytes(WELCOME)
                return key
    conn.send_bytes(FAILURE)
    raise AuthenticationError("digest received was wrong")


def serve_handshake(conn: Connection, keys: list[bytes]) -> bytes:
    """The server's side: the TLS handshake if `conn` is over TLS (conn.identity: the
    peer's certificate), then challenge the peer (any key of `keys` will do) and answer
    its challenge with the key it used, within HANDSHAKE_TIMEOUT in all. Returns that key;
    sets conn.key_id to its fingerprint. Raises AuthenticationError, EOFError, OSError
    (ssl.SSLError: a plaintext peer, a certificate refused) or PermissionError."""
    conn.deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    if isinstance(conn.sock, ssl.SSLSocket):
        conn._arm()
        try:
            conn.sock.do_handshake()
        except ssl.SSLEOFError:  # closed before a word: a port probe, as over plaintext
            raise EOFError("connection closed by the peer") from None
        conn.identity = tlsmod.identity(conn.sock)
    key = deliver_challenge(conn, keys)
    mpc.answer_challenge(conn, key)
    conn.deadline = None
    conn.key_id = fingerprint(key)
    return key


def dial(address: tuple[str, int], authkey: bytes, reply_timeout: float = REPLY_TIMEOUT,
         tls: tlsmod.TLS | None = None) -> Connection:
    """An authenticated connection to the master (its key_id: `authkey`'s fingerprint),
    over TLS when `tls` is given. Raises MasterUnavailable or AuthenticationError (the
    message says what to do)."""
    where = format_address(address)
    try:
        sock = socket.create_connection(tuple(address), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise MasterUnavailable(f"cannot reach the master at {where}: {describe_error(exc)}") from None
    tune(sock)
    conn = Connection(tls.wrap_client(sock, address[0]) if tls else sock)
    try:
        conn.deadline = time.monotonic() + HANDSHAKE_TIMEOUT + CONNECT_TIMEOUT
        if tls:
            conn._arm()
            conn.sock.do_handshake()
        mpc.answer_challenge(conn, authkey)
        mpc.deliver_challenge(conn, authkey)
        conn.deadline, conn.timeout = None, reply_timeout
        conn.key_id = fingerprint(authkey)
        return conn
    except AuthenticationError:
        conn.close()
        raise AuthenticationError(
            f"authentication failed with the master at {where}: it refused authkey {fingerprint(authkey)} "
            "(the authkey file's first key is not in the master's)"
        ) from None
    except ssl.SSLError as exc:
        conn.close()
        raise AuthenticationError(f"TLS with the master at {where} failed: {_tls_reason(exc)}") from None
    except (OSError, EOFError, AssertionError) as exc:  # answer_challenge asserts on a non-challenge
        conn.close()
        raise MasterUnavailable(f"cannot reach the master at {where}: {describe_error(exc)}") from None


def _tls_reason(exc: ssl.SSLError) -> str:
    """What a TLS failure means, in words an operator can act on."""
    reason = (exc.reason or str(exc)).lower()
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the master's certificate is not trusted ({exc.verify_message})"
    if "wrong_version_number" in reason or "record_layer_failure" in reason or "packet_length" in reason:
        return "the master does not speak TLS on this port (a plaintext master?)"
    if "alert" in reason:
        return f"the master refused this agent's certificate ({reason.split('alert_', 1)[-1].replace('_', ' ')})"
    return reason.replace("_", " ")


class Caller:
    """Calls on the remote object `ident` at `address`, safe to share between threads.

    Each call borrows an idle authenticated connection (or dials one), so concurrent
    calls never share a socket; a connection whose call failed is dropped, with every
    idle one (after a master restart they are all dead). `authkey`: bytes, a callable or
    a Keyring, asked at every call: once it names another key, idle connections made
    with the old one are closed and the next call dials with the new one (a rotation
    moves every caller to the new key within a call, without a reconnect failing)."""

    def __init__(self, address: tuple[str, int], authkey, ident: str = "master",
                 reply_timeout: float = REPLY_TIMEOUT, tls: tlsmod.TLS | None = None):
        self.address = tuple(address)
        self.authkey = authkey
        self.tls = tls
        self.ident = ident
        self.reply_timeout = reply_timeout
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def _key(self) -> bytes:
        if isinstance(self.authkey, Keyring):
            return self.authkey.dial_key()
        return self.authkey() if callable(self.authkey) else self.authkey

    def _borrow(self) -> Connection:
        key = self._key()
        key_id = fingerprint(key)
        stale = []
        try:
            with self._lock:
                while self._idle:
                    conn = self._idle.pop()
                    if conn.key_id == key_id:
                        return conn
                    stale.append(conn)
        finally:
            for conn in stale:
                conn.close()
        return dial(self.address, key, self.reply_timeout, self.tls)

    def connect(self) -> None:
        """Dial now (raising as dial does) and keep the connection for the next call."""
        conn = self._borrow()
        with self._lock:
            self._idle.append(conn)

    def call(self, method: str, *args):
        """The remote method's return value; its exception re-raised here (RemoteError
        for an unexpected failure on the master); MasterUnavailable if the link failed."""
        conn = self._borrow()
        try:
            conn.send((self.ident, method, args, {}))
            kind, value = conn.recv()
        except (OSError, EOFError) as exc:
            conn.close()
            self.close()
            raise MasterUnavailable(
                f"lost the master at {format_address(self.address)} during {method}: {describe_error(exc)}"
            ) from None
        with self._lock:
            self._idle.append(conn)
        if kind == "#RETURN":
            return value
        if kind == "#ERROR":
            raise value
        raise RemoteError(f"the master failed during {method}: {value}")

    def close(self) -> None:
        """Close every idle connection (calls under way finish on theirs)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
