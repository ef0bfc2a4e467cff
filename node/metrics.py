"""The master seen from outside: Prometheus metrics, a live dashboard and its JSON.

`MetricsServer` serves, on its own thread (http.server.ThreadingHTTPServer), at
`--metrics-listen` (default 127.0.0.1:9464, loopback only):

- `/metrics`: Prometheus text format 0.0.4 (the names are listed in docs/contract.md);
- `/`: the dashboard, one page of HTML, CSS and JavaScript, nothing fetched from elsewhere
  (its Content-Security-Policy allows only its own inline script and style, and
  requests to this server);
- `/api/status`: what the dashboard polls: Master.status() plus the last 10 minutes of
  queue depth and throughput, open jobs with their progress and recent failures.

It reads state and never holds the master's locks long: counters are numbers read
without a lock, the scheduler's lock is taken for a moment per request (its counts),
and SQLite is read on the store's reader connection. The hot path pays only for
`Telemetry.outcomes` (per report: one lock, and min, max and sum over its durations; a
bisect per outcome only when they span buckets; nothing with metrics off) and for timing
each ledger write (two clock reads per transaction).

Metrics carry no task arguments, results, error text or secrets. The dashboard shows
the first line of recent errors and the hosts' names, which come from workers: the page
puts them in as text (never as markup), and with a loopback address the server answers
only requests addressed to localhost or an IP address (DNS rebinding).
"""

from __future__ import annotations

import base64
import bisect
import collections
import errno
import functools
import hashlib
import ipaddress
import json
import logging
import operator
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from node import __version__
from node.config import describe_error, format_address

log = logging.getLogger("taskfleet.metrics")

TASK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
HISTORY = 600  # samples of (time, queued, leased, tasks/s), one a second: 10 minutes
FAILURES = 50  # recent failed attempts kept for the dashboard
JOBS_SHOWN = (40, 10)  # open jobs on the dashboard at most: the oldest (running) and the newest
FINISHED_SHOWN = 10  # recently finished jobs on the dashboard
ERROR_CHARS = 300  # of an error's first line, at most
MAX_CLIENTS = 32  # connections served at once; more are closed at once
CLIENT_TIMEOUT = 10.0  # seconds a connection may idle in a request
FOREVER = 1e9  # a duration at least this long (or NaN) is not a duration
_DURATION = operator.itemgetter(4)  # of an outcome (task_id, ok, value, error, duration)


class Histogram:
    """A Prometheus histogram: counts per bucket (upper bounds inclusive, +Inf last) and a sum."""

    def __init__(self, bounds):
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value

    def observe_many(self, values: list) -> None:
        """Observe a batch; values that are None, negative, NaN or absurd are left out.
        Cheap when they share a bucket (a worker's report of similar tasks): no Python
        loop over them at all."""
        try:
            low, high, total = min(values), max(values), sum(values)
            usable = 0 <= low and high < FOREVER and total == total  # a NaN makes the sum NaN
        except (TypeError, ValueError):  # a None among them, or none at all
            usable = False
        if not usable:
            values = [v for v in values if v is not None and 0 <= v < FOREVER]
            if not values:
                return
            low, high, total = min(values), max(values), sum(values)
        first = bisect.bisect_left(self.bounds, low)
        spread = None
        if bisect.bisect_left(self.bounds, high) != first:
            spread = collections.Counter(map(functools.partial(bisect.bisect_left, self.bounds), values))
        with self.lock:
            if spread is None:
                self.counts[first] += len(values)
            else:
                for index, count in spread.items():
                    self.counts[index] += count
            self.sum += total

    def snapshot(self) -> tuple[list, float]:
        """(cumulative count per bound, +Inf last; the sum)."""
        with self.lock:
            counts, total = list(self.counts), self.sum
        running, out = 0, []
        for count in counts:
            running += count
            out.append(running)
        return out, total


