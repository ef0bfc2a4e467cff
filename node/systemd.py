"""systemd's notify protocol (sd_notify), standard library only.

Under `Type=notify` the agents say READY=1 once they serve, STOPPING=1 when they stop,
and WATCHDOG=1 from their main loop while they are healthy: with `WatchdogSec=` set,
systemd restarts an agent that stops pinging (a wedged thread, a deadlock). Outside
systemd ($NOTIFY_SOCKET unset) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send 'KEY=VALUE' lines to systemd; False if not under systemd or the send failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not states:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall("\n".join(states).encode())
        return True
    except OSError:
        return False


def watchdog_period() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
