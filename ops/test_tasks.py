"""`invoke test`: the whole suite, end-to-end tier included."""

from __future__ import annotations

import shlex

from invoke import task
from invoke.exceptions import Exit

from ops import apt, localcluster
from ops.paths import ROOT

# The dashboard's tests drive the page in a real browser: Debian's headless Chromium and its
# driver; the end-to-end tier scrapes the master with Debian's Prometheus (run by the test
# itself: its package's service is not used) and captures the cluster's bridge (tcpdump).
CONTROLLER_PACKAGES = ("chromium", "chromium-driver", "prometheus", "tcpdump")
# The fleet checks run at --scale: spread over every worker and suite, a second deploy changes
# nothing, a worker host killed mid-job loses nothing.
SCALE_TESTS = ("tests/e2e/test_2_fleet.py", "tests/e2e/test_6_suites.py")


@task(help={
    "e2e": "include the end-to-end tier on the local Vagrant cluster (default; --no-e2e skips it)",
    "keep_cluster": "leave a cluster that this run brought up running afterwards",
    "pytest_args": "extra pytest arguments, e.g. \"-k authkey -x\"",
    "scale": "opt-in large fleet: only the fleet checks of the end-to-end tier, on a local cluster of "
             "this many hosts (e.g. 20: the master and 19 workers)",
})
def test(c, e2e=True, keep_cluster=False, pytest_args="", scale=0):
    """Run the tests: unit, integration, and end-to-end on the local cluster (needs root)."""
    env = {"PYTHONUNBUFFERED": "1"}
    if scale:
        if not 2 <= int(scale) <= localcluster.MAX_WORKERS + 1:
            raise Exit(f"test: --scale {scale}: want 2..{localcluster.MAX_WORKERS + 1} hosts", code=2)
        env["TASKFLEET_WORKERS"] = str(int(scale) - 1)
        pytest_args = f"-m e2e {' '.join(SCALE_TESTS)} {pytest_args}"
    if apt.can_install():
        apt.ensure(CONTROLLER_PACKAGES, "test")
    elif missing := apt.missing(CONTROLLER_PACKAGES):
        print(f"==> not root or no apt-get: {', '.join(missing)} cannot be installed; the tests that need "
              "them (the dashboard in a browser, Prometheus, the bridge capture) will be skipped", flush=True)
    was_up = localcluster.recorded() is not None
    marker = [] if e2e else ["-m", "not e2e"]
    command = ["pytest", "-p", "no:cacheprovider", "-rs", *marker, *shlex.split(pytest_args)]
    try:
        result = c.run(shlex.join(command), warn=True, pty=False, env=env)
    finally:
        if e2e and not was_up and not keep_cluster and localcluster.recorded() is not None:
            print("==> the tests brought the local cluster up: taking it down again")
            c.run(f"{shlex.quote(str(ROOT / 'invoke'))} cluster.down", warn=True, env=env)
    if result.exited:
        raise Exit(code=result.exited)