class Telemetry:
    """What the master records for metrics and the dashboard beyond its ledger: task run
    times, leases expired, a history of queue depth and throughput, recent failures."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled  # with metrics off, run times are not observed
        self.durations = Histogram(TASK_BUCKETS)
        self.leases_expired = 0  # tasks held by workers that were lost
        self.history: collections.deque = collections.deque(maxlen=HISTORY)  # (time, queued, leased, tasks/s)
        self.failures: collections.deque = collections.deque(maxlen=FAILURES)
        self._last: tuple | None = None  # (monotonic, results) at the previous sample

    def outcomes(self, outcomes: list) -> None:
        """Observe the run times of a worker's (checked) outcomes."""
        if self.enabled and outcomes:
            self.durations.observe_many(list(map(_DURATION, outcomes)))

    def failure(self, job_id: int, index: int, host, attempts: int, max_attempts: int, error: str) -> None:
        host = None if host is None else str(host)[:200]
        self.failures.append({"time": round(time.time(), 1), "job": job_id, "task": index, "host": host,
                              "attempt": attempts, "attempts": max_attempts, "final": attempts >= max_attempts,
                              "error": error})

    def sample(self, master) -> None:
        """Once a second (the master's upkeep): queue depth, leases and the rate of results."""
        now = time.monotonic()
        results = master.store.done_total + master.store.failed_total
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (results - self._last[1]) / (now - self._last[0])
        self._last = (now, results)
        scheduler = master.scheduler
        self.history.append((round(time.time(), 1), scheduler.queued, len(scheduler.leases), round(rate, 1)))


def first_line(text, limit: int = ERROR_CHARS) -> str:
    """The first non-empty line of an error, control characters replaced, at most `limit` characters."""
    lines = [line for line in str(text or "").splitlines() if line.strip()]
    return clean(lines[0].strip() if lines else "", limit)


def clean(text, limit: int = 200) -> str:
    """Text from a peer made safe for one log line: no control characters, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in str(text)[:limit + 1])
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- /metrics ----------------------------------------------------------------------------

def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value) -> str:
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else "NaN"
    return str(int(value))


class _Exposition:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples) -> None:
        """samples: (labels dict, value) pairs; `name` is the sample name (with _total for counters)."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{self._labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str, histogram: Histogram) -> None:
        cumulative, total = histogram.snapshot()
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for bound, count in zip((*(repr(b) for b in histogram.bounds), "+Inf"), cumulative):
            self.lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
        self.lines.append(f"{name}_sum {_number(float(total))}")
        self.lines.append(f"{name}_count {cumulative[-1]}")

    @staticmethod
    def _labels(labels: dict) -> str:
        if not labels:
            return ""
        return "{" + ",".join(f'{key}="{_label(value)}"' for key, value in labels.items()) + "}"

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(master) -> str:
    """The master's metrics in Prometheus text format."""
    status = master.status()
    tasks, store, server = status["tasks"], master.store, master.server
    out = _Exposition()
    out.family("taskfleet_build_info", "gauge", "The taskfleet release of this master (always 1).",
               [({"version": __version__}, 1)])
    out.family("taskfleet_master_start_time_seconds", "gauge", "When this master process started (Unix time).",
               [({}, float(master.started))])
    out.family("taskfleet_tasks", "gauge",
               "Tasks by state: queued (pending), leased (held by workers), done and failed (results kept).",
               [({"state": state}, tasks[state]) for state in ("queued", "leased", "done", "failed")])
    out.family("taskfleet_tasks_completed_total", "counter", "Tasks that ended with a result (over the ledger's life).",
               [({}, store.done_total)])
    out.family("taskfleet_tasks_failed_total", "counter",
               "Tasks that ended failed, their attempts used up (over the ledger's life).", [({}, store.failed_total)])
    out.family("taskfleet_task_retries_total", "counter",
               "Failed attempts (an error, a timeout, a lost worker) after which the task was queued again.",
               [({}, master.scheduler.retried)])
    out.family("taskfleet_leases_expired_total", "counter",
               "Tasks held by workers that went silent or left: each was queued again or failed.",
               [({}, master.telemetry.leases_expired)])
    out.histogram("taskfleet_task_duration_seconds", "Run time of task attempts, as reported by workers.",
                  master.telemetry.durations)
    out.family("taskfleet_jobs_open", "gauge", "Jobs without a result for every task (uploading or running).",
               [({}, tasks["open_jobs"])])
    out.family("taskfleet_jobs_kept", "gauge", "Jobs in the ledger, finished ones included until pruned.",
               [({}, tasks["jobs"])])
    workers = collections.Counter()
    processes = collections.Counter()
    for w in status["workers"]:
        state = "alive" if w["alive"] else w["state"]
        workers[(w["host"], state)] += 1
        if w["alive"]:
            processes[w["host"]] += w["concurrency"] or 0
    hosts = sorted({host for host, _ in workers})
    out.family("taskfleet_workers", "gauge", "Worker agents by host and state (alive, or lost within the hour).",
               [({"host": host, "state": state}, workers[(host, state)])
                for host in hosts for state in ("alive", "lost")])
    out.family("taskfleet_worker_processes", "gauge", "Pool processes of the live workers, by host.",
               [({"host": host}, processes[host]) for host in hosts])
    out.family("taskfleet_throughput_tasks_per_second", "gauge", "Results stored per second over the last 10 s.",
               [({}, float(status["throughput"]))])
    out.family("taskfleet_ledger_bytes", "gauge", "Size of the ledger on disk, its write-ahead log included.",
               [({}, store.size())])
    out.histogram("taskfleet_ledger_write_seconds",
                  "Duration of ledger write transactions (commit and fsync included, lock wait excluded).",
                  store.write_seconds)
    handshaking = len(server.handshaking) if server else 0
    serving = len(server.serving) if server else 0
    out.family("taskfleet_connections", "gauge", "Connections to the master's port: authenticated, or in handshake.",
               [({"state": "authenticated"}, serving), ({"state": "handshake"}, handshaking)])
    out.family("taskfleet_handshakes_refused_total", "counter",
               "Peers refused at the handshake: a wrong key, no valid handshake, or too many connections.",
               [({}, server.refused if server else 0)])
    return out.text()


