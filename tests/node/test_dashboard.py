"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium.

A master on 127.0.0.1 with three workers reporting three host names (one of them
markup, as a hostile worker could send); while a job runs, the page must list every
host, show the job's progress bar advance and the plot change between two looks, show
failures' text as text, and fetch nothing but its own server. A screenshot is kept in
the test's tmp dir and copied to $TASKFLEET_ARTIFACTS (default .cluster/artifacts/).

`./invoke test` installs chromium and chromium-driver with apt-get when missing (as root);
elsewhere the test is skipped, saying so. Selenium Manager is never used (the driver's
path is given, and the test fails if it runs), so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, wait_for
from test_metrics import metrics_address, start_named_worker

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability", "--disable-breakpad",
    "--no-default-browser-check", "--disable-dev-shm-usage", "--password-store=basic",
    "--proxy-server=127.0.0.1:9",  # anything not on loopback (bypassed implicitly) goes nowhere
    "--window-size=1400,1250", "--force-device-scale-factor=1",
)  # fmt: skip
HOSTS = ("alpha-node", "beta-node", '<b>gamma</b> & "co"')
HOSTILE_ERROR = '<img src=x onerror="window.pwned=1">'


@pytest.fixture
def browser(tmp_path, monkeypatch):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: `./invoke test` installs Debian's chromium and "
                    "chromium-driver when run as root with apt-get")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_manager(*_args, **_kwargs):
        raise AssertionError("Selenium Manager must not run: it would download drivers")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_manager)
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    monkeypatch.setenv("SE_OFFLINE", "true")
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(10)
        yield driver
    finally:
        driver.quit()


def _look(driver, job: int) -> dict:
    """What the page shows now: hosts, the job's progress bar, the plot."""
    return driver.execute_script(
        """
        const job = document.querySelector('#jobs tr[data-job="' + arguments[0] + '"] .bar .done');
        return {
          hosts: [...document.querySelectorAll('#workers tr[data-host] td.host')].map((td) => td.textContent),
          done: job ? parseFloat(job.style.width) : null,
          plot: document.getElementById('plot').innerHTML,
          queued: document.getElementById('t-queued').textContent,
        };
        """, job)


def test_the_dashboard_shows_the_fleet_live(agents, browser, tmp_path):
    from selenium.webdriver.common.by import By

    agents.start_master("--metrics-listen", "127.0.0.1:0")
    for host in HOSTS:
        start_named_worker(agents, host, concurrency=2)
    agents.wait_workers(len(HOSTS))
    base = f"http://{metrics_address(agents)}/"
    with agents.client() as client:
        browser.get(base)
        wait_for(lambda: sorted(_look(browser, 0)["hosts"]) == sorted(HOSTS), 20,
                 f"the page to list the hosts {HOSTS}", interval=0.2)
        job = client.submit("sleep", [(0.1,)] * 360)  # about 6 s on 6 processes
        client.submit("fail", [(HOSTILE_ERROR,)], retries=0)
        first = wait_for(lambda: (lambda look: look if look["done"] else None)(_look(browser, job.id)), 20,
                         "the job's progress bar to start", interval=0.2)
        second = wait_for(lambda: (lambda look: look if look["done"] > first["done"] and look["plot"] != first["plot"]
                                   else None)(_look(browser, job.id)), 20,
                          "the progress bar to advance and the plot to change", interval=0.2)
        assert second["done"] > first["done"] > 0
        wait_for(lambda: HOSTILE_ERROR in browser.find_element(By.ID, "failures").text, 30,
                 "the failure to show", interval=0.2)
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot)), "no screenshot"
    artifacts = Path(os.environ.get("TASKFLEET_ARTIFACTS") or ROOT / ".cluster" / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artifacts / "dashboard.png")
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
        look = wait_for(lambda: (lambda v: v if len(v["hosts"]) == 20 and v["jobs"] else None)(browser.execute_script(
            """return {hosts: [...document.querySelectorAll('#workers tr[data-host]')].map((tr) => tr.dataset.host),
                       jobs: document.querySelectorAll('#jobs tr[data-job]').length,
                       count: document.getElementById('jobs-count').textContent,
                       height: document.documentElement.scrollHeight};""")), 20, "the page to fill", interval=0.2)
        assert sorted(look["hosts"]) == hosts
        assert look["jobs"] == 50 + 10  # the oldest 40 and newest 10 open, and the 10 last finished
        assert look["count"] == "950 open (showing the oldest and newest 50), 1000 kept"  # 50 jobs finished
        assert look["height"] < 1600, look["height"]  # scrollable tables, not a page 1,000 rows long
        shot = tmp_path / "dashboard-crowded.png"
        assert browser.save_screenshot(str(shot))
        artifacts = Path(os.environ.get("TASKFLEET_ARTIFACTS") or ROOT / ".cluster" / "artifacts")
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / "dashboard-crowded.png")
    finally:
        server.stop()
        store.close()
