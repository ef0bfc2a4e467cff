"""Small pieces of configuration shared by every agent: addresses, the authkey, durations,
sizes, the state directory, logging.

Every parser here raises ConfigError with a one-line message that quotes the bad value and
says what is expected; the command line adds which flag and environment variable it was.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
import tempfile
from fractions import Fraction

DEFAULT_PORT = 5000
DEFAULT_METRICS_PORT = 9464  # Prometheus' registry of default ports: free for an exporter like this one
DEFAULT_MAX_PAYLOAD = 1024 * 1024  # bytes of one task's pickled arguments (or result)


class ConfigError(Exception):
    """A problem the operator must fix (bad flag, unreadable key): exit code 2, no restart loop."""


def parse_address(text: str, default_host: str = "", default_port: int = DEFAULT_PORT,
                  any_port: bool = False) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or 'HOST' -> (host, port); IPv6 as '[::1]:5000'. With
    `any_port`, port 0 (any free one) is allowed too."""
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
    lowest = 0 if any_port else 1
    if not port:
        port_number = default_port
    elif port.isdigit() and lowest <= int(port) < 65536:
        port_number = int(port)
    else:
        raise ConfigError(f"bad port in address {text!r}: expected a number from {lowest} to 65535")
    return (host or default_host, port_number)


def parse_metrics_listen(text: str) -> tuple[str, int] | None:
    """Where the master serves /metrics and its dashboard: 'off' -> None; 'HOST:PORT',
    ':PORT' (loopback) or 'HOST' (port 9464); port 0 picks a free port."""
    if text.strip().lower() in ("", "off"):
        return None
    return parse_address(text, default_host="127.0.0.1", default_port=DEFAULT_METRICS_PORT, any_port=True)


def format_address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_authkey(path: str | None) -> bytes:
    """The key this agent dials with: the first of the file's keyring (see read_keyring)."""
    return read_keyring(path)[0]


def read_keyring(path: str | None) -> list[bytes]:
    """The file's keys, one per line, the one to dial with first (a master accepts any).
    Each key is its line less trailing whitespace; blank lines are skipped. Refused when
    others may read it."""
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
    keys = [line.rstrip() for line in data.splitlines() if line.strip()]
    if not keys:
        raise ConfigError(f"authkey file {path} is empty")
    return keys


DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_RULES = "seconds, or a number with s, m, h or d: 10, 1.5, 90s, 5m, 2h, 7d"
SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
}
SIZE_RULES = ("bytes, or a number with KiB, MiB, GiB (powers of 1024; K, M, G too, as in systemd) "
              "or KB, MB, GB (powers of 1000): 1048576, 512KiB, 1MiB, 1MB")
_NUMBER_AND_UNIT = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*([a-zA-Z]*)\s*")


def _number_and_unit(text: str, units: dict) -> Fraction | None:
    """'1.5MiB' -> 1.5 * units['mib'] exactly; None if the text is not NUMBER[UNIT]."""
    match = _NUMBER_AND_UNIT.fullmatch(text)
    if not match or match.group(2).lower() not in units:
        return None
    return Fraction(match.group(1)) * units[match.group(2).lower()]


def parse_duration(text: str, allow_zero: bool = False) -> float:
    """A duration in seconds: '10', '1.5', '10s', '5m', '2h', '7d' (units are case-insensitive).

    Above 0, or 0 and above when `allow_zero`; ConfigError otherwise.
    """
    value = _number_and_unit(text, DURATION_UNITS)
    if value is None or value < 0 or (value == 0 and not allow_zero):
        bound = "of 0 or more" if allow_zero else "above 0"
        raise ConfigError(f"{text!r} is not a duration {bound} ({DURATION_RULES})")
    return float(value)


def parse_size(text: str) -> int:
    """A size in bytes, above 0: '1048576', '512KiB', '1MiB' (2**20), '1M' (2**20, as
    systemd reads it), '1MB' (10**6), '1.5MiB'; units are case-insensitive. The result must
    be whole bytes. ConfigError otherwise."""
    value = _number_and_unit(text, SIZE_UNITS)
    if value is None or value <= 0 or value.denominator != 1:
        raise ConfigError(f"{text!r} is not a size above 0 ({SIZE_RULES})")
    return int(value)


def parse_count(text: str, minimum: int = 1) -> int:
    """A whole number >= minimum ('4'); ConfigError otherwise."""
    text = text.strip()
    if not re.fullmatch(r"[+-]?\d+", text) or int(text) < minimum:
        raise ConfigError(f"{text!r} is not a whole number of {minimum} or more")
    return int(text)


def parse_choice(text: str, choices: tuple[str, ...]) -> str:
    """One of `choices`, compared case-insensitively; returned as spelled in `choices`."""
    for choice in choices:
        if text.strip().lower() == choice.lower():
            return choice
    raise ConfigError(f"{text!r} is not one of {', '.join(choices)}")


def check_state_dir(path: str) -> None:
    """Make sure `path` is a directory this process can create files in (made if missing).

    ConfigError "state dir X is not a directory" or "cannot use state dir X: REASON".
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"state dir {path} is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot use state dir {path}: {exc.strerror or exc}") from None


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def describe_error(exc: BaseException) -> str:
    """An exception as an operator reads it (EOFError and friends have no message)."""
    return str(exc) or type(exc).__name__
