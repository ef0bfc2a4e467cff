"""The fleet's certificate authority, on the controller: one per inventory.

Layout of the CA directory (inventory/NAME/secrets/tls/, git-ignored, 0700):

    ca.key  ca.crt  crl.pem        the CA (key 0600: it never leaves the controller)
    issued/NAME.crt  NAME.key      one identity per host or operator (key 0600)

An identity's subject is CN=NAME, OU=ROLE (master, worker, client, admin: the master
authorizes calls by it); its SANs are the host's names and addresses. Certificates
live `days` (90 by default) and `issue` renews one that nears expiry or whose role or
names changed; otherwise it leaves it alone, so deploys stay idempotent. `revoke`
adds an identity's serial to the CRL and deletes its files, so the next `issue`
makes a new one.

Also a command for playbooks (delegated to the controller), so plain ansible-playbook
works: `python ops/pki.py issue DIR NAME ROLE [--san X ...] [--bundle DEST]` prints
`changed` or `ok` (it creates the CA on first use).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROLES = ("master", "worker", "client", "admin")
CA_DAYS = 3650
CERT_DAYS = 90
RENEW_BEFORE_DAYS = 30
PRIVATE = 0o600


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` atomically, created with `mode` from the start (no window where a
    key is readable by others)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


@dataclass(frozen=True)
class Issued:
    name: str
    role: str
    serial: int
    not_after: dt.datetime
    sans: tuple[str, ...]
    revoked: bool

    @property
    def days_left(self) -> float:
        return (self.not_after - _now()).total_seconds() / 86400


class CA:
    """The CA in `directory`; `CA.create(directory)` makes one if there is none."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), None)
        self.cert = x509.load_pem_x509_certificate((self.dir / "ca.crt").read_bytes())

    @classmethod
    def create(cls, directory, name: str = "taskfleet") -> CA:
        """The CA in `directory`, created (key, certificate, empty CRL) when absent."""
        d = Path(directory)
        if not (d / "ca.key").exists():
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)
            key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
            cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(_now() - dt.timedelta(minutes=5))
                    .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                   critical=True)
                    .sign(key, hashes.SHA256()))
            _write(d / "ca.key", _key_pem(key), PRIVATE)
            _write(d / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(d)
        if not (d / "crl.pem").exists():
            ca._write_crl([])
        return ca

    # -- the revocation list ----------------------------------------------------------

    def revoked_serials(self) -> set[int]:
        crl = x509.load_pem_x509_crl((self.dir / "crl.pem").read_bytes())
        return {entry.serial_number for entry in crl}

    def _write_crl(self, serials) -> None:
        # The CRL lives as long as the CA: an expired CRL would lock every peer out.
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(_now() - dt.timedelta(minutes=5))
                   .next_update(self.cert.not_valid_after_utc))
        for serial in sorted(serials):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_now()).build())
        crl = builder.sign(self.key, hashes.SHA256())
        _write(self.dir / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))

    # -- identities -------------------------------------------------------------------

    def _paths(self, name: str) -> tuple[Path, Path]:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad identity name {name!r}")
        return self.dir / "issued" / f"{name}.crt", self.dir / "issued" / f"{name}.key"

    def read(self, name: str) -> Issued | None:
        cert_path, _ = self._paths(name)
        if not cert_path.exists():
            return None
        return self._describe(x509.load_pem_x509_certificate(cert_path.read_bytes()), self.revoked_serials())

    def _describe(self, cert: x509.Certificate, revoked: set[int]) -> Issued:
        subject = cert.subject
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = tuple(str(n.value) for n in sans)
        except x509.ExtensionNotFound:
            names = ()
        return Issued(
            name=subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
            role=subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value,
            serial=cert.serial_number, not_after=cert.not_valid_after_utc, sans=names,
            revoked=cert.serial_number in revoked)

    def issue(self, name: str, role: str, sans=(), days: int = CERT_DAYS,
              renew_before: float = RENEW_BEFORE_DAYS) -> bool:
        """Make sure `name` has a valid certificate for `role` and `sans`; True if one was
        (re)issued, False if the current one was kept."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
        sans = tuple(dict.fromkeys(s for s in sans if s))
        current = self.read(name)
        if (current is not None and not current.revoked and current.role == role
                and set(current.sans) == {str(_san(s).value) for s in sans}
                and current.days_left > renew_before):
            return False
        cert_path, key_path = self._paths(name)
        cert_path.parent.mkdir(mode=0o700, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(_now() - dt.timedelta(minutes=5))
                   .not_valid_after(_now() + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                         x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        _write(key_path, _key_pem(key), PRIVATE)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return True

    def revoke(self, name: str) -> bool:
        """Revoke `name`'s certificate and delete its files; False if it has none."""
        current = self.read(name)
        if current is None:
            return False
        self._write_crl(self.revoked_serials() | {current.serial})
        for path in self._paths(name):
            path.unlink(missing_ok=True)
        return True

    def bundle(self, name: str, dest) -> bool:
        """Write `name`'s TLS directory for an agent or a client (node/tls.py: ca.crt,
        node.crt, node.key) into `dest`, 0700; True if anything in it changed."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(dest, 0o700)
        cert_path, key_path = self._paths(name)
        changed = False
        for src, target, mode in ((self.dir / "ca.crt", "ca.crt", 0o644), (cert_path, "node.crt", 0o644),
                                  (key_path, "node.key", PRIVATE)):
            data = src.read_bytes()
            if not (dest / target).exists() or (dest / target).read_bytes() != data:
                _write(dest / target, data, mode)
                changed = True
        return changed

    def issued(self) -> list[Issued]:
        revoked = self.revoked_serials()
        return [self._describe(x509.load_pem_x509_certificate(p.read_bytes()), revoked)
                for p in sorted((self.dir / "issued").glob("*.crt"))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pki.py", description="The fleet's CA on the controller.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("issue", help="(re)issue an identity if needed; prints changed or ok")
    p.add_argument("dir")
    p.add_argument("name")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--san", action="append", default=[])
    p.add_argument("--days", type=int, default=CERT_DAYS)
    p.add_argument("--renew-before", type=float, default=RENEW_BEFORE_DAYS)
    p.add_argument("--bundle", metavar="DEST", help="also write the identity's TLS directory here (0700)")
    p = sub.add_parser("issue-hosts", help="(re)issue the identities listed on stdin as JSON "
                       '[{"name": ..., "role": ..., "sans": [...]}, ...] where needed; prints changed or ok')
    p.add_argument("dir")
    p.add_argument("--days", type=int, default=CERT_DAYS)
    p.add_argument("--renew-before", type=float, default=RENEW_BEFORE_DAYS)
    p = sub.add_parser("revoke", help="revoke identities (their serials go into crl.pem); prints changed or ok")
    p.add_argument("dir")
    p.add_argument("names", nargs="+", metavar="NAME")
    args = parser.parse_args(argv)
    ca = CA.create(args.dir)
    if args.command == "revoke":
        revoked = [name for name in args.names if ca.revoke(name)]
        print("changed" if revoked else "ok")
        return 0
    if args.command == "issue-hosts":
        hosts = json.load(sys.stdin)
        issued = [h["name"] for h in hosts if ca.issue(h["name"], h["role"], h["sans"], args.days, args.renew_before)]
        print("changed" if issued else "ok")
        return 0
    changed = ca.issue(args.name, args.role, args.san, args.days, args.renew_before)
    if args.bundle:
        changed = ca.bundle(args.name, args.bundle) or changed
    print("changed" if changed else "ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
