"""Command line: `python -m node SUBCOMMAND` or `python3 taskfleet-node-VERSION.pyz SUBCOMMAND`.

Every flag can come from the environment (TASKFLEET_*), so services pass their
configuration by file and nothing secret ever sits in a process's arguments; the
authkey itself is only ever read from a file. A bad value, from a flag or its variable,
is one line on stderr (`taskfleet: error: ...`) and exit code 2, which the units do not
restart on.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import socket
import sys
import time
from collections import Counter
from multiprocessing import AuthenticationError
from typing import Callable, NamedTuple

from node import __version__
from node.config import (
    DURATION_RULES,
    LOG_LEVELS,
    SIZE_RULES,
    ConfigError,
    check_state_dir,
    format_address,
    parse_address,
    parse_choice,
    parse_count,
    parse_duration,
    parse_metrics_listen,
    parse_size,
    read_authkey,
    setup_logging,
)
from node.errors import MasterUnavailable, RemoteError, StorageError
from node.tls import TLS

EXIT_FAILED_TASKS, EXIT_CONFIG, EXIT_UNREACHABLE = 1, 2, 3
DURABILITIES = ("full", "fast")


class Setting(NamedTuple):
    """A flag and its environment variable. The value (flag, else env var, else `default`;
    an empty env var counts as unset) is a string until `parse_args` runs `parse` on it."""

    flag: str
    env: str | None
    default: str | None  # as an operator would write it; None: unset
    parse: Callable[[str], object]  # the value, range-checked; ConfigError saying what is expected
    metavar: str
    help: str

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        env_value = os.environ.get(self.env) if self.env else None
        details = [f"env {self.env}"] if self.env else []
        if self.default is not None:
            details.append(f"default {self.default}")
        parser.add_argument(self.flag, default=env_value or self.default, metavar=self.metavar,
                            help=f"{self.help} ({'; '.join(details)})" if details else self.help)


LOG_LEVEL = Setting("--log-level", "TASKFLEET_LOG_LEVEL", "INFO", lambda t: parse_choice(t, LOG_LEVELS),
                    "LEVEL", "DEBUG, INFO, WARNING or ERROR")
AUTHKEY_FILE = Setting("--authkey-file", "TASKFLEET_AUTHKEY_FILE", None, str, "PATH",
                       "file holding the shared authkey (several, one per line, during a rotation: the first is "
                       "dialed, the master accepts any; re-read when it changes); must not be readable by others")
MASTER = Setting("--master", "TASKFLEET_MASTER", None, parse_address, "HOST:PORT", "the master's address")
LISTEN = Setting("--listen", "TASKFLEET_LISTEN", "0.0.0.0:5000", lambda t: parse_address(t, default_host="0.0.0.0"),
                 "HOST:PORT", "address to listen on")
STATE_DIR = Setting("--state-dir", "TASKFLEET_STATE_DIR", None, str, "DIR", "where the ledger lives; required")
WORKER_TTL = Setting("--worker-ttl", "TASKFLEET_WORKER_TTL", "10s", parse_duration, "DURATION",
                     "a worker silent this long is lost and its leases go back to the queue")
MAX_PAYLOAD = Setting("--max-payload", "TASKFLEET_MAX_PAYLOAD", "1MiB", parse_size, "SIZE",
                      "largest pickled arguments or result of one task")
DURABILITY = Setting("--durability", "TASKFLEET_DURABILITY", "full", lambda t: parse_choice(t, DURABILITIES),
                     "{full,fast}", "full: every acknowledged submit and stored result survives a power loss; "
                     "fast: they survive the process dying, a power cut may lose the last moments")
RETENTION = Setting("--retention", "TASKFLEET_RETENTION", "7d", parse_duration, "DURATION",
                    "finished jobs are kept this long, then pruned")
MAX_JOBS = Setting("--max-jobs", "TASKFLEET_MAX_JOBS", "10000", parse_count, "N",
                   "at most this many finished jobs are kept, the oldest pruned first")
METRICS_LISTEN = Setting("--metrics-listen", "TASKFLEET_METRICS_LISTEN", "127.0.0.1:9464", parse_metrics_listen,
                         "HOST:PORT", "where to serve Prometheus /metrics and the dashboard (/); off: nowhere; "
                         "port 0: any free port (shown by status)")
CONCURRENCY = Setting("--concurrency", "TASKFLEET_CONCURRENCY", None, lambda t: parse_count(t, minimum=0) or None,
                      "N", "processes in the pool; default (or 0): one per CPU")
DRAIN_TIMEOUT = Setting("--drain-timeout", "TASKFLEET_DRAIN_TIMEOUT", "30s",
                        lambda t: parse_duration(t, allow_zero=True), "DURATION",
                        "on SIGTERM, how long running tasks may finish before they are handed back")
TLS_DIR = Setting("--tls-dir", "TASKFLEET_TLS_DIR", None, str, "DIR",
                  "speak TLS 1.3 with the certificates in DIR (ca.crt, node.crt, node.key; the master also crl.pem); "
                  "without it: plaintext, authkey only")
PLAIN_LISTEN = Setting("--plain-listen", "TASKFLEET_PLAIN_LISTEN", None, parse_address, "HOST:PORT",
                       "with --tls-dir: also serve the tutorial's queues, and only them, in plaintext here "
                       "(anyone on that path can read and inject their items)")
NAME = Setting("--name", "TASKFLEET_NAME", None, str, "NAME",
               "this worker's name in status and logs (default: the hostname); with --tls-dir, its certificate's name")
TIMEOUT = Setting("--timeout", None, None, parse_duration, "DURATION", "how long one task may run (default 300s)")
RETRIES = Setting("--retries", None, None, lambda t: parse_count(t, minimum=0), "N",
                  "attempts after the first for a failing task (default 2)")
SETTINGS = (LOG_LEVEL, AUTHKEY_FILE, MASTER, LISTEN, STATE_DIR, WORKER_TTL, MAX_PAYLOAD, DURABILITY, RETENTION,
            MAX_JOBS, METRICS_LISTEN, CONCURRENCY, DRAIN_TIMEOUT, TLS_DIR, PLAIN_LISTEN, NAME, TIMEOUT, RETRIES)

VALUE_RULES = f"DURATION: {DURATION_RULES}. SIZE: {SIZE_RULES}."


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr and exit 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(EXIT_CONFIG, f"taskfleet: error: {message} (see {self.prog} --help)\n")


def _add_modules(p: argparse.ArgumentParser) -> None:
    env = [m.strip() for m in os.environ.get("TASKFLEET_TASKS_MODULES", "").split(",") if m.strip()]
    p.add_argument("--tasks-module", action="append", default=None, metavar="MODULE",
                   help="extra tasks: an importable module or a .py file; repeatable "
                        "(env TASKFLEET_TASKS_MODULES, comma-separated)")
    p.set_defaults(env_modules=env)


def _subcommand(sub, name: str, help: str, description: str | None, *settings: Setting) -> argparse.ArgumentParser:
    """A subcommand parser with these settings' flags, and the DURATION/SIZE rules in its --help."""
    p = sub.add_parser(name, help=help, description=description, epilog=VALUE_RULES if settings else None)
    for setting in settings:
        setting.add_to(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The parser; flags default to their TASKFLEET_* variables, as strings (see parse_args)."""
    parser = Parser(
        prog="taskfleet-node",
        description="taskfleet node agents: a durable master/worker task system on multiprocessing.managers.",
        epilog="Exit codes: 0 ok, 1 some tasks failed, 2 bad configuration or input (incl. wrong authkey), "
               f"3 master unreachable (or unable to store, e.g. its disk is full). {VALUE_RULES}",
    )
    parser.add_argument("--version", action="version", version=f"taskfleet-node {__version__}")
    LOG_LEVEL.add_to(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = _subcommand(sub, "master", "serve the task queue and the ledger",
                    "Run the master: accepts jobs, leases tasks to workers, stores results.",
                    LISTEN, STATE_DIR, AUTHKEY_FILE, WORKER_TTL, MAX_PAYLOAD, DURABILITY, RETENTION, MAX_JOBS,
                    METRICS_LISTEN, TLS_DIR, PLAIN_LISTEN)
    _add_modules(p)

    p = _subcommand(sub, "worker", "run tasks leased from the master",
                    "Run a worker: leases tasks and runs them in a process pool.",
                    MASTER, AUTHKEY_FILE, CONCURRENCY, DRAIN_TIMEOUT, TLS_DIR, NAME)
    _add_modules(p)

    p = _subcommand(sub, "submit", "submit a job",
                    "Submit a job: one task per ARG (`submit square 1 2 3` is three tasks), or one per line of "
                    "--args-file. An ARG that parses as JSON is that value, otherwise the plain string.",
                    MASTER, AUTHKEY_FILE, TLS_DIR, TIMEOUT, RETRIES)
    p.add_argument("task", help="task name, e.g. square, sleep, burn, fail")
    p.add_argument("args", nargs="*", metavar="ARG", help="one task's single argument")
    p.add_argument("--args-file", metavar="FILE", help="one JSON array of arguments per line ('-' for stdin)")
    p.add_argument("--wait", action="store_true", help="wait for every result (else print the job id)")
    p.add_argument("--json", action="store_true", help="with --wait: one JSON object per task result")

    p = _subcommand(sub, "status", "show the master's view of the fleet", None, MASTER, AUTHKEY_FILE, TLS_DIR)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true",
                   help="show it again every --interval, with rates, until Ctrl-C (redrawn in place on a terminal)")
    p.add_argument("--interval", type=_interval, default=2.0, metavar="SECONDS",
                   help="with --watch: seconds between two looks (default 2)")

    p = _subcommand(sub, "results", "show a job's results", None, MASTER, AUTHKEY_FILE, TLS_DIR)
    p.add_argument("job", type=int, metavar="JOB_ID")
    p.add_argument("--json", action="store_true", help="one JSON object per task result")
    p.add_argument("--wait", action="store_true", help="wait until every task has a result")
    p.add_argument("--failed", action="store_true", help="only the tasks that failed")

    p = _subcommand(sub, "forget", "forget the workers of removed hosts",
                    "Make the master forget the workers of each HOST (a host removed from the fleet): status no "
                    "longer lists them. Refused while one of them is connected: stop it first.",
                    MASTER, AUTHKEY_FILE, TLS_DIR)
    p.add_argument("hosts", nargs="+", metavar="HOST", help="a worker host's name, as status shows it")
    return parser


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0.1 to 3600")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    """The command line over the TASKFLEET_* environment, every Setting parsed and range-checked.

    A usage error exits 2 with one line (Parser.error). A bad value raises ConfigError
    naming the flag and its env var, quoting the value and saying what is expected.
    """
    args = build_parser().parse_args(argv)
    for setting in SETTINGS:
        value = getattr(args, setting.dest, None)
        if isinstance(value, str):
            try:
                setattr(args, setting.dest, setting.parse(value))
            except ConfigError as exc:
                where = f"{setting.flag} (env {setting.env})" if setting.env else setting.flag
                raise ConfigError(f"{where}: {exc}") from None
    return args


def _modules(args) -> list:
    return args.tasks_module if args.tasks_module is not None else args.env_modules


def _master_address(args) -> tuple[str, int]:
    if not args.master:
        raise ConfigError("no master address: pass --master HOST:PORT or set TASKFLEET_MASTER")
    return args.master


def _client(args):
    from node.client import Client

    return Client.connect(_master_address(args), args.authkey_file, tls=args.tls_dir)


def _parse_arg(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _read_args_file(path: str) -> list:
    handle = sys.stdin if path == "-" else open(path, encoding="utf-8")
    items = []
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{path}:{number}: not JSON ({exc})") from None
            if not isinstance(value, list):
                raise ConfigError(f"{path}:{number}: expected a JSON array of arguments, got {line.strip()[:60]}")
            items.append(value)
    return items


def _print_json(result, task: str) -> None:
    print(json.dumps(result.as_dict(task), default=repr), flush=True)


def _progress(job, done: int, failed: int, started: float) -> None:
    total = job.info.get("total", "?")
    rate = done / max(1e-6, time.monotonic() - started)
    sys.stderr.write(f"\r[job {job.id}] {done}/{total} done, {failed} failed, {rate:.1f} tasks/s ")
    sys.stderr.flush()


def _follow(job, as_json: bool, wait: bool, failed_only: bool = False) -> int:
    """Stream a job's results; print a per-host summary. Exit 1 if any task failed."""
    tty = sys.stderr.isatty() and wait and not failed_only
    started, hosts, failures, count = time.monotonic(), Counter(), [], 0
    last_draw = 0.0
    for result in job.results(wait=wait, failed_only=failed_only):
        count += 1
        hosts[result.host] += 1
        if not result.ok:
            failures.append(result)
        if as_json:
            _print_json(result, job.task)
        if tty and time.monotonic() - last_draw > 0.2:
            _progress(job, count, len(failures), started)
            last_draw = time.monotonic()
    if tty:
        _progress(job, count, len(failures), started)
        sys.stderr.write("\n")
    if failed_only and not as_json:
        info = job.info
        print(f"job {job.id} ({job.task}): {len(failures)} failed of {info.get('total', '?')} task(s)"
              f"{'' if info.get('finished') else ', the job is still running'}")
        for result in sorted(failures, key=lambda r: r.index):
            print(f"  task {result.index} failed after {result.attempts} attempt(s) on {result.host or '(no host)'}: "
                  f"{_first_line(result.error)}")
    elif not as_json:
        total = job.info.get("total", count)
        print(f"job {job.id} ({job.task}): {count}/{total} results, {count - len(failures)} ok, {len(failures)} failed")
        for host, n in sorted(hosts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            print(f"  {host or '(no host)'}: {n} task(s)")
        for result in sorted(failures, key=lambda r: r.index)[:20]:
            print(f"  task {result.index} failed after {result.attempts} attempt(s): {result.error.splitlines()[0]}")
    return EXIT_FAILED_TASKS if failures else 0


def _first_line(text) -> str:
    lines = [line for line in str(text or "").splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def _ago(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def print_status(status: dict, rates: dict | None = None) -> None:
    for line in status_lines(status, rates):
        print(line)


def _build(worker: dict) -> str:
    """A worker's version; one of an older protocol that does not send it shows its protocol."""
    if worker.get("version"):
        return worker["version"]
    return f"protocol {worker['protocol']}" if worker.get("protocol") else "-"


def status_lines(status: dict, rates: dict | None = None) -> list[str]:
    """The status as text lines; with `rates` (worker id -> results/s) a RATE column."""
    m, t = status["master"], status["tasks"]
    lines = [f"master {m['address']} (taskfleet {m['version']}, up {m['uptime']:.0f} s)"
             + (f", dashboard http://{m['metrics']}/" if m.get("metrics") else ""),
             f"tasks  {t['queued']} queued, {t['leased']} leased, {t['done']} done, {t['failed']} failed; "
             f"{t['open_jobs']} open job(s) of {t['jobs']} kept; throughput {status['throughput']} tasks/s (last 10 s)"]
    rows = [("HOST", "WORKER", "PID", "PROCS", "STATE", "LAST SEEN", "DONE", "VERSION", "KEY")
            + (("RATE",) if rates is not None else ())]
    for w in status["workers"]:
        state = "alive" if w["alive"] else w["state"]
        row = (w["host"], w["id"], str(w["pid"]), str(w["concurrency"]), state, _ago(w["last_seen_ago"]),
               str(w["done"]), _build(w), w.get("key") or "-")
        if rates is not None:
            row += (f"{rates[w['id']]:.1f}/s" if w["id"] in rates else "-",)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.append(f"workers  {sum(1 for w in status['workers'] if w['alive'])} alive")
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    keys = status.get("keyring")
    if keys:  # fingerprints (sha256 prefixes), never keys
        lines.append(f"authkeys  {', '.join(keys['ring'])} (the master's ring); this client's: {keys['caller']}")
    for peer in status.get("rejected", []):
        lines.append(f"refused  {peer['host']}: {peer['count']} time(s), last {_ago(peer['seconds_ago'])}: "
                     f"{peer['reason']}")
    return lines


def _watch(args) -> int:
    """`status --watch`: the status every --interval, with each worker's rate (results/s
    between two looks); redrawn in place on a terminal, else plain tables separated by a
    blank line (with --json: one object per line). Runs until Ctrl-C, exit 0."""
    from node.client import Client

    tty = sys.stdout.isatty() and not args.json
    client = Client.connect(_master_address(args), args.authkey_file, retry_for=0)  # fails now if unreachable
    before = None  # (monotonic, {worker id: done}) at the previous look
    try:
        for frame in itertools.count():
            now = time.monotonic()
            try:
                status = client.status()
            except (MasterUnavailable, StorageError, RemoteError) as exc:
                status, lines = {"error": str(exc)}, [f"{exc} (retrying)"]
            else:
                done = {w["id"]: w["done"] for w in status["workers"]}
                rates = {}
                if before is not None and now > before[0]:
                    rates = {w: max(0, n - before[1][w]) / (now - before[0]) for w, n in done.items() if w in before[1]}
                before = (now, done)
                lines = status_lines(status, rates)
            lines.insert(0, f"taskfleet status at {time.strftime('%H:%M:%S')}, every {args.interval:g} s "
                            "(Ctrl-C to stop)")
            if args.json:
                text = json.dumps(status) + "\n"
            elif tty:  # cursor home (the screen cleared the first time), each line cleared to its end, then the rest
                text = "\x1b[H" + ("" if frame else "\x1b[2J") + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J"
            else:
                text = ("\n" if frame else "") + "\n".join(lines) + "\n"
            sys.stdout.write(text)
            sys.stdout.flush()
            time.sleep(max(0.0, args.interval - (time.monotonic() - now)))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `status --watch | head`: nobody reads any more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 0
    finally:
        client.close()
    return 0


def main(argv=None) -> int:
    """Run one subcommand; the exit code (see EXIT_*). Errors are one line on stderr."""
    try:
        args = parse_args(argv)
        setup_logging(args.log_level)
        return _run(args)
    except (ConfigError, AuthenticationError) as exc:
        print(f"taskfleet: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (MasterUnavailable, StorageError, RemoteError) as exc:  # the master is away, or cannot serve now
        print(f"taskfleet: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (ValueError, LookupError, PermissionError) as exc:  # refused by the master: nothing was queued
        print(f"taskfleet: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


LISTEN_ERRORS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def _run_master(args) -> int:
    """Check the configuration (exit 2 on a bad one), then serve until stopped."""
    if not args.state_dir:
        raise ConfigError("no state directory: pass --state-dir DIR or set TASKFLEET_STATE_DIR")
    from node.wire import Keyring

    keyring = Keyring(args.authkey_file)  # read now: exit 2 if unusable; then again whenever it changes
    check_state_dir(args.state_dir)
    if args.plain_listen and not args.tls_dir:
        raise ConfigError("--plain-listen (env TASKFLEET_PLAIN_LISTEN) needs --tls-dir: without TLS, --listen is "
                          "plaintext already")
    tls = TLS(args.tls_dir, server=True) if args.tls_dir else None
    from node.master import run_master

    try:
        return run_master(args.listen, keyring, args.state_dir, _modules(args), worker_ttl=args.worker_ttl,
                          max_payload=args.max_payload, durability=args.durability, retention=args.retention,
                          max_jobs=args.max_jobs, metrics_listen=args.metrics_listen, tls=tls,
                          plain_listen=args.plain_listen)
    except OSError as exc:
        if exc.filename is not None or not (isinstance(exc, socket.gaierror) or exc.errno in LISTEN_ERRORS):
            raise  # not the listening socket's
        reason = f"cannot listen on {format_address(args.listen)}: {exc.strerror or exc}"
        if exc.errno == errno.EACCES:
            raise ConfigError(f"{reason} (a port below 1024 needs privileges)") from None
        # Maybe passing (the address not up yet at boot, the old master still exiting): exit 1, restarted.
        print(f"taskfleet: error: {reason}", file=sys.stderr)
        return 1


def _run_worker(args) -> int:
    """Check the key file once (exit 2 if unusable); the worker re-reads it whenever it changes."""
    master = _master_address(args)
    read_authkey(args.authkey_file)
    tls = TLS(args.tls_dir) if args.tls_dir else None
    from node.worker import Worker

    worker = Worker(master, args.authkey_file, args.concurrency, _modules(args), args.drain_timeout, tls=tls,
                    name=args.name)
    return worker.run()


def _run(args) -> int:
    if args.command == "master":
        return _run_master(args)
    if args.command == "worker":
        return _run_worker(args)
    if args.command == "submit":
        items = [[_parse_arg(a)] for a in args.args]
        if args.args_file:
            items += _read_args_file(args.args_file)
        if not items:
            raise ConfigError("nothing to submit: give ARGs or --args-file")
        with _client(args) as client:
            job = client.submit(args.task, items, timeout=args.timeout, retries=args.retries)
            if not args.wait:
                print(job.id)
                return 0
            return _follow(job, args.json, wait=True)
    if args.command == "status" and args.watch:
        return _watch(args)
    if args.command == "status":
        with _client(args) as client:
            status = client.status()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            print_status(status)
        return 0
    if args.command == "forget":
        with _client(args) as client:
            for host in args.hosts:
                print(f"forgot {client.call('forget', host)} worker(s) of {host}")
        return 0
    if args.command == "results":
        with _client(args) as client:
            return _follow(client.job(args.job), args.json, wait=args.wait, failed_only=args.failed)
    raise AssertionError(args.command)
