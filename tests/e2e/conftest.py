"""End-to-end tier: the real local cluster (Vagrant + LXC), deployed with `invoke deploy`.

The session brings the cluster up (or reuses one that is up), deploys once, and hands the
tests the deploy's output, the fleet (master address, authkey) and testinfra hosts over
the same Ansible inventory. `invoke test` takes down a cluster that it brought up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import testinfra
import yaml

from node.client import Client
from ops import inventory, localcluster
from ops.paths import CLUSTER_DIR, LOCAL_INVENTORY, ROOT
from tests.browser import browser  # noqa: F401 - the fixture, for the dashboard's test
from tests.waiting import wait_for

INVOKE = ROOT / "invoke"
PROMETHEUS = "/usr/bin/prometheus"  # Debian's package (`./invoke test` installs it)

# testinfra runs `ansible-inventory` and `ansible` from PATH: the pinned ones beside this
# interpreter (.venv/bin), also when pytest is started as .venv/bin/pytest without ./invoke.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


def run_invoke(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ./invoke as an operator would; echo its output into the test log."""
    proc = subprocess.run([str(INVOKE), *args], cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        pytest.fail(f"invoke {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def play_runs(output: str, play: str) -> list[set]:
    """Each run of the play named `play` in ansible-playbook's output (one per batch), as the
    set of hosts with a task result in it; a play that matched no hosts is an empty set."""
    runs = [part for part in ("\n" + output).split("\nPLAY ")[1:] if part.startswith(f"[{play}]")]
    return [set(re.findall(r"^(?:ok|changed|skipping|failed|fatal): \[([^\]\s]+)", run, re.M)) for run in runs]


@pytest.fixture(scope="session")
def cluster():
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("the end-to-end tier needs Linux and root (LXC containers)")
    run_invoke("cluster.up")
    return localcluster.nodes(localcluster.settings())


@pytest.fixture(scope="session")
def first_deploy(cluster) -> subprocess.CompletedProcess:
    return run_invoke("deploy")


@pytest.fixture(scope="session")
def fleet(first_deploy) -> inventory.Fleet:
    return inventory.load(LOCAL_INVENTORY)


@pytest.fixture(scope="session")
def authkey(fleet) -> str:
    return fleet.authkey_file.read_text().strip()


@pytest.fixture
def client(fleet):
    with Client.connect(fleet.master_address, str(fleet.authkey_file), tls=fleet.tls_dir()) as c:
        yield c


def where_secrets_must_not_be(h) -> dict:
    """What anyone on host `h` may read that must never hold a secret: {place: its text}."""
    return {
        "process list": h.check_output("ps -eo args"),
        "unit files": h.check_output("cat /etc/systemd/system/taskfleet-*.service"),
        "env files": h.check_output("cat /etc/taskfleet/*.env"),
        "journal": h.check_output("journalctl --no-pager -o cat -n 5000"),
    }


def host(name: str):
    return testinfra.get_host(f"ansible://{name}?sudo=true", ansible_inventory=str(LOCAL_INVENTORY))


@pytest.fixture(scope="session")
def master_host(first_deploy):
    return host("tf-master")


@pytest.fixture(scope="session")
def worker_hosts(fleet):
    return [host(h.name) for h in fleet.hosts if "workers" in h.groups]


@pytest.fixture(scope="session")
def operator():
    """`operator("deploy")` runs ./invoke deploy and returns the finished process."""
    return run_invoke


@pytest.fixture
def inventory_copy(tmp_path):
    """`inventory_copy(NAME, var=value, ...)`: an inventory of the same local cluster (its
    hosts, group_vars and authkey) in tmp_path/NAME, with these variables set for
    tf-master, so that deploying it changes only what they set."""

    def make(name: str, **master_vars) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        for item in ("hosts.py", "group_vars", "secrets"):
            (directory / item).symlink_to(LOCAL_INVENTORY / item)
        (directory / "host_vars").mkdir()
        (directory / "host_vars" / "tf-master.yml").write_text(yaml.safe_dump(master_vars))
        return directory

    return make


class Tool:
    """A long-running command (`./invoke dashboard`, Prometheus): its output lines are
    collected as they come; stopped by its PID."""

    def __init__(self, argv: list, log: Path):
        self.argv, self.lines = argv, []
        self.log = log.open("w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self.log.write(line)
            self.log.flush()

    def first_line(self, timeout: float) -> str:
        wait_for(lambda: self.lines or self.proc.poll() is not None, timeout, f"the first line of {self.argv[:2]}")
        assert self.lines, f"{self.argv[:2]} exited {self.proc.returncode} without a line"
        return self.lines[0]

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        """Send `sig` to the process (by PID), wait for it; kill it if it does not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"{self.argv[:2]} did not end within {timeout:g} s of signal {sig}") from None
        self.reader.join(10)
        self.log.close()
        return self.proc.returncode


class Prometheus:
    """Debian's Prometheus on 127.0.0.1 (a free port), its data under .cluster/ (removed
    after), scraping with `config`. The controller has no init system to run it: it is a
    child process, stopped by its PID."""

    def __init__(self, config: Path, log: Path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        (CLUSTER_DIR / "prometheus").mkdir(parents=True, exist_ok=True)
        self.data = Path(tempfile.mkdtemp(prefix="tsdb-", dir=CLUSTER_DIR / "prometheus"))
        self.url = f"http://127.0.0.1:{port}"
        self.tool = Tool([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.data}",
                          f"--web.listen-address=127.0.0.1:{port}"], log)
        try:
            wait_for(self._ready, 60, f"Prometheus to be ready on {self.url} (log: {log})", interval=0.5)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.tool.proc.poll() is not None:
            raise AssertionError(f"Prometheus exited {self.tool.proc.returncode}:\n" + "\n".join(self.tool.lines[-20:]))
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as reply:
                return reply.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list:
        """The instant vector of `expr` from the HTTP API: [(labels, value), ...]."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            answer = json.load(reply)
        assert answer["status"] == "success", answer
        return [(r["metric"], float(r["value"][1])) for r in answer["data"]["result"]]

    def stop(self) -> None:
        try:
            self.tool.stop()
        finally:
            shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture
def background(tmp_path):
    """`background(argv)` starts a long-running command (a Tool, output in tmp_path);
    whatever still runs at the end of the test is stopped by its PID."""
    started = []

    def start(argv: list) -> Tool:
        started.append(Tool([str(a) for a in argv], tmp_path / f"{Path(str(argv[0])).name}-{len(started)}.log"))
        return started[-1]

    yield start
    for tool in started:
        tool.stop()


@pytest.fixture
def prometheus(tmp_path):
    """`prometheus(config)` starts one (skipped where Debian's package is missing)."""
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"{PROMETHEUS} not installed: `./invoke test` installs Debian's prometheus as root with apt-get")
    started = []

    def start(config: Path) -> Prometheus:
        started.append(Prometheus(config, tmp_path / f"prometheus-{len(started)}.log"))
        return started[-1]

    yield start
    for server in started:
        server.stop()
