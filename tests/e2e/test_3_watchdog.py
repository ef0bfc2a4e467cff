"""systemd's watchdog restarts a wedged agent: a worker whose main process is frozen
(SIGSTOP) stops pinging, systemd kills and restarts it, and the new one rejoins the master.

The test shortens WatchdogSec with a runtime drop-in (gone at reboot as well) and removes
it afterwards, restarting the worker so that it runs with the deployed unit again.
"""

from __future__ import annotations


import pytest

from functools import partial

from tests import waiting

wait_for = partial(waiting.wait_for, interval=0.5)  # each look is an SSH round trip

UNIT = "taskfleet-worker"
DROP_IN_DIR = f"/run/systemd/system/{UNIT}.service.d"
DROP_IN = f"{DROP_IN_DIR}/50-e2e-watchdog.conf"
WATCHDOG_SEC = 4
RESTART_SEC = 5  # taskfleet_restart_sec
MARGIN = 30  # killing the frozen process, starting Python, READY=1


def show(h) -> dict:
    out = h.check_output(f"systemctl show {UNIT} -p MainPID -p NRestarts -p ActiveState -p SubState -p WatchdogUSec")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def running(h) -> dict | None:
    """The unit's properties once it runs a main process, else None."""
    props = show(h)
    return props if (props["ActiveState"], props["SubState"]) == ("active", "running") and props["MainPID"] != "0" \
        else None


def joined(client, hostname: str, pid: int) -> bool:
    return any(w["alive"] and w["host"] == hostname and w["pid"] == pid for w in client.status()["workers"])


@pytest.fixture
def short_watchdog(cluster, worker_hosts):
    """A worker host whose unit has WatchdogSec=4 until the test ends (then as deployed)."""
    node = next(n for n in cluster if n.group == "workers")
    h = next(w for w in worker_hosts if w.backend.host == node.hostname)
    h.check_output(f"mkdir -p {DROP_IN_DIR} && printf '[Service]\\nWatchdogSec={WATCHDOG_SEC}\\n' > {DROP_IN}")
    try:
        h.check_output(f"systemctl daemon-reload && systemctl restart {UNIT}")  # the agent reads WATCHDOG_USEC at start
        yield node, h
    finally:
        h.run(f"rm -f {DROP_IN} && rmdir --ignore-fail-on-non-empty {DROP_IN_DIR}")
        h.run(f"systemctl daemon-reload && systemctl reset-failed {UNIT}; systemctl restart {UNIT}")
        wait_for(lambda: running(h), 60, f"{UNIT} to run as deployed again")


def test_a_frozen_worker_is_restarted_by_the_watchdog_and_rejoins(short_watchdog, client):
    node, h = short_watchdog
    before = wait_for(lambda: running(h), 60, f"{UNIT} to run with the short watchdog")
    assert before["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
    frozen = int(before["MainPID"])
    wait_for(lambda: joined(client, node.hostname, frozen), 60, f"the worker on {node.hostname} to join")
    since = h.check_output("date +%s")

    def restarted():
        props = running(h)
        if props and int(props["MainPID"]) != frozen and int(props["NRestarts"]) > int(before["NRestarts"]):
            return props
        return None

    h.check_output(f"kill -STOP {frozen}")
    after = wait_for(restarted, WATCHDOG_SEC + RESTART_SEC + MARGIN, f"systemd to restart the frozen pid {frozen}")

    journal = h.check_output(f"journalctl -u {UNIT} --since @{since} --no-pager -o cat")
    assert "Watchdog timeout" in journal, journal[-3000:]
    assert not h.run(f"test -d /proc/{frozen}").succeeded, "the frozen process is gone"
    new = int(after["MainPID"])
    wait_for(lambda: joined(client, node.hostname, new), 60, f"the restarted worker (pid {new}) to rejoin")
    results = client.submit("square", [(n,) for n in range(20)]).wait()
    assert [r.value for r in results] == [n * n for n in range(20)]
