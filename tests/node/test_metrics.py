"""Seeing the fleet: /metrics (parsed with prometheus_client's parser), /api/status, the
master's log lines per job and per failed attempt, `results --failed`, `status --watch`.

In-process tests build a Master on a real ledger in a tmp dir; the others run a real
master and workers on 127.0.0.1 (metrics on port 0: any free port, found with status)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import pty
import select
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from multiprocessing import AuthenticationError

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import PYTHON, ROOT, base_env, check_exactly_once, json_lines, wait_for
from node import PROTOCOL, wire
from node.master import Master
from node.metrics import Histogram, clean, first_line, render_metrics
from node.scheduler import Scheduler
from node.store import Store
from node.tasks import Registry

# A worker that reports another host name: `python -c SHIM NAME worker ...`.
HOSTNAME_SHIM = ("import socket, sys; from node.cli import main; name = sys.argv.pop(1); "
                 "socket.gethostname = lambda: name; sys.exit(main(sys.argv[1:]))")
BASE = 7_919_000  # arguments BASE+i: neither they nor their squares may show in /metrics


def start_named_worker(agents, host: str, concurrency: int = 1):
    return agents._spawn("worker", ["-c", HOSTNAME_SHIM, host, "worker", "--master", agents.master_address,
                                    "--authkey-file", str(agents.key), "--concurrency", str(concurrency)])


def metrics_address(agents) -> str:
    return wait_for(lambda: agents.status()["master"]["metrics"], 10, "the master to serve metrics")


def get(url: str, host: str | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode(), dict(reply.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, family: str, sample: str | None = None, **labels) -> float:
    for s in fams[family].samples:
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {sample or family}{labels} in {fams[family].samples}")


def listening_ports(pid: int) -> set:
    """TCP ports process `pid` listens on (from /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in list(handle)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# -- in process -------------------------------------------------------------------------

@pytest.fixture
def master(tmp_path):
    store = Store(tmp_path / "state")
    sched = Scheduler(store)
    m = Master(store, sched, Registry())
    m.hello("w1", 'h"1\\', 1, 2, protocol=PROTOCOL)
    yield m
    store.close()


def _run(master: Master, worker: str, host: str, fail=lambda task_id: False) -> list:
    """Lease everything and report it done (or failed, where `fail`); returns the outcomes."""
    rows = master.lease(worker, 100000)
    outcomes = [(t, False, None, f"RuntimeError: no {t}\nTraceback...", 0.2) if fail(t)
                else (t, True, pickle.dumps(pickle.loads(blob)[0] ** 2), None, 0.002) for t, _, blob, _ in rows]
    master.complete(worker, host, outcomes)
    return outcomes


def test_metrics_follow_the_ledger_and_parse(master):
    """Counters match what was done; the histogram counts every outcome; every family has
    HELP and TYPE; label values are escaped; nothing of a task's arguments or results."""
    job = master.submit("k", "square", [[BASE + i] for i in range(20)], 0, 20, retries=1)["job"]
    _run(master, "w1", 'h"1\\', fail=lambda t: t % 5 == 0)  # 4 fail once, then are retried
    _run(master, "w1", 'h"1\\', fail=lambda t: t % 10 == 0)  # 2 of them fail again: their last attempt
    master.telemetry.sample(master)
    text = render_metrics(master)
    fams = families(text)
    assert value(fams, "taskfleet_tasks_completed", "taskfleet_tasks_completed_total") == 18
    assert value(fams, "taskfleet_tasks_failed", "taskfleet_tasks_failed_total") == 2
    assert value(fams, "taskfleet_task_retries", "taskfleet_task_retries_total") == 4
    assert value(fams, "taskfleet_tasks", state="done") == 18 and value(fams, "taskfleet_tasks", state="queued") == 0
    histogram = "taskfleet_task_duration_seconds"
    assert value(fams, histogram, histogram + "_count") == 24  # 20 first attempts + 4 retries
    assert value(fams, histogram, histogram + "_bucket", le="0.005") == 18
    assert value(fams, histogram, histogram + "_sum") == pytest.approx(18 * 0.002 + 6 * 0.2)
    assert value(fams, "taskfleet_workers", host='h"1\\', state="alive") == 1
    assert value(fams, "taskfleet_worker_processes", host='h"1\\') == 2
    assert value(fams, "taskfleet_jobs_open") == 0
    assert value(fams, "taskfleet_ledger_bytes") > 0
    assert value(fams, "taskfleet_ledger_write_seconds", "taskfleet_ledger_write_seconds_count") >= 3
    for name, family in fams.items():
        assert name.startswith("taskfleet_")
        exposed = name + "_total" if family.type == "counter" else name
        assert f"# HELP {exposed} " in text and f"# TYPE {exposed} {family.type}" in text
    for i in range(20):
        assert str(BASE + i) not in text and str((BASE + i) ** 2) not in text
    assert "RuntimeError" not in text and "Traceback" not in text
    assert master.store.job(job)["finished"]


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram((0.1, 1))
    h.observe_many([0.05, 0.1, 0.5, 1, 7])
    h.observe(0.2)
    assert h.snapshot() == ([2, 5, 6], pytest.approx(8.85))


def test_failed_attempts_and_finished_jobs_are_logged_never_successes(master, caplog):
    caplog.set_level(logging.INFO, logger="taskfleet.master")
    job = master.submit("k", "square", [[i] for i in range(50)], 0, 50, retries=1)["job"]
    _run(master, "w1", "alpha\x1b[31m", fail=lambda t: t == 7)
    _run(master, "w1", "alpha\x1b[31m", fail=lambda t: t == 7)
    lines = [r.getMessage() for r in caplog.records if r.name == "taskfleet.master" and f"job {job} " in r.getMessage()]
    assert f"job {job} accepted: 50 square task(s)" in lines
    assert lines.count(f"job {job} task 6 failed on alpha?[31m, attempt 1 of 2, to be retried: RuntimeError: no 7") \
        == 1  # task id 7 is index 6; the escape from the peer is neutralised; the first line only
    assert f"job {job} task 6 failed on alpha?[31m, attempt 2 of 2: RuntimeError: no 7" in lines
    finished = [line for line in lines if line.startswith(f"job {job} finished: 49 done, 1 failed of 50 square")]
    assert len(finished) == 1
    assert len(lines) == 4, lines  # accepted, two failed attempts, finished: nothing per successful task
    failures = list(master.telemetry.failures)
    assert [(f["job"], f["task"], f["attempt"], f["final"]) for f in failures] == \
        [(job, 6, 1, False), (job, 6, 2, True)]


def test_results_failed_only_pages_past_successes(master):
    """With failed_only the master returns failures only, and a cursor past the results it
    read, so a client pages through a long job without seeing its successes."""
    total = 3000
    job = master.submit("k", "square", [[i] for i in range(total)], 0, total, retries=0)["job"]
    rows = master.lease("w1", 100000)
    for start in range(0, total, 100):  # one report per 100 tasks: 30 stored rows
        chunk = rows[start:start + 100]
        master.complete("w1", "h", [(t, False, None, f"bad {t}", 0.1) if t in (5, 2999) else
                                    (t, True, pickle.dumps(1), None, 0.1) for t, *_ in chunk])
    seen, after, calls = [], 0, 0
    while True:
        reply = master.results(job, after, 100, 0.0, True)
        calls += 1
        seen += [(r[1], r[2], r[4]) for r in reply["rows"]]
        if not reply["rows"] and reply["next"] == after:
            break
        after = reply["next"]
    assert seen == [(4, False, "bad 5"), (2998, False, "bad 2999")]
    assert calls <= 4
    assert len(master.results(job, 0, 10000)["rows"]) == total  # without it: everything, as before
    clean_job = master.submit("k2", "square", [[1]], 0, 1)["job"]
    _run(master, "w1", "h")
    assert master.results(clean_job, 0, 100, 0.0, True) == {"rows": [], "job": master.job(clean_job),
                                                             "instance": master.store.instance, "next": 0}


def test_text_from_peers_is_cleaned():
    assert first_line("\n  ValueError: x\x07y\nTraceback") == "ValueError: x?y"
    assert first_line(None) == ""
    assert clean("a" * 500, 10) == "a" * 9 + "…"


# -- a real master ----------------------------------------------------------------------

def test_metrics_of_a_real_fleet(agents):
    """A master with two workers (one with an awkward host name): after a job, /metrics
    matches it, and holds no argument, result, error text or key; /api/status and the
    dashboard page answer; a wrong key counts as a refused handshake."""
    agents.start_master("--metrics-listen", "127.0.0.1:0")
    start_named_worker(agents, 'tf "odd" \\ host', concurrency=2)
    agents.start_worker(concurrency=2)
    agents.wait_workers(2)
    address = metrics_address(agents)
    with pytest.raises(AuthenticationError):
        wire.dial(("127.0.0.1", agents.port), b"not the key")
    with agents.client() as client:
        square = client.submit("square", [(BASE + i,) for i in range(200)])
        check_exactly_once(square.wait(), 200)
        fail = client.submit("fail", [("secret-marker-1",), ("secret-marker-2",)], retries=1)
        assert [r.ok for r in fail.wait()] == [False, False]
        status = client.status()
    code, text, headers = get(f"http://{address}/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    fams = families(text)
    assert value(fams, "taskfleet_tasks_completed", "taskfleet_tasks_completed_total") == 200 == status["tasks"]["done"]
    assert value(fams, "taskfleet_tasks_failed", "taskfleet_tasks_failed_total") == 2 == status["tasks"]["failed"]
    assert value(fams, "taskfleet_task_retries", "taskfleet_task_retries_total") == 2
    histogram = "taskfleet_task_duration_seconds"
    assert value(fams, histogram, histogram + "_count") == 204  # 200 + 2 tasks x 2 attempts
    assert value(fams, histogram, histogram + "_bucket", le="+Inf") == 204
    assert value(fams, "taskfleet_workers", host='tf "odd" \\ host', state="alive") == 1
    assert value(fams, "taskfleet_workers", host=os.uname().nodename, state="alive") == 1
    assert value(fams, "taskfleet_connections", state="authenticated") >= 2
    assert value(fams, "taskfleet_handshakes_refused", "taskfleet_handshakes_refused_total") >= 1
    assert value(fams, "taskfleet_jobs_open") == 0 and value(fams, "taskfleet_jobs_kept") == 2
    for i in range(200):
        assert str(BASE + i) not in text and str((BASE + i) ** 2) not in text
    assert "secret-marker" not in text and "RuntimeError" not in text
    assert agents.key.read_text() not in text
    code, body, headers = get(f"http://{address}/api/status")
    state = json.loads(body)
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert state["tasks"] == status["tasks"]
    assert {j["id"]: j["done"] for j in state["jobs"]} == {square.id: 200, fail.id: 0}
    assert sorted(f["error"] for f in state["failures"]) == \
        ["RuntimeError: secret-marker-1"] * 2 + ["RuntimeError: secret-marker-2"] * 2
    assert all(f["job"] == fail.id for f in state["failures"])
    code, page, headers = get(f"http://{address}/")
    assert code == 200 and "<svg id=\"plot\"" in page and "default-src 'none'" in headers["Content-Security-Policy"]
    external = page.replace("http://www.w3.org/2000/svg", "")  # an XML namespace, never fetched
    assert "http://" not in external and "https://" not in external and " src=" not in page
    assert get(f"http://{address}/metrics", host="attacker.example:80")[0] == 403  # DNS rebinding
    assert get(f"http://{address}/metrics", host="localhost:9464")[0] == 200
    assert get(f"http://{address}/nothing")[0] == 404


def test_leases_expired_and_lost_workers(agents, tmp_path):
    """A worker killed while it holds tasks: its leases expire and count, and it shows lost."""
    agents.start_master("--metrics-listen", "127.0.0.1:0", ttl=1.0)
    victim = start_named_worker(agents, "doomed")
    agents.wait_workers(1)
    address = metrics_address(agents)
    with agents.client() as client:
        job = client.submit("sleep", [(30,)] * 3)
        wait_for(lambda: job.progress() and agents.status()["tasks"]["leased"] >= 1, 10, "a task leased")
        victim.kill_group()
        wait_for(lambda: not agents.alive_workers(), 15, "the worker to be lost")
    fams = families(get(f"http://{address}/metrics")[1])
    assert value(fams, "taskfleet_leases_expired", "taskfleet_leases_expired_total") >= 1
    assert value(fams, "taskfleet_workers", host="doomed", state="lost") == 1
    assert value(fams, "taskfleet_workers", host="doomed", state="alive") == 0
    assert value(fams, "taskfleet_tasks", state="queued") == 3


def test_metrics_off_means_no_port_and_a_taken_port_only_a_warning(agents):
    master = agents.start_master("--metrics-listen", "off")
    assert agents.status()["master"]["metrics"] is None
    assert listening_ports(master.pid) == {agents.port}
    assert "metrics on" not in master.text()
    master.kill_group(signal.SIGTERM)
    master.wait()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        master = agents.start_master("--metrics-listen", f"127.0.0.1:{port}")
        wait_for(lambda: "cannot serve metrics" in master.text(), 10, "the master to warn")
        assert master.alive() and agents.status()["master"]["metrics"] is None
        assert f"cannot serve metrics and the dashboard on 127.0.0.1:{port}: Address already in use" in master.text()
    master.kill_group(signal.SIGTERM)
    master.wait()
    master = agents.start_master("--metrics-listen", "127.0.0.1:0")
    metrics_port = int(metrics_address(agents).rsplit(":", 1)[1])
    assert listening_ports(master.pid) == {agents.port, metrics_port}


# -- the command line -------------------------------------------------------------------

@pytest.fixture
def running(agents):
    agents.start_master("--metrics-listen", "off")
    agents.start_worker(concurrency=2)
    agents.wait_workers(1)
    return agents


def test_results_failed_lists_only_failures_and_the_log_has_one_line_per_job(running):
    ok_job = running.cli("submit", "square", *map(str, range(30))).stdout.strip()
    assert running.cli("results", ok_job, "--wait").returncode == 0
    bad_job = running.cli("submit", "fail", "first\nsecond line", "plain", "--retries", "1").stdout.strip()
    assert running.cli("results", bad_job, "--wait").returncode == 1
    out = running.cli("results", bad_job, "--failed")
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"job {bad_job} (fail): 2 failed of 2 task(s)"
    assert lines[1:] == [f"  task 0 failed after 2 attempt(s) on {os.uname().nodename}: RuntimeError: first",
                         f"  task 1 failed after 2 attempt(s) on {os.uname().nodename}: RuntimeError: plain"]
    as_json = json_lines(running.cli("results", bad_job, "--failed", "--json").stdout)
    assert sorted(line["task"] for line in as_json) == [0, 1] and not any(line["ok"] for line in as_json)
    none = running.cli("results", ok_job, "--failed")
    assert none.returncode == 0 and none.stdout.splitlines() == [f"job {ok_job} (square): 0 failed of 30 task(s)"]
    assert running.cli("results", ok_job, "--failed", "--json").stdout == ""
    log = running.procs[0].text()
    assert f"job {ok_job} accepted: 30 square task(s)" in log
    assert f"job {ok_job} finished: 30 done, 0 failed of 30 square" in log
    assert sum(f"job {ok_job} " in line for line in log.splitlines()) == 2  # never a line per successful task
    assert log.count(f"job {bad_job} task 0 failed on") == 2 and log.count(f"job {bad_job} task 1 failed on") == 2
    assert "attempt 1 of 2, to be retried: RuntimeError: first" in log and "second line" not in log
    assert f"job {bad_job} finished: 0 done, 2 failed of 2 fail task(s)" in log


def _read_until(fd: int, pattern: bytes, count: int, timeout: float) -> bytes:
    out, deadline = b"", time.monotonic() + timeout
    while out.count(pattern) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {count} x {pattern!r} in {out[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the command ended before {count} x {pattern!r}: {out[-2000:]!r}")
            out += chunk
    return out


def test_status_watch_redraws_on_a_terminal_and_prints_plain_tables_to_a_pipe(running):
    argv = [PYTHON, "-m", "node", "status", "--watch", "--interval", "0.5", "--master", running.master_address,
            "--authkey-file", str(running.key)]
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(argv, stdin=terminal, stdout=terminal, stderr=terminal, cwd=str(ROOT), env=base_env(),
                            start_new_session=True)
    os.close(terminal)
    try:
        screen = _read_until(controller, b"LAST SEEN", 3, 20)  # the table's header, whatever the host name
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    assert screen.startswith(b"\x1b[H\x1b[2J") and screen.count(b"\x1b[H") >= 3 and b"\x1b[J" in screen
    assert b"RATE" in screen and b"/s" in screen and b"Traceback" not in screen

    piped = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT), env=base_env(),
                             start_new_session=True)
    try:
        out = _read_until(piped.stdout.fileno(), b"taskfleet status at", 2, 20)
        piped.send_signal(signal.SIGINT)
        rest, err = piped.communicate(timeout=10)
    finally:
        if piped.poll() is None:
            piped.kill()
            piped.wait()
    out += rest
    assert piped.returncode == 0, err
    assert b"\x1b" not in out and b"\n\ntaskfleet status at" in out
    tables = out.decode().split("\n\n")
    assert len(tables) >= 2 and all("LAST SEEN" in t for t in tables[:2])


def test_the_metrics_flag_and_its_variable(monkeypatch, capsys):
    from node import cli
    from node.config import ConfigError

    for name in [k for k in os.environ if k.startswith("TASKFLEET_")]:
        monkeypatch.delenv(name)
    assert cli.parse_args(["master"]).metrics_listen == ("127.0.0.1", 9464)
    assert cli.parse_args(["master", "--metrics-listen", "off"]).metrics_listen is None
    assert cli.parse_args(["master", "--metrics-listen", ""]).metrics_listen is None
    assert cli.parse_args(["master", "--metrics-listen", ":0"]).metrics_listen == ("127.0.0.1", 0)
    assert cli.parse_args(["master", "--metrics-listen", "0.0.0.0:9100"]).metrics_listen == ("0.0.0.0", 9100)
    assert cli.parse_args(["master", "--metrics-listen", "[::1]"]).metrics_listen == ("::1", 9464)
    monkeypatch.setenv("TASKFLEET_METRICS_LISTEN", "OFF")
    assert cli.parse_args(["master"]).metrics_listen is None
    monkeypatch.setenv("TASKFLEET_METRICS_LISTEN", "host:70000")
    with pytest.raises(ConfigError, match=r"--metrics-listen \(env TASKFLEET_METRICS_LISTEN\): .*0 to 65535"):
        cli.parse_args(["master"])
    with pytest.raises(SystemExit):
        cli.parse_args(["master", "--help"])
    assert "TASKFLEET_METRICS_LISTEN; default 127.0.0.1:9464" in " ".join(capsys.readouterr().out.split())


def test_dashboard_requests_are_bounded_and_quiet(agents):
    """Many idle connections to the metrics port do not stop it answering (they are cut
    after their timeout or refused beyond the limit), and nothing is logged at INFO."""
    master = agents.start_master("--metrics-listen", "127.0.0.1:0")
    address = metrics_address(agents)
    host, port = address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(40)]
    try:
        time.sleep(0.5)
        with pytest.raises(OSError):  # over the limit: closed at once (the idle ones hold every slot)
            get(f"http://{address}/metrics")
    finally:
        for sock in idle:
            sock.close()

    def answers():
        try:
            return get(f"http://{address}/metrics")[0] == 200
        except OSError:  # a slot not freed yet: refused as above
            return False

    assert wait_for(answers, 15, "the metrics port to answer")
    assert "GET /metrics" not in master.text()



def test_the_metrics_port_is_bound_again_at_once_after_a_restart(master):
    """Connections the server closed leave its port in TIME_WAIT for a minute: a master
    restarted at once (a deploy, a crash) must still bind its metrics port again."""
    from node.metrics import MetricsServer

    first = MetricsServer(master, ("127.0.0.1", 0))
    first.start()
    try:
        with socket.create_connection(first.address, timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            while sock.recv(65536):  # read to the end: the server closed first, so its side waits in TIME_WAIT
                pass
    finally:
        first.stop()
    second = MetricsServer(master, first.address)  # "Address already in use" without SO_REUSEADDR
    second.start()
    second.stop()
