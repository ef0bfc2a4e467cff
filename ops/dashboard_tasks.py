"""`invoke dashboard`: the master's dashboard on this machine, through an SSH tunnel (Fabric).

The tunnel listens on 127.0.0.1 only and leads, over the SSH connection Ansible would use,
to the master's metrics address from the inventory (`taskfleet_metrics_listen`, the
master's loopback by default): no port is opened to the network for it.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import sys
import threading
import time

from fabric.tunnels import TunnelManager
from invoke import task
from invoke.exceptions import Exit, ThreadException
from paramiko.ssh_exception import ChannelException

from node.config import ConfigError, format_address, parse_metrics_listen
from ops import inventory as inv
from ops.fleet import INVENTORY_HELP, connect

DEFAULT_PORT = 9464
CHECK_SECONDS = 10  # for the first connection to the master's metrics address


def _remote(fleet: inv.Fleet) -> tuple[str, int]:
    """The master's metrics address as seen from the master itself."""
    text = fleet.metrics_listen
    where = f"taskfleet_metrics_listen in {fleet.inventory}"
    if "{{" in text:
        raise Exit(f"dashboard: {where} is a template ({text!r}): write the address itself, HOST:PORT", code=2)
    try:
        address = parse_metrics_listen(text)
    except ConfigError as exc:
        raise Exit(f"dashboard: {where}: {exc}", code=2) from None
    if address is None:
        raise Exit(f"dashboard: {where} is off: the master serves no dashboard", code=2)
    host, port = address
    return ("127.0.0.1" if host in ("", "0.0.0.0", "::") else host), port


def _local_port(port: int) -> int:
    """`port` on 127.0.0.1 if it is free (0: a free one), checked by binding it as Fabric will."""
    if not 0 <= port < 65536:
        raise Exit(f"dashboard: bad --port {port}: expected 0 (any free port) to 65535", code=2)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise Exit(f"dashboard: port {port} on 127.0.0.1 is taken ({exc.strerror}): "
                       "choose another with --port (0: any free one)", code=2) from None
        return sock.getsockname()[1]


def _why(exc: BaseException) -> str:
    """paramiko's refusal as the server said it ('Connect failed'), other errors as they are."""
    return getattr(exc, "text", None) or str(exc) or type(exc).__name__


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def _tunnel(conn, local_port: int, remote: tuple[str, int]) -> str | None:
    """Forward 127.0.0.1:local_port to `remote` until interrupted (None) or until Fabric's
    tunnel thread ends because the far end refused a connection (why, as a string)."""
    before, stopped = set(threading.enumerate()), False
    try:
        with conn.forward_local(local_port, remote_port=remote[1], remote_host=remote[0], local_host="127.0.0.1"):
            manager = next(t for t in threading.enumerate() if t not in before and isinstance(t, TunnelManager))
            try:
                while manager.is_alive():
                    if not conn.is_connected:
                        raise Exit("dashboard: the SSH connection to the master was lost", code=3)
                    time.sleep(0.5)
            except KeyboardInterrupt:
                stopped = True
    except ThreadException as exc:
        if stopped:  # connections cut by the stop itself
            return None
        if not conn.is_connected:
            raise Exit("dashboard: the SSH connection to the master was lost", code=3) from None
        error = exc.exceptions[0].value
        if not all(isinstance(wrapper.value, ChannelException) for wrapper in exc.exceptions):
            raise Exit(f"dashboard: the tunnel failed: {error!r}", code=1) from None
        return f"{format_address(remote)} refused a connection ({_why(error)})"
    return None


def _forward(conn, local_port: int, remote: tuple[str, int]) -> None:
    """Forward until interrupted. Fabric's tunnel thread ends when the far end refuses one
    connection (the master restarting, say): the tunnel is then opened again, same port."""
    while (why := _tunnel(conn, local_port, remote)) is not None:
        print(f"dashboard: {why}; reopening the tunnel", file=sys.stderr, flush=True)
        gc.collect()  # the ended thread's listening socket is held in its traceback until collected
        time.sleep(1)


@task(help={"inventory": INVENTORY_HELP,
            "port": f"local port on 127.0.0.1 (default {DEFAULT_PORT}; 0: any free port)"})
def dashboard(c, inventory="inventory/local", port=DEFAULT_PORT):
    """Open the master's dashboard here through an SSH tunnel; Ctrl-C closes it."""
    fleet = inv.load(inventory)
    remote = _remote(fleet)
    local_port = _local_port(int(port))
    master = fleet.hosts[0]
    logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)  # a refused channel: said below, once
    conn = connect(master)
    try:
        try:
            conn.open()
        except Exception as exc:  # refused, timed out, no route, key refused: paramiko's and socket's errors
            raise Exit(f"dashboard: cannot reach the master {master.name} ({master.address}) over SSH: {_why(exc)}",
                       code=3) from None
        try:  # one connection to the far end first, so that a stopped master is said plainly
            conn.transport.open_channel("direct-tcpip", remote, ("127.0.0.1", 0), timeout=CHECK_SECONDS).close()
        except Exception as exc:
            raise Exit(f"dashboard: nothing answers at {format_address(remote)} on {master.name} ({_why(exc)}): "
                       "is the master deployed and running, its metrics on?", code=3) from None
        print(f"dashboard: http://127.0.0.1:{local_port}/", flush=True)
        print(f"(an SSH tunnel to {format_address(remote)} on {master.name}; Ctrl-C closes it)", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` closes it as cleanly as Ctrl-C
        try:
            _forward(conn, local_port, remote)
        except KeyboardInterrupt:  # between two openings of the tunnel
            pass
        print("dashboard: tunnel closed", flush=True)
    finally:
        conn.close()
