"""Command line: `python -m node SUBCOMMAND` or `python3 taskfleet-node-VERSION.pyz SUBCOMMAND`.

Every flag can come from the environment (TASKFLEET_*), so services pass their
configuration by file and nothing secret ever sits in a process's arguments; the
authkey itself is only ever read from a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from multiprocessing import AuthenticationError

from node import __version__
from node.config import ConfigError, parse_address, read_authkey, setup_logging
from node.transport import MasterUnavailable

EXIT_FAILED_TASKS, EXIT_CONFIG, EXIT_UNREACHABLE = 1, 2, 3


def _env(name: str, default=None):
    return os.environ.get(name, default)


def _add_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--authkey-file", default=_env("TASKFLEET_AUTHKEY_FILE"), metavar="PATH",
                   help="file holding the shared authkey (env TASKFLEET_AUTHKEY_FILE); must not be readable by others")


def _add_master(p: argparse.ArgumentParser) -> None:
    p.add_argument("--master", default=_env("TASKFLEET_MASTER"), metavar="HOST:PORT",
                   help="the master's address (env TASKFLEET_MASTER)")
    _add_key(p)


def _add_modules(p: argparse.ArgumentParser) -> None:
    env = [m for m in _env("TASKFLEET_TASKS_MODULES", "").split(",") if m.strip()]
    p.add_argument("--tasks-module", action="append", default=None, metavar="MODULE",
                   help="extra tasks: an importable module or a .py file; repeatable "
                        "(env TASKFLEET_TASKS_MODULES, comma-separated)")
    p.set_defaults(env_modules=env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskfleet-node",
        description="taskfleet node agents: a durable master/worker task system on multiprocessing.managers.",
        epilog="Exit codes: 0 ok, 1 some tasks failed, 2 bad configuration or input (incl. wrong authkey), "
               "3 master unreachable.",
    )
    parser.add_argument("--version", action="version", version=f"taskfleet-node {__version__}")
    parser.add_argument("--log-level", default=_env("TASKFLEET_LOG_LEVEL", "INFO"),
                        help="DEBUG, INFO, WARNING or ERROR (env TASKFLEET_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("master", help="serve the task queue and the ledger",
                       description="Run the master: accepts jobs, leases tasks to workers, stores results.")
    p.add_argument("--listen", default=_env("TASKFLEET_LISTEN", "0.0.0.0:5000"), metavar="HOST:PORT",
                   help="address to listen on (env TASKFLEET_LISTEN; default 0.0.0.0:5000)")
    p.add_argument("--state-dir", default=_env("TASKFLEET_STATE_DIR"), metavar="DIR",
                   help="where the ledger lives (env TASKFLEET_STATE_DIR)")
    _add_key(p)
    _add_modules(p)
    p.add_argument("--worker-ttl", type=float, default=float(_env("TASKFLEET_WORKER_TTL", "10")), metavar="S",
                   help="a worker silent this long is lost and its leases go back to the queue (default 10)")
    p.add_argument("--max-payload", type=int, default=int(_env("TASKFLEET_MAX_PAYLOAD", str(1024 * 1024))),
                   metavar="BYTES", help="largest pickled arguments or result of one task (default 1 MiB)")

    p = sub.add_parser("worker", help="run tasks leased from the master",
                       description="Run a worker: leases tasks and runs them in a process pool.")
    _add_master(p)
    p.add_argument("--concurrency", type=int, default=int(_env("TASKFLEET_CONCURRENCY", "0")) or None,
                   metavar="N", help="processes in the pool (env TASKFLEET_CONCURRENCY; default: one per CPU)")
    _add_modules(p)
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, how long to let running tasks finish before handing them back (default 30)")

    p = sub.add_parser("submit", help="submit a job",
                       description="Submit a job: one task per ARG (`submit square 1 2 3` is three tasks), "
                                   "or one per line of --args-file. An ARG that parses as JSON is that value, "
                                   "otherwise the plain string.")
    _add_master(p)
    p.add_argument("task", help="task name, e.g. square, sleep, burn, fail")
    p.add_argument("args", nargs="*", metavar="ARG", help="one task's single argument")
    p.add_argument("--args-file", metavar="FILE", help="one JSON array of arguments per line ('-' for stdin)")
    p.add_argument("--wait", action="store_true", help="wait for every result (else print the job id)")
    p.add_argument("--json", action="store_true", help="with --wait: one JSON object per task result")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds one task may run (default 300)")
    p.add_argument("--retries", type=int, metavar="N", help="attempts after the first for a failing task (default 2)")

    p = sub.add_parser("status", help="show the master's view of the fleet")
    _add_master(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("results", help="show a job's results")
    _add_master(p)
    p.add_argument("job", type=int, metavar="JOB_ID")
    p.add_argument("--json", action="store_true", help="one JSON object per task result")
    p.add_argument("--wait", action="store_true", help="wait until every task has a result")
    return parser


def _modules(args) -> list:
    return args.tasks_module if args.tasks_module is not None else args.env_modules


def _master_address(args):
    if not args.master:
        raise ConfigError("no master address: pass --master HOST:PORT or set TASKFLEET_MASTER")
    return parse_address(args.master)


def _client(args):
    from node.client import Client

    return Client.connect(_master_address(args), args.authkey_file)


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


def _follow(job, as_json: bool, wait: bool) -> int:
    """Stream a job's results; print a per-host summary. Exit 1 if any task failed."""
    tty = sys.stderr.isatty() and wait
    started, hosts, failures, count = time.monotonic(), Counter(), [], 0
    last_draw = 0.0
    for result in job.results(wait=wait):
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
    if not as_json:
        total = job.info.get("total", count)
        print(f"job {job.id} ({job.task}): {count}/{total} results, {count - len(failures)} ok, {len(failures)} failed")
        for host, n in sorted(hosts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            print(f"  {host or '(no host)'}: {n} task(s)")
        for result in sorted(failures, key=lambda r: r.index)[:20]:
            print(f"  task {result.index} failed after {result.attempts} attempt(s): {result.error.splitlines()[0]}")
    return EXIT_FAILED_TASKS if failures else 0


def _ago(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def print_status(status: dict) -> None:
    m, t = status["master"], status["tasks"]
    print(f"master {m['address']} (taskfleet {m['version']}, up {m['uptime']:.0f} s)")
    print(f"tasks  {t['queued']} queued, {t['leased']} leased, {t['done']} done, {t['failed']} failed "
          f"in {t['jobs']} job(s); throughput {status['throughput']} tasks/s (last 10 s)")
    rows = [("HOST", "WORKER", "PID", "PROCS", "STATE", "LAST SEEN", "DONE")]
    for w in status["workers"]:
        state = "alive" if w["alive"] else w["state"]
        rows.append((w["host"], w["id"], str(w["pid"]), str(w["concurrency"]), state, _ago(w["last_seen_ago"]),
                     str(w["done"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"workers  {sum(1 for w in status['workers'] if w['alive'])} alive")
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"taskfleet: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AuthenticationError as exc:
        print(f"taskfleet: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except MasterUnavailable as exc:
        print(f"taskfleet: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (ValueError, LookupError) as exc:  # rejected by the master: nothing was queued
        print(f"taskfleet: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _run(args) -> int:
    if args.command == "master":
        from node.master import run_master

        if not args.state_dir:
            raise ConfigError("no state directory: pass --state-dir DIR or set TASKFLEET_STATE_DIR")
        listen = parse_address(args.listen, default_host="0.0.0.0")
        key = read_authkey(args.authkey_file)
        try:
            return run_master(listen, key, args.state_dir, _modules(args), args.worker_ttl, args.max_payload)
        except OSError as exc:
            print(f"taskfleet: error: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    if args.command == "worker":
        from node.worker import Worker

        worker = Worker(_master_address(args), read_authkey(args.authkey_file), args.concurrency,
                        _modules(args), args.drain_timeout)
        return worker.run()
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
    if args.command == "status":
        with _client(args) as client:
            status = client.status()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            print_status(status)
        return 0
    if args.command == "results":
        with _client(args) as client:
            return _follow(client.job(args.job), args.json, wait=args.wait)
    raise AssertionError(args.command)
