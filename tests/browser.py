"""The dashboard in a real browser, for every tier: Debian's headless Chromium driven by
Selenium, and what the tests read from the page.

`browser` is a pytest fixture (import it into a conftest or test module). It skips, saying
why, where chromium or chromedriver are missing (`./invoke test` installs them as root).
Selenium Manager is never used (the driver's path is given, and the test fails if it
runs), so nothing is downloaded; a proxy that goes nowhere keeps the page from fetching
anything but loopback.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """A headless Chromium (Selenium WebDriver), quit after the test."""
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


def look(driver, job: int) -> dict:
    """What the dashboard shows now: worker hosts, job `job`'s progress bar (percent done,
    None if not listed), the plot, the queued count."""
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


def keep_screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Save the page as tmp_path/NAME and copy it to $TASKFLEET_ARTIFACTS (default
    .cluster/artifacts/); returns the kept copy."""
    shot = tmp_path / name
    assert driver.save_screenshot(str(shot)), "no screenshot"
    artifacts = Path(os.environ.get("TASKFLEET_ARTIFACTS") or ROOT / ".cluster" / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(shot, artifacts / name))
