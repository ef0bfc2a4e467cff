"""Small pieces of configuration shared by every agent: addresses, the authkey, logging."""

from __future__ import annotations

import logging
import os
import stat
import sys

DEFAULT_PORT = 5000
DEFAULT_MAX_PAYLOAD = 1024 * 1024  # bytes of one task's pickled arguments (or result)


class ConfigError(Exception):
    """A problem the operator must fix (bad flag, unreadable key): exit code 2, no restart loop."""


def parse_address(text: str, default_host: str = "") -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'HOST' -> (host, port); IPv6 as '[::1]:5000'."""
    text = text.strip()
    if not text:
        raise ConfigError("empty address: expected HOST:PORT")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        raise ConfigError(f"bad address {text!r}: write IPv6 addresses as [ADDR]:PORT")
    else:
        host, port = text, ""
    if not port:
        port_number = DEFAULT_PORT
    elif port.isdigit() and 0 < int(port) < 65536:
        port_number = int(port)
    else:
        raise ConfigError(f"bad port in address {text!r}: expected a number from 1 to 65535")
    return (host or default_host, port_number)


def format_address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_authkey(path: str | None) -> bytes:
    """The file's bytes less trailing whitespace. Refused when others may read it."""
    if not path:
        raise ConfigError("no authkey file: pass --authkey-file PATH or set TASKFLEET_AUTHKEY_FILE")
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read authkey file {path}: {exc.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            f"authkey file {path} is accessible by others (mode {stat.S_IMODE(mode):04o}); "
            f"the key is as strong as root on the fleet: run chmod 600 {path} (or 640 with a trusted group)"
        )
    key = data.rstrip()
    if not key:
        raise ConfigError(f"authkey file {path} is empty")
    return key


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def describe_error(exc: BaseException) -> str:
    """An exception as an operator reads it (EOFError and friends have no message)."""
    return str(exc) or type(exc).__name__
