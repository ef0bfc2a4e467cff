"""TLS around the authkey handshake: mutual TLS 1.3 from a directory of PEM files.

A TLS directory holds `ca.crt` (the fleet's CA), `node.crt` and `node.key` (this
agent's identity) and, on the master, `crl.pem` (the CA's revocation list). An
identity is a certificate whose subject CN names the host (or operator) and whose OU
names its role: master, worker, client or admin.

The promises:
- both sides present a certificate from the same CA; TLS 1.3 only;
- a bad or missing file is one `TLSConfigError` line naming the file;
- the master checks the peer's certificate against the CRL, and `TLS.changed()` says
  when the CRL (or any file) was replaced, so it can re-verify every peer.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from node.config import ConfigError

ROLES = ("master", "worker", "client", "admin")
CA, CERT, KEY, CRL = "ca.crt", "node.crt", "node.key", "crl.pem"


class TLSConfigError(ConfigError):
    """The TLS material is missing or unusable: the message names the file."""


@dataclass(frozen=True)
class Identity:
    """Who the peer is, from its verified certificate."""

    name: str
    role: str

    def __str__(self) -> str:
        return f"{self.role} {self.name}"


def _stamp(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class TLS:
    """The TLS material in `directory`, loaded (and checked) at construction.

    `server` is True on the master: it then requires `crl.pem` and checks peers
    against it."""

    def __init__(self, directory, server: bool = False):
        self.directory = Path(directory)
        self.server = server
        self._files = [self.directory / name for name in (CA, CERT, KEY)] + ([self.directory / CRL] if server else [])
        self._stamps = [_stamp(p) for p in self._files]
        self.context = self._context()

    def _context(self) -> ssl.SSLContext:
        for path in self._files:
            if not path.is_file():
                raise TLSConfigError(f"TLS file {path} is missing")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if self.server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ca, cert, key = (self.directory / n for n in (CA, CERT, KEY))
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(f"TLS file {ca} is not a usable CA certificate ({_reason(exc)})") from None
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(
                f"TLS files {cert} and {key} are not a usable certificate and key pair ({_reason(exc)})") from None
        if self.server:
            crl = self.directory / CRL
            try:
                ctx.load_verify_locations(cafile=str(crl))
            except (ssl.SSLError, OSError) as exc:
                raise TLSConfigError(f"TLS file {crl} is not a usable revocation list ({_reason(exc)})") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        else:
            ctx.check_hostname = True
        return ctx

    def changed(self) -> bool:
        """Whether a file was replaced since the last call; if so the context is rebuilt
        from the new files (a broken replacement keeps the old context and raises)."""
        stamps = [_stamp(p) for p in self._files]
        if stamps == self._stamps:
            return False
        self.context = self._context()
        self._stamps = stamps
        return True

    def wrap_server(self, sock: socket.socket) -> ssl.SSLSocket:
        """The server side; the caller runs `do_handshake()` under its own deadline."""
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    def wrap_client(self, sock: socket.socket, server_hostname: str) -> ssl.SSLSocket:
        return self.context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)


def identity(sock: ssl.SSLSocket) -> Identity:
    """The verified peer's name and role. Raises PermissionError for a certificate
    without a known role (the CA only issues ones with a role)."""
    cert = sock.getpeercert() or {}
    fields = {k: v for rdn in cert.get("subject", ()) for k, v in rdn}
    name, role = fields.get("commonName", ""), fields.get("organizationalUnitName", "")
    if role not in ROLES or not name:
        raise PermissionError(f"certificate {name or '(no name)'} has no taskfleet role")
    return Identity(name, role)


def _reason(exc: BaseException) -> str:
    """OpenSSL's reason in words: "[SSL] PEM lib (_ssl.c:3926)" -> "pem lib"."""
    text = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    text = re.sub(r"^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$", "", text)
    return text.replace("_", " ").lower() if isinstance(exc, ssl.SSLError) else text

