"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium.

A master on 127.0.0.1 with three workers reporting three host names (one of them
markup, as a hostile worker could send); while a job runs, the page must list every
host, show the job's progress bar advance and the plot change between two looks, show
failures' text as text, and fetch nothing but its own server. A screenshot is kept in
the test's tmp dir and copied to $TASKFLEET_ARTIFACTS (default .cluster/artifacts/).

The browser (tests/browser.py) is skipped, saying why, where chromium or chromedriver
are missing: `./invoke test` installs them with apt-get as root.
"""

from __future__ import annotations

from conftest import wait_for
from test_metrics import metrics_address, start_named_worker

from tests.browser import keep_screenshot, look

HOSTS = ("alpha-node", "beta-node", '<b>gamma</b> & "co"')
HOSTILE_ERROR = '<img src=x onerror="window.pwned=1">'


def test_the_dashboard_shows_the_fleet_live(agents, browser, tmp_path):
    from selenium.webdriver.common.by import By

    agents.start_master("--metrics-listen", "127.0.0.1:0")
    for host in HOSTS:
        start_named_worker(agents, host, concurrency=2)
    agents.wait_workers(len(HOSTS))
    base = f"http://{metrics_address(agents)}/"
    with agents.client() as client:
        browser.get(base)
        wait_for(lambda: sorted(look(browser, 0)["hosts"]) == sorted(HOSTS), 20,
                 f"the page to list the hosts {HOSTS}", interval=0.2)
        job = client.submit("sleep", [(0.1,)] * 360)  # about 6 s on 6 processes
        client.submit("fail", [(HOSTILE_ERROR,)], retries=0)
        first = wait_for(lambda: (lambda seen: seen if seen["done"] else None)(look(browser, job.id)), 20,
                         "the job's progress bar to start", interval=0.2)
        second = wait_for(lambda: (lambda seen: seen if seen["done"] > first["done"] and seen["plot"] != first["plot"]
                                   else None)(look(browser, job.id)), 20,
                          "the progress bar to advance and the plot to change", interval=0.2)
        assert second["done"] > first["done"] > 0
        wait_for(lambda: HOSTILE_ERROR in browser.find_element(By.ID, "failures").text, 30,
                 "the failure to show", interval=0.2)
    shot = keep_screenshot(browser, tmp_path, "dashboard.png")
    assert shot.stat().st_size > 10_000

    # Text from workers is shown as text: the markup host and error are literal, inert.
    assert f"RuntimeError: {HOSTILE_ERROR}" in browser.find_element(By.ID, "failures").text
    assert browser.find_elements(By.CSS_SELECTOR, "#workers b, #failures img, #jobs img") == []
    assert browser.execute_script("return window.pwned === undefined")
    # Nothing fetched from anywhere but the master's endpoint; no console errors (CSP violations included).
    resources = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert resources and all(url.startswith(base) for url in resources), resources
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], severe


def test_the_dashboard_stays_readable_with_20_hosts_and_1000_jobs(browser, tmp_path):
    """An in-process master (no worker processes: 20 workers say hello, one of them
    reports) with 1,000 open jobs: every host is listed, the jobs table shows the oldest
    and newest 50 and says how many are open, and the page stays a screen or two high."""
    import pickle

    from node import PROTOCOL
    from node.master import Master
    from node.metrics import MetricsServer
    from node.scheduler import Scheduler
    from node.store import Store
    from node.tasks import Registry

    store = Store(tmp_path / "state", durability="fast")
    master = Master(store, Scheduler(store), Registry())
    server = MetricsServer(master, ("127.0.0.1", 0))
    server.start()
    try:
        hosts = [f"tf-worker{i:02d}.example.internal" for i in range(1, 21)]
        for i, host in enumerate(hosts):
            master.hello(f"w{i}", host, 1000 + i, 8, protocol=PROTOCOL)
        for j in range(1000):
            master.submit(f"job-{j}", "square", [[n] for n in range(10)], 0, 10, retries=0)
        for step in range(5):  # some progress, one report a "second", and a sample of the history each time
            rows = master.lease(f"w{step}", 120)
            master.complete(f"w{step}", hosts[step], [(t, True, pickle.dumps(1), None, 0.01) if t % 7 else
                                                      (t, False, None, f"ValueError: bad input {t}", 0.02)
                                                      for t, *_ in rows[:100]])
            master.telemetry.sample(master)
        browser.get(f"http://127.0.0.1:{server.address[1]}/")
        page = wait_for(lambda: (lambda v: v if len(v["hosts"]) == 20 and v["jobs"] else None)(browser.execute_script(
            """return {hosts: [...document.querySelectorAll('#workers tr[data-host]')].map((tr) => tr.dataset.host),
                       jobs: document.querySelectorAll('#jobs tr[data-job]').length,
                       count: document.getElementById('jobs-count').textContent,
                       height: document.documentElement.scrollHeight};""")), 20, "the page to fill", interval=0.2)
        assert sorted(page["hosts"]) == hosts
        assert page["jobs"] == 50 + 10  # the oldest 40 and newest 10 open, and the 10 last finished
        assert page["count"] == "950 open (showing the oldest and newest 50), 1000 kept"  # 50 jobs finished
        assert page["height"] < 1600, page["height"]  # scrollable tables, not a page 1,000 rows long
        keep_screenshot(browser, tmp_path, "dashboard-crowded.png")
    finally:
        server.stop()
        store.close()
