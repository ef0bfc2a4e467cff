"""The dashboard through `./invoke dashboard` (an SSH tunnel made with Fabric) in headless
Chromium, while a job runs on the deployed fleet; and the tunnel's plain errors."""

from __future__ import annotations

import re
import signal
import urllib.request

from ops.paths import ROOT
from tests.browser import keep_screenshot, look
from tests.waiting import wait_for

INVOKE = ROOT / "invoke"
TASKS = 600  # x 50 ms on the workers' processes: some seconds, for two looks at the page


def listeners(port: int) -> list:
    """Local addresses of the sockets listening on TCP `port` on this machine (/proc/net)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in list(handle)[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.append(local.rsplit(":", 1)[0])
    return found


def test_the_dashboard_through_invoke_dashboard_while_a_job_runs(fleet, client, background, browser, tmp_path):
    tunnel = background([INVOKE, "dashboard", "--port", "0"])
    first = tunnel.first_line(60)
    match = re.fullmatch(r"dashboard: (http://127\.0\.0\.1:(\d+)/)", first)
    assert match, f"first line of invoke dashboard: {first!r}"
    url, port = match[1], int(match[2])
    assert listeners(port) == ["0100007F"], "the tunnel listens on 127.0.0.1 only"

    workers = sorted(h.name for h in fleet.hosts if "workers" in h.groups)
    browser.get(url)
    wait_for(lambda: sorted(look(browser, 0)["hosts"]) == workers, 30, f"the page to list the workers {workers}",
             interval=0.2)
    job = client.submit("sleep", [(0.05,)] * TASKS)
    before = wait_for(lambda: (lambda seen: seen if seen["done"] else None)(look(browser, job.id)), 30,
                      "the job's progress bar to start", interval=0.2)
    after = wait_for(lambda: (lambda seen: seen if seen["done"] > before["done"] and seen["plot"] != before["plot"]
                              else None)(look(browser, job.id)), 30,
                     "the progress bar to advance and the plot to change", interval=0.2)
    assert sorted(after["hosts"]) == workers
    shot = keep_screenshot(browser, tmp_path, "dashboard-e2e.png")
    print(f"screenshot of the dashboard: {shot}")

    results = job.wait()
    assert sorted(r.index for r in results) == list(range(TASKS)), "every task has exactly one result: none lost"
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]

    assert tunnel.stop(signal.SIGINT) == 0, "Ctrl-C closes the tunnel with exit code 0"
    assert tunnel.lines[-1] == "dashboard: tunnel closed", tunnel.lines
    assert listeners(port) == []


def test_invoke_dashboard_says_plainly_when_nothing_answers(cluster, operator, inventory_copy):
    """An inventory whose metrics address nothing listens on (port 9 of the master's loopback)."""
    inventory = inventory_copy("metrics-nowhere", taskfleet_metrics_listen="127.0.0.1:9")
    proc = operator("dashboard", "--inventory", str(inventory), "--port", "0", check=False)
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert "dashboard: nothing answers at 127.0.0.1:9 on tf-master" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_tunnel_outlives_a_master_restart(first_deploy, master_host, background):
    tunnel = background([INVOKE, "dashboard", "--port", "0"])
    url = tunnel.first_line(60).split()[1] + "metrics"
    assert get(url) == 200
    try:
        master_host.run_expect([0], "systemctl stop taskfleet-master")
        assert get(url) is None, "the master is stopped: nothing answers"
        wait_for(lambda: any("refused a connection" in line and "the tunnel stays open" in line
                             for line in tunnel.lines), 30, "the tunnel to say the master refused")
    finally:
        master_host.run_expect([0], "systemctl start taskfleet-master")
    wait_for(lambda: get(url) == 200, 60, "the dashboard to answer again through the same tunnel", interval=1)
    assert sum("refused a connection" in line for line in tunnel.lines) == 1, "said once per outage"
    assert tunnel.stop(signal.SIGTERM) == 0, "`kill PID` closes the tunnel as cleanly as Ctrl-C"
    assert tunnel.lines[-1] == "dashboard: tunnel closed", tunnel.lines


def get(url: str):
    """The HTTP status of a GET, or None if nothing answered within 5 s."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except OSError:
        return None
