"""The command line end to end: `python -m node ...` against a real master and worker."""

import json
import os

import pytest

from conftest import base_env, free_port, json_lines, write_key

SUBCOMMANDS = ["master", "worker", "submit", "status", "results"]


@pytest.fixture
def running(agents):
    agents.start_master()
    agents.start_worker(concurrency=2)
    agents.wait_workers(1)
    return agents


def strip(line: dict) -> dict:
    return {k: v for k, v in line.items() if k not in ("job", "duration", "host")}


def test_submit_wait_json(running):
    out = running.cli("submit", "square", "1", "2", "3", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    lines = sorted(json_lines(out.stdout), key=lambda line: line["task"])
    assert [(line["task"], line["ok"], line["result"], line["name"]) for line in lines] == \
        [(0, True, 1, "square"), (1, True, 4, "square"), (2, True, 9, "square")]
    assert all(line["host"] == os.uname().nodename and line["attempts"] == 1 for line in lines)


def test_submit_then_results(running):
    out = running.cli("submit", "square", "4", "5", "6")
    assert out.returncode == 0, out.stderr
    job_id = int(out.stdout.strip())
    waited = running.cli("results", str(job_id), "--json", "--wait")
    assert waited.returncode == 0, waited.stderr
    again = running.cli("results", str(job_id), "--json")  # the job is finished: same lines
    assert again.returncode == 0
    assert json_lines(again.stdout) == json_lines(waited.stdout)
    lines = sorted(json_lines(waited.stdout), key=lambda line: line["task"])
    assert [(line["job"], line["result"]) for line in lines] == [(job_id, 16), (job_id, 25), (job_id, 36)]
    summary = running.cli("results", str(job_id))
    assert f"job {job_id} (square): 3/3 results, 3 ok, 0 failed" in summary.stdout


def test_submit_wait_same_lines_as_results(running):
    waited = running.cli("submit", "square", "7", "8", "--wait", "--json")
    job_id = json_lines(waited.stdout)[0]["job"]
    later = running.cli("results", str(job_id), "--json")
    assert json_lines(later.stdout) == json_lines(waited.stdout)


def test_args_file_with_json_arrays(running, tmp_path):
    args = tmp_path / "args.jsonl"
    args.write_text("[0.01]\n\n[0.02]\n")
    out = running.cli("submit", "sleep", "--args-file", str(args), "--wait", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(line["result"] for line in json_lines(out.stdout)) == [0.01, 0.02]
    stdin = running.cli("submit", "square", "--args-file", "-", "--wait", "--json", input="[3]\n[4]\n")
    assert sorted(line["result"] for line in json_lines(stdin.stdout)) == [9, 16]
    args.write_text("[1]\n5\n")
    bad = running.cli("submit", "square", "--args-file", str(args))
    assert bad.returncode == 2 and f"{args}:2: expected a JSON array" in bad.stderr


def test_failed_tasks_exit_1_with_a_summary(running):
    out = running.cli("submit", "fail", "boom", "--retries", "0", "--wait")
    assert out.returncode == 1
    assert "1/1 results, 0 ok, 1 failed" in out.stdout
    assert "task 0 failed after 1 attempt(s): RuntimeError: boom" in out.stdout
    as_json = running.cli("submit", "fail", "bang", "--retries", "0", "--wait", "--json")
    assert as_json.returncode == 1
    (line,) = json_lines(as_json.stdout)
    assert line["ok"] is False and "RuntimeError: bang" in line["error"]


def test_status_json_and_text(running):
    out = running.cli("status", "--json")
    assert out.returncode == 0
    status = json.loads(out.stdout)
    assert status["master"]["address"] == running.master_address
    assert set(status["tasks"]) >= {"queued", "leased", "done", "failed", "jobs"}
    assert len([w for w in status["workers"] if w["alive"]]) == 1
    text = running.cli("status")
    assert text.returncode == 0 and "workers  1 alive" in text.stdout and "HOST" in text.stdout


def test_env_vars_configure_the_client(running):
    env = base_env(TASKFLEET_MASTER=running.master_address, TASKFLEET_AUTHKEY_FILE=running.key)
    out = running.cli("submit", "square", "9", "--wait", "--json", env=env, with_master=False)
    assert out.returncode == 0, out.stderr
    assert json_lines(out.stdout)[0]["result"] == 81
    assert running.cli("status", env=env, with_master=False).returncode == 0


def test_rejected_submissions_exit_2_and_queue_nothing(running):
    unknown = running.cli("submit", "nope", "1")
    assert unknown.returncode == 2 and "unknown task 'nope'" in unknown.stderr
    arity = running.cli("submit", "square", "--args-file", "-", input="[1]\n[1, 2]\n")
    assert arity.returncode == 2 and "task 1: square() takes 1 argument(s), got 2" in arity.stderr
    nothing = running.cli("submit", "square")
    assert nothing.returncode == 2 and "nothing to submit" in nothing.stderr
    assert "Traceback" not in unknown.stderr + arity.stderr + nothing.stderr
    status = running.status()
    assert status["tasks"]["jobs"] == 0 and status["tasks"]["queued"] == 0


def test_unknown_job_exits_2(running):
    out = running.cli("results", "999")
    assert out.returncode == 2 and "no job 999" in out.stderr


def test_authkey_readable_by_others_is_refused(agents, tmp_path):
    loose = write_key(tmp_path / "loose", b"k", 0o644)
    for sub in (["status", "--master", "127.0.0.1:5000"], ["worker", "--master", "127.0.0.1:5000"],
                ["master", "--state-dir", str(tmp_path / "s"), "--listen", f"127.0.0.1:{free_port()}"]):
        out = agents.cli(*sub, "--authkey-file", str(loose), with_master=False, timeout=30)
        assert out.returncode == 2, (sub, out.stderr)
        assert "accessible by others" in out.stderr and "chmod 600" in out.stderr


def test_missing_configuration_exits_2(agents, tmp_path):
    out = agents.cli("status", with_master=False)
    assert out.returncode == 2 and "no master address" in out.stderr
    out = agents.cli("worker", "--master", "127.0.0.1:1", with_master=False)
    assert out.returncode == 2 and "no authkey file" in out.stderr
    out = agents.cli("master", "--authkey-file", str(agents.key), with_master=False)
    assert out.returncode == 2 and "no state directory" in out.stderr


CONFIG_ERRORS = [  # (argv, environment, what the one line says); {tmp} is the test's tmp dir
    (["master"], {"TASKFLEET_WORKER_TTL": "10x"}, "--worker-ttl (env TASKFLEET_WORKER_TTL): '10x' is not a duration"),
    (["master", "--worker-ttl", "0"], {}, "--worker-ttl (env TASKFLEET_WORKER_TTL): '0' is not a duration above 0"),
    (["master"], {"TASKFLEET_MAX_PAYLOAD": "1TB"}, "--max-payload (env TASKFLEET_MAX_PAYLOAD): '1TB' is not a size"),
    (["master", "--max-payload", "0"], {}, "'0' is not a size above 0"),
    (["master"], {"TASKFLEET_DURABILITY": "safe"}, "--durability (env TASKFLEET_DURABILITY): 'safe' is not one of"),
    (["master"], {"TASKFLEET_RETENTION": "forever"}, "--retention (env TASKFLEET_RETENTION): 'forever'"),
    (["master"], {"TASKFLEET_MAX_JOBS": "lots"}, "--max-jobs (env TASKFLEET_MAX_JOBS): 'lots'"),
    (["master", "--state-dir", "{tmp}/a-file"], {}, "state dir {tmp}/a-file is not a directory"),
    (["master", "--state-dir", "{tmp}/a-file/sub"], {}, "cannot use state dir {tmp}/a-file/sub: Not a directory"),
    (["master", "--tasks-module", "{tmp}/absent.py"], {}, "cannot load tasks module {tmp}/absent.py: FileNotFound"),
    (["master"], {"TASKFLEET_TASKS_MODULES": "{tmp}/broken.py"},
     "cannot load tasks module {tmp}/broken.py: SyntaxError"),
    (["worker"], {"TASKFLEET_CONCURRENCY": "many"}, "--concurrency (env TASKFLEET_CONCURRENCY): 'many' is not"),
    (["worker", "--concurrency", "-1"], {}, "'-1' is not a whole number of 0 or more"),
    (["worker"], {"TASKFLEET_DRAIN_TIMEOUT": "-5"}, "--drain-timeout (env TASKFLEET_DRAIN_TIMEOUT): '-5'"),
    (["worker", "--tasks-module", "no_such_module_here"], {},
     "cannot load tasks module no_such_module_here: ModuleNotFoundError: No module named 'no_such_module_here'"),
    (["worker", "--tasks-module", "{tmp}/broken.py"], {}, "cannot load tasks module {tmp}/broken.py: SyntaxError"),
    (["worker", "--bogus"], {}, "unrecognized arguments: --bogus"),
    ([], {"TASKFLEET_LOG_LEVEL": "loud"}, "--log-level (env TASKFLEET_LOG_LEVEL): 'loud' is not one of"),
]


@pytest.mark.parametrize("argv, env, message", CONFIG_ERRORS)
def test_configuration_errors_exit_2_with_one_line(agents, tmp_path, argv, env, message):
    """What systemd must not restart: exit 2, one line naming the problem, no traceback."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "broken.py").write_text("def f(:\n")
    where = {"master": ["--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state")],
             "worker": ["--master", "127.0.0.1:1"]}
    command = argv[0] if argv else "status"
    full = [command, "--authkey-file", str(agents.key), *where.get(command, []), *argv[1:]]
    if command == "status":
        full += ["--master", "127.0.0.1:1"]
    out = agents.cli(*(a.format(tmp=tmp_path) for a in full), with_master=False, timeout=30,
                    env=base_env(**{k: v.format(tmp=tmp_path) for k, v in env.items()}))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("taskfleet: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert message.format(tmp=tmp_path) in out.stderr


def test_unreachable_master_exits_3(agents):
    port = free_port()  # nothing listens there
    out = agents.cli("status", "--master", f"127.0.0.1:{port}", "--authkey-file", str(agents.key),
                    with_master=False)
    assert out.returncode == 3
    assert f"cannot reach the master at 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_port_in_use_is_a_clear_error(agents):
    agents.start_master()
    out = agents.cli("master", "--listen", agents.master_address, "--state-dir", str(agents.tmp / "other"),
                    "--authkey-file", str(agents.key), with_master=False)
    assert out.returncode != 0 and "cannot listen on" in out.stderr


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_of_each_subcommand(agents, sub):
    out = agents.cli(sub, "--help", with_master=False)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: taskfleet-node {sub}")
    assert "--authkey-file" in out.stdout


def test_version_and_top_level_help(agents):
    from node import __version__

    out = agents.cli("--version", with_master=False)
    assert out.returncode == 0 and out.stdout.strip() == f"taskfleet-node {__version__}"
    top = agents.cli("--help", with_master=False)
    assert top.returncode == 0 and all(sub in top.stdout for sub in SUBCOMMANDS)
    none = agents.cli(with_master=False)
    assert none.returncode == 2