# -- /api/status -------------------------------------------------------------------------

def dashboard_state(master) -> dict:
    """Master.status() plus what the dashboard draws: history, jobs, recent failures."""
    state = master.status()
    scheduler = master.scheduler
    with scheduler.lock:
        open_ids = list(scheduler.jobs)
    open_ids.sort()
    oldest, newest = JOBS_SHOWN
    shown = open_ids if len(open_ids) <= oldest + newest else open_ids[:oldest] + open_ids[-newest:]
    telemetry = master.telemetry
    state.update(
        time=round(time.time(), 1),
        history=list(telemetry.history),
        jobs=master.store.jobs_overview(shown, FINISHED_SHOWN),
        jobs_open=len(open_ids),
        failures=list(reversed(telemetry.failures)),
    )
    return state


# -- the server ----------------------------------------------------------------------------

class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], master):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.master = master
        self.active = 0
        self.counting = threading.Lock()
        host = address[0].strip("[]")
        try:
            self.loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            self.loopback = False
        super().__init__(address, _Handler)

    def server_bind(self):  # TCPServer's (SO_REUSEADDR: TIME_WAIT after a restart) without HTTPServer's getfqdn
        socketserver.TCPServer.server_bind(self)
        self.server_address = self.server_address[:2]
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:  # out of descriptors: back off instead of spinning on a readable listener
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.1)
            raise

    def process_request(self, request, client_address):
        with self.counting:
            full = self.active >= MAX_CLIENTS
            if not full:
                self.active += 1
        if full:
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # no thread could start
            with self.counting:
                self.active -= 1
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.counting:
                self.active -= 1

    def handle_error(self, request, client_address):
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    timeout = CLIENT_TIMEOUT

    def version_string(self) -> str:  # the Server header: no Python version
        return "taskfleet"

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
        log.debug("%s %s", self.client_address[0], format % args)

    def do_HEAD(self):
        self.do_GET(body=False)

    def do_GET(self, body: bool = True):
        path = self.path.split("?", 1)[0]
        if self.server.loopback and not _local_host(self.headers.get("Host")):
            return self._send(403, "text/plain; charset=utf-8",
                              b"this dashboard answers requests for localhost or an IP address only\n", body)
        try:
            if path == "/metrics":
                payload = render_metrics(self.server.master).encode()
                return self._send(200, "text/plain; version=0.0.4; charset=utf-8", payload, body)
            if path == "/api/status":
                payload = json.dumps(dashboard_state(self.server.master), separators=(",", ":")).encode()
                return self._send(200, "application/json", payload, body)
            if path in ("/", "/index.html"):
                return self._send(200, "text/html; charset=utf-8", DASHBOARD, body, page=True)
        except Exception as exc:  # the ledger closing as the master stops, a full disk...
            log.debug("cannot answer %s: %s", path, describe_error(exc))
            return self._send(503, "text/plain; charset=utf-8", f"{describe_error(exc)}\n".encode(), body)
        return self._send(404, "text/plain; charset=utf-8", b"not found: try / or /metrics\n", body)

    def _send(self, code: int, content_type: str, payload: bytes, body: bool, page: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if page:
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if body:
            self.wfile.write(payload)


def _local_host(header) -> bool:
    """A Host header naming localhost or an IP address (or none at all)."""
    if not header:
        return True
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class MetricsServer:
    """/metrics, the dashboard and /api/status for one master, on a thread of their own."""

    def __init__(self, master, address: tuple[str, int]):
        self.httpd = _HTTPServer(tuple(address), master)
        self.address = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_metrics(master, address: tuple[str, int]) -> MetricsServer | None:
    """Start serving; on failure (the port taken...) log why and go on without: the
    master's work does not depend on being watched."""
    try:
        server = MetricsServer(master, address)
    except OSError as exc:
        log.warning("cannot serve metrics and the dashboard on %s: %s; the master runs without them "
                    "(--metrics-listen)", format_address(address), exc.strerror or describe_error(exc))
        return None
    server.start()
    master.metrics_address = format_address(server.address)
    log.info("metrics on http://%s/metrics, dashboard on http://%s/", master.metrics_address, master.metrics_address)
    return server


def _inline_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# -- the page ------------------------------------------------------------------------------

STYLE = """
:root { --bg:#f6f7f9; --card:#fff; --ink:#1d2430; --muted:#6b7482; --line:#e3e6eb; --queued:#2f6fde;
        --rate:#e07b00; --done:#2e9e5b; --failed:#d64541; --lost:#b0b6bf; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: var(--bg); }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 12px; padding: 12px 20px;
         background: #1d2430; color: #fff; }
header h1 { font-size: 18px; margin: 0; }
header .muted { color: #b8c0cc; }
body.stale header { background: #8a2d2a; }
main { padding: 14px 20px 30px; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(120px, 1fr)); gap: 10px; margin-bottom: 14px; }
.tile, .card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; }
.tile { padding: 8px 12px; }
.tile .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.tile .value { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card { padding: 10px 14px; margin-bottom: 14px; min-width: 0; }
.card h2 { font-size: 15px; margin: 0 0 8px; }
.muted { color: var(--muted); font-weight: normal; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 14px; }
.grid .card { margin-bottom: 0; }
.spaced { margin-top: 14px; }
.scroll { max-height: 360px; overflow: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { position: sticky; top: 0; background: var(--card); color: var(--muted); font-weight: 600; font-size: 12px; }
td.num, th.num { text-align: right; }
td.error { white-space: normal; word-break: break-word; font-family: ui-monospace, Menlo, Consolas, monospace;
           font-size: 12px; }
td.host { max-width: 260px; overflow: hidden; text-overflow: ellipsis; }
.state-alive { color: var(--done); font-weight: 600; }
.state-lost { color: var(--failed); font-weight: 600; }
.bar { position: relative; width: 160px; height: 12px; background: var(--line); border-radius: 3px; overflow: hidden; }
.bar .done, .bar .failed { position: absolute; top: 0; bottom: 0; }
.bar .done { left: 0; background: var(--done); }
.bar .failed { background: var(--failed); }
.legend { color: var(--muted); font-size: 12px; }
.key { display: inline-block; width: 18px; height: 10px; vertical-align: middle; margin: 0 4px 0 12px; }
.key.queued { background: rgba(47, 111, 222, .45); }
.key.leased { background: rgba(47, 111, 222, .15); border-top: 2px solid var(--queued); }
.key.rate { background: var(--rate); height: 3px; }
svg { width: 100%; height: 230px; display: block; }
svg text { font-size: 11px; fill: var(--muted); }
.final { color: var(--failed); font-weight: 600; }
.empty { color: var(--muted); padding: 8px; }
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 1500;
let previous = null;  // the last status: per-worker rates come from done counts between two polls

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);  // text, never markup
  if (cls) node.className = cls;
  return node;
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
  return tr;
}
function num(value, cls) { return el("td", value, "num" + (cls ? " " + cls : "")); }
function fmt(n) { return n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US"); }
function rate(n) { return n >= 100 ? fmt(Math.round(n)) : (Math.round(n * 10) / 10).toFixed(1); }
function ago(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 120) return Math.round(seconds) + " s ago";
  if (seconds < 7200) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}
function duration(seconds) {
  if (seconds < 120) return Math.round(seconds) + " s";
  if (seconds < 7200) return Math.round(seconds / 60) + " min";
  return Math.round(seconds / 3600) + " h";
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString("en-GB"); }
function fill(id, rows, empty, columns) {
  const body = $(id).tBodies[0];
  if (!rows.length) {
    const td = el("td", empty, "empty");
    td.colSpan = columns;
    rows = [row([td])];
  }
  body.replaceChildren(...rows);
}

function tiles(s) {
  const t = s.tasks;
  $("t-queued").textContent = fmt(t.queued);
  $("t-leased").textContent = fmt(t.leased);
  $("t-done").textContent = fmt(t.done);
  $("t-failed").textContent = fmt(t.failed);
  $("t-rate").textContent = rate(s.throughput);
  $("t-workers").textContent = fmt(s.workers.filter((w) => w.alive).length);
  $("t-jobs").textContent = fmt(t.open_jobs);
  const m = s.master;
  $("master").textContent = [m.address, "taskfleet " + m.version, "up " + duration(m.uptime),
                              "durability " + m.durability].filter(Boolean).join(" · ");
}

function workers(s) {
  const before = {};
  if (previous) for (const w of previous.workers) before[w.id] = w.done;
  const span = previous ? Math.max(0.001, s.time - previous.time) : 0;
  const hosts = new Map();
  for (const w of s.workers) {
    if (!hosts.has(w.host)) hosts.set(w.host, {host: w.host, agents: 0, alive: 0, procs: 0, done: 0, rate: null,
                                               seen: null, pids: []});
    const h = hosts.get(w.host);
    h.agents += 1;
    h.done += w.done;
    h.pids.push("pid " + w.pid + " (" + (w.alive ? "alive" : w.state) + ")");
    if (w.alive) {
      h.alive += 1;
      h.procs += w.concurrency || 0;
      if (span && w.id in before) h.rate = (h.rate || 0) + Math.max(0, w.done - before[w.id]) / span;
    }
    if (w.last_seen_ago !== null && (h.seen === null || w.last_seen_ago < h.seen)) h.seen = w.last_seen_ago;
  }
  const rows = [];
  for (const h of [...hosts.values()].sort((a, b) => a.host < b.host ? -1 : a.host > b.host ? 1 : 0)) {
    const state = h.alive ? "alive" : "lost";
    const host = el("td", h.host, "host");
    host.title = h.host + ": " + h.pids.join(", ");
    const tr = row([host, num(h.alive + (h.agents > h.alive ? " of " + h.agents : "")), num(h.procs),
                    el("td", state, "state-" + state), num(h.rate === null ? "-" : rate(h.rate) + "/s"),
                    el("td", ago(h.seen)), num(fmt(h.done))]);
    tr.dataset.host = h.host;
    rows.push(tr);
  }
  $("workers-count").textContent = hosts.size + " host(s), " + s.workers.filter((w) => w.alive).length +
    " worker(s) alive";
  fill("workers", rows, "no workers have joined", 7);
}

function jobs(s) {
  const rows = [];
  for (const j of s.jobs) {
    const total = Math.max(1, j.total);
    const bar = el("div", null, "bar");
    const done = el("div", null, "done");
    done.style.width = (100 * j.done / total).toFixed(2) + "%";
    const failed = el("div", null, "failed");
    failed.style.left = done.style.width;
    failed.style.width = (100 * j.failed / total).toFixed(2) + "%";
    bar.append(done, failed);
    bar.title = fmt(j.done) + " done, " + fmt(j.failed) + " failed of " + fmt(j.total);
    const cell = el("td");
    cell.appendChild(bar);
    const state = j.finished ? "finished" : j.sealed ? "running" : "uploading";
    const age = j.finished ? "took " + duration(j.finished - j.created) : duration(s.time - j.created);
    const tr = row([num(j.id), el("td", j.task), cell, num(fmt(j.done)), num(fmt(j.failed), j.failed ? "final" : ""),
                    num(fmt(j.total)), el("td", state), el("td", age)]);
    tr.dataset.job = j.id;
    rows.push(tr);
  }
  const shown = s.jobs.filter((j) => !j.finished).length;
  $("jobs-count").textContent = s.jobs_open + " open" +
    (s.jobs_open > shown ? " (showing the oldest and newest " + shown + ")" : "") + ", " + s.tasks.jobs + " kept";
  fill("jobs", rows, "no jobs yet", 8);
}

function failures(s) {
  const rows = s.failures.map((f) => {
    const attempt = el("td", f.attempt + " of " + f.attempts + (f.final ? ", final" : ""), f.final ? "final" : "");
    return row([el("td", clock(f.time)), num(f.job), num(f.task), el("td", f.host === null ? "-" : f.host, "host"),
                attempt, el("td", f.error, "error")]);
  });
  $("failures-count").textContent = s.failures.length ? "the last " + s.failures.length : "";
  fill("failures", rows, "no failed attempts since the master started", 6);
  const refused = s.rejected.map((p) => row([el("td", p.host, "host"), num(fmt(p.count)), el("td", ago(p.seconds_ago)),
                                             el("td", p.reason, "error")]));
  $("refused-card").hidden = !refused.length;
  if (refused.length) fill("refused", refused, "", 4);
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function nice(max) {
  if (max <= 0) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(max)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= max) return m * step;
  return 10 * step;
}
const SPANS = [60, 120, 300, 600];  // seconds shown: the shortest holding the history, 10 minutes at most
function plot(s) {
  const area = $("plot"), H = 230, L = 56, R = 56, T = 10, B = 24;
  const W = Math.max(400, Math.round(area.getBoundingClientRect().width) || 900);
  area.setAttribute("viewBox", "0 0 " + W + " " + H);
  const end = s.time, oldest = s.history.length ? end - s.history[0][0] : 0;
  const span = SPANS.find((d) => d >= oldest) || SPANS[SPANS.length - 1], start = end - span;
  const points = s.history.filter((p) => p[0] >= start);
  const x = (t) => L + (W - L - R) * (t - start) / span;
  const qmax = nice(Math.max(...points.map((p) => p[1] + p[2]), 1));
  const rmax = nice(Math.max(...points.map((p) => p[3]), 1));
  const yq = (v) => H - B - (H - T - B) * v / qmax, yr = (v) => H - B - (H - T - B) * v / rmax;
  const nodes = [];
  for (let i = 0; i <= 4; i++) {
    const y = T + (H - T - B) * i / 4;
    nodes.push(svg("line", {x1: L, x2: W - R, y1: y, y2: y, stroke: "#e3e6eb"}));
    nodes.push(svg("text", {x: L - 6, y: y + 4, "text-anchor": "end", fill: "#2f6fde"}, fmt(qmax * (4 - i) / 4)));
    nodes.push(svg("text", {x: W - R + 6, y: y + 4, fill: "#e07b00"}, rate(rmax * (4 - i) / 4)));
  }
  const label = (d) => d >= 60 ? "-" + d / 60 + " min" : "-" + d + " s";
  for (const [text, t, anchor] of [[label(span), start, "start"], [label(span / 2), start + span / 2, "middle"],
                                   ["now", end, "end"]]) {
    nodes.push(svg("text", {x: x(t), y: H - 6, "text-anchor": anchor}, text));
  }
  if (points.length > 1) {
    const xs = points.map((p) => x(p[0]).toFixed(1));
    const line = (values, y) => values.map((v, k) => (k ? "L" : "M") + xs[k] + "," + y(v).toFixed(1)).join("");
    const band = (top, bottom) => line(top, yq) + bottom.map((v, k) => "L" + xs[k] + "," + yq(v).toFixed(1))
      .reverse().join("") + "Z";
    const queued = points.map((p) => p[1]), waiting = points.map((p) => p[1] + p[2]), zero = points.map(() => 0);
    nodes.push(svg("path", {d: band(waiting, queued), fill: "#2f6fde", "fill-opacity": "0.12", id: "plot-leased"}));
    nodes.push(svg("path", {d: band(queued, zero), fill: "#2f6fde", "fill-opacity": "0.35", id: "plot-queued"}));
    nodes.push(svg("path", {d: line(waiting, yq), fill: "none", stroke: "#2f6fde", "stroke-width": "1.5"}));
    nodes.push(svg("path", {d: line(points.map((p) => p[3]), yr), fill: "none", stroke: "#e07b00",
                            "stroke-width": "2", id: "plot-rate"}));
  } else {
    nodes.push(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "collecting samples (one a second)"));
  }
  $("plot-span").textContent = "the last " + (span >= 60 ? span / 60 + " min" : span + " s");
  area.replaceChildren(...nodes);
}

async function poll() {
  try {
    const reply = await fetch("api/status", {cache: "no-store"});
    if (!reply.ok) throw new Error("HTTP " + reply.status + " " + (await reply.text()).trim());
    const s = await reply.json();
    tiles(s); workers(s); jobs(s); failures(s); plot(s);
    previous = s;
    document.body.classList.remove("stale");
    $("updated").textContent = "updated " + clock(s.time);
  } catch (err) {
    document.body.classList.add("stale");
    $("updated").textContent = "cannot reach the master: " + err.message + " (retrying)";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>taskfleet</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<header><h1>taskfleet</h1><span id="master" class="muted"></span>
<span id="updated" class="muted">loading…</span></header>
<main>
<section class="tiles">
  <div class="tile"><div class="label">queued</div><div class="value" id="t-queued">-</div></div>
  <div class="tile"><div class="label">leased</div><div class="value" id="t-leased">-</div></div>
  <div class="tile"><div class="label">done</div><div class="value" id="t-done">-</div></div>
  <div class="tile"><div class="label">failed</div><div class="value" id="t-failed">-</div></div>
  <div class="tile"><div class="label">tasks/s (10 s)</div><div class="value" id="t-rate">-</div></div>
  <div class="tile"><div class="label">workers alive</div><div class="value" id="t-workers">-</div></div>
  <div class="tile"><div class="label">open jobs</div><div class="value" id="t-jobs">-</div></div>
</section>
<section class="card">
  <h2>Queue depth and throughput <span class="muted" id="plot-span"></span></h2>
  <svg id="plot" viewBox="0 0 900 230" role="img" aria-label="queue depth and throughput"></svg>
  <div class="legend"><span class="key queued"></span>tasks queued<span class="key leased"></span>leased to workers
  (left axis)<span class="key rate"></span>results per second (right axis)</div>
</section>
<div class="grid">
<section class="card">
  <h2>Workers <span id="workers-count" class="muted"></span></h2>
  <div class="scroll"><table id="workers"><thead><tr><th>host</th><th class="num">workers</th>
  <th class="num">processes</th><th>state</th><th class="num">rate</th><th>last seen</th><th class="num">done</th>
  </tr></thead><tbody></tbody></table></div>
</section>
<section class="card">
  <h2>Jobs <span id="jobs-count" class="muted"></span></h2>
  <div class="scroll"><table id="jobs"><thead><tr><th class="num">job</th><th>task</th><th>progress</th>
  <th class="num">done</th><th class="num">failed</th><th class="num">total</th><th>state</th><th>age</th>
  </tr></thead><tbody></tbody></table></div>
</section>
</div>
<section class="card spaced">
  <h2>Recent failures <span id="failures-count" class="muted"></span></h2>
  <div class="scroll"><table id="failures"><thead><tr><th>time</th><th class="num">job</th><th class="num">task</th>
  <th>host</th><th>attempt</th><th>error (first line)</th></tr></thead><tbody></tbody></table></div>
</section>
<section class="card" id="refused-card" hidden>
  <h2>Refused peers <span class="muted">the last hour</span></h2>
  <div class="scroll"><table id="refused"><thead><tr><th>host</th><th class="num">times</th><th>last</th>
  <th>reason</th></tr></thead><tbody></tbody></table></div>
</section>
</main>
<script>{script}</script>
</body>
</html>
"""

DASHBOARD = PAGE.format(style=STYLE, script=SCRIPT).encode()
CSP = (f"default-src 'none'; script-src {_inline_hash(SCRIPT)}; style-src {_inline_hash(STYLE)}; "
       "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
