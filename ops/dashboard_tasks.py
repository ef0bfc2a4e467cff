"""`invoke dashboard`: the master's dashboard on this machine, through an SSH tunnel (Fabric).

The tunnel listens on 127.0.0.1 only and leads, over the SSH connection Ansible would use,
to the master's metrics address from the inventory (`taskfleet_metrics_listen`, the
master's loopback by default): no port is opened to the network for it.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading

from invoke import task
from invoke.exceptions import Exit

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


def _listen(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:`port` (0: a free one), or a one-line error."""
    if not 0 <= port < 65536:
        raise Exit(f"dashboard: bad --port {port}: expected 0 (any free port) to 65535", code=2)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise Exit(f"dashboard: port {port} on 127.0.0.1 is taken ({exc.strerror}): "
                   "choose another with --port (0: any free one)", code=2) from None
    sock.listen(16)
    return sock


def _why(exc: BaseException) -> str:
    """paramiko's refusal as the server said it ('Connect failed'), other errors as they are."""
    return getattr(exc, "text", None) or str(exc) or type(exc).__name__


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def _pipe(src, dst) -> None:
    """Copy bytes from `src` to `dst` until either end closes; then close both."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for end in (src, dst):
            try:
                end.close()
            except OSError:
                pass


def _forward(conn, listener: socket.socket, remote: tuple[str, int]) -> None:
    """Forward every connection accepted on `listener` over its own SSH channel (Fabric's
    connection, paramiko's direct-tcpip) to `remote`, until interrupted. A connection the
    far end refuses (the master restarting, say) is closed alone: the tunnel stays."""
    listener.settimeout(0.5)
    refusing = False
    while True:
        if not conn.is_connected:
            raise Exit("dashboard: the SSH connection to the master was lost", code=3)
        try:
            local, peer = listener.accept()
        except socket.timeout:
            continue
        try:
            channel = conn.transport.open_channel("direct-tcpip", remote, peer, timeout=CHECK_SECONDS)
        except Exception as exc:
            local.close()
            if not refusing:  # said once per outage, not at every poll of the page
                print(f"dashboard: {format_address(remote)} refused a connection ({_why(exc)}); "
                      "the tunnel stays open", file=sys.stderr, flush=True)
            refusing = True
            continue
        if refusing:
            print(f"dashboard: {format_address(remote)} answers again", file=sys.stderr, flush=True)
        refusing = False
        for src, dst in ((local, channel), (channel, local)):
            threading.Thread(target=_pipe, args=(src, dst), daemon=True).start()


@task(help={"inventory": INVENTORY_HELP,
            "port": f"local port on 127.0.0.1 (default {DEFAULT_PORT}; 0: any free port)"})
def dashboard(c, inventory="inventory/local", port=DEFAULT_PORT):
    """Open the master's dashboard here through an SSH tunnel; Ctrl-C closes it."""
    fleet = inv.load(inventory)
    remote = _remote(fleet)
    listener = _listen(int(port))
    local_port = listener.getsockname()[1]
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
            _forward(conn, listener, remote)
        except KeyboardInterrupt:
            pass
        print("dashboard: tunnel closed", flush=True)
    finally:
        listener.close()
        conn.close()
