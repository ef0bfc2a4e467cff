"""Unit tests: config (addresses, authkey, durations, sizes, state dir), the task registry,
CLI argument handling."""

import errno
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest

from node import cli, config
from node.config import ConfigError, parse_address, parse_count, parse_duration, parse_size, read_authkey
from node.tasks import Registry, UnknownTask

from conftest import ROOT, TEST_TASKS, base_env, write_key

# -- config ------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.5:5000", ("10.0.0.5", 5000)),
    ("host:1", ("host", 1)),
    (" host:65535 ", ("host", 65535)),
    ("host", ("host", 5000)),
    (":6000", ("", 6000)),
    ("[::1]:7000", ("::1", 7000)),
    ("[::1]", ("::1", 5000)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


def test_parse_address_default_host():
    assert parse_address(":6000", default_host="0.0.0.0") == ("0.0.0.0", 6000)
    assert parse_address("h:1", default_host="0.0.0.0") == ("h", 1)


@pytest.mark.parametrize("text, message", [
    ("", "empty address"),
    ("host:0", "bad port"),
    ("host:65536", "bad port"),
    ("host:http", "bad port"),
    ("host:-1", "bad port"),
    ("::1:5000", "IPv6"),
])
def test_parse_address_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_address(text)


def test_format_address_round_trip():
    for address in (("10.0.0.1", 5000), ("::1", 80)):
        assert parse_address(config.format_address(address)) == address


def test_read_authkey_strips_trailing_whitespace(tmp_path):
    key = write_key(tmp_path / "k", b"  abc def\n\r\n\t ")
    assert read_authkey(str(key)) == b"  abc def"


def test_read_authkey_keeps_binary_bytes(tmp_path):
    key = write_key(tmp_path / "k", bytes(range(33, 256)))
    assert read_authkey(str(key)) == bytes(range(33, 256))


@pytest.mark.parametrize("mode", [0o604, 0o644, 0o666, 0o602])
def test_read_authkey_refuses_a_file_others_can_access(tmp_path, mode):
    key = write_key(tmp_path / "k", b"abc", mode)
    with pytest.raises(ConfigError, match="accessible by others") as err:
        read_authkey(str(key))
    assert "chmod 600" in str(err.value)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400])
def test_read_authkey_accepts_owner_and_group_modes(tmp_path, mode):
    assert read_authkey(str(write_key(tmp_path / "k", b"abc", mode))) == b"abc"


def test_read_authkey_empty_or_blank_file(tmp_path):
    for content in (b"", b" \n\n"):
        key = write_key(tmp_path / "k", content)
        with pytest.raises(ConfigError, match="is empty"):
            read_authkey(str(key))


def test_read_authkey_missing_file_or_no_path(tmp_path):
    with pytest.raises(ConfigError, match="cannot read authkey file"):
        read_authkey(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no authkey file"):
        read_authkey(None)
    with pytest.raises(ConfigError, match="no authkey file"):
        read_authkey("")


@pytest.mark.parametrize("text, seconds", [
    ("10", 10.0), ("1.5", 1.5), (".5", 0.5), ("10s", 10.0), ("90S", 90.0), ("5m", 300.0), ("2h", 7200.0),
    ("7d", 604800.0), (" 1.5m ", 90.0), ("2 h", 7200.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "10x", "ten", "1e3", "inf", "nan", "0", "0s", "-1", "-5m", "1 0", "5mm"])
def test_parse_duration_errors_quote_the_value_and_the_rules(text):
    with pytest.raises(ConfigError) as err:
        parse_duration(text)
    assert str(err.value) == f"{text!r} is not a duration above 0 ({config.DURATION_RULES})"


def test_parse_duration_zero_when_allowed():
    assert parse_duration("0", allow_zero=True) == 0.0
    with pytest.raises(ConfigError, match="is not a duration of 0 or more"):
        parse_duration("-1", allow_zero=True)


@pytest.mark.parametrize("text, size", [
    ("1048576", 1048576), ("1", 1), ("100B", 100), ("512KiB", 512 * 1024), ("1MiB", 2**20), ("1mib", 2**20),
    ("1M", 2**20), ("2K", 2048), ("1G", 2**30), ("1GiB", 2**30), ("1MB", 10**6), ("1kb", 1000), ("2GB", 2 * 10**9),
    ("1.5MiB", 1572864), ("1.1MB", 1100000), ("0.5KiB", 512), (" 64 KiB ", 65536),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "0MiB", "-1", "1.5", "1.5B", "0.0001KB", "1TB", "1Mb/s", "many", "1e6"])
def test_parse_size_errors_quote_the_value_and_the_rules(text):
    with pytest.raises(ConfigError) as err:
        parse_size(text)
    assert str(err.value) == f"{text!r} is not a size above 0 ({config.SIZE_RULES})"


def test_parse_count_and_choice():
    assert parse_count("4") == 4 and parse_count(" 10000 ") == 10000 and parse_count("0", minimum=0) == 0
    for text, minimum in (("0", 1), ("-1", 0), ("many", 1), ("1.5", 1), ("", 1)):
        with pytest.raises(ConfigError, match=f"is not a whole number of {minimum} or more"):
            parse_count(text, minimum=minimum)
    assert config.parse_choice("FAST", ("full", "fast")) == "fast"
    with pytest.raises(ConfigError, match="'slow' is not one of full, fast"):
        config.parse_choice("slow", ("full", "fast"))


def test_state_dir_is_made_when_missing(tmp_path):
    config.check_state_dir(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


def test_state_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=f"^state dir {tmp_path / 'f'} is not a directory$"):
        config.check_state_dir(str(tmp_path / "f"))
    with pytest.raises(ConfigError, match=f"^cannot use state dir {tmp_path / 'f' / 'sub'}: Not a directory$"):
        config.check_state_dir(str(tmp_path / "f" / "sub"))


def test_state_dir_that_cannot_be_written(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a mode allows: sysfs refuses even root
        # (read-only inside a container, such as the local cluster's nodes)
        places, reason = [Path("/sys/taskfleet-test-state")], "(Operation not permitted|Read-only file system)"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        places, reason = [locked, locked / "state"], "Permission denied"
    for place in places:
        with pytest.raises(ConfigError, match=f"^cannot use state dir {place}: {reason}$"):
            config.check_state_dir(str(place))


# -- the task registry ---------------------------------------------------------------


def test_builtin_tasks():
    reg = Registry()
    assert reg.names() == ["burn", "fail", "sleep", "square"]
    assert reg.get("square")(7) == 49
    with pytest.raises(RuntimeError, match="boom"):
        reg.get("fail")("boom")
    assert reg.get("burn")(1) > 0


def test_unknown_task_names_the_known_ones():
    with pytest.raises(UnknownTask, match=r"unknown task 'nope' \(known: burn, fail, sleep, square\)"):
        Registry().get("nope")


@pytest.mark.parametrize("args", [[], [1, 2], (1, 2, 3)])
def test_arity_check_rejects_wrong_counts(args):
    with pytest.raises(TypeError, match=r"square\(\) takes 1 argument\(s\), got"):
        Registry().check_arguments("square", args)


@pytest.mark.parametrize("args", [5, "abc", {"n": 1}, None])
def test_arity_check_rejects_non_lists(args):
    with pytest.raises(TypeError, match="arguments must be a list"):
        Registry().check_arguments("square", args)


def test_arity_check_with_defaults_and_varargs(tmp_path):
    module = tmp_path / "flex.py"
    module.write_text("def opt(a, b=1):\n    return a + b\n\ndef many(a, *rest):\n    return a\n")
    reg = Registry([str(module)])
    reg.check_arguments("opt", [1])
    reg.check_arguments("opt", (1, 2))
    with pytest.raises(TypeError, match="takes 1 to 2"):
        reg.check_arguments("opt", [1, 2, 3])
    reg.check_arguments("many", [1, 2, 3, 4])
    with pytest.raises(TypeError, match="at least 1"):
        reg.check_arguments("many", [])
    reg.check_arguments("square", [3])


def test_tasks_module_file_public_functions_only(tmp_path):
    module = tmp_path / "mine.py"
    module.write_text("import os\nfrom os.path import join\n\ndef cube(n):\n    return n ** 3\n\n"
                      "def _private():\n    pass\n\nVALUE = 3\n")
    reg = Registry([str(module)])
    assert reg.get("cube")(2) == 8
    assert "_private" not in reg.names() and "join" not in reg.names() and "VALUE" not in reg.names()
    assert "square" in reg.names()


def test_tasks_module_with_tasks_dict(tmp_path):
    module = tmp_path / "explicit.py"
    module.write_text("def helper(n):\n    return n\n\ndef _impl(n):\n    return -n\n\nTASKS = {'neg': _impl}\n")
    reg = Registry([str(module)])
    assert reg.get("neg")(3) == -3
    assert "helper" not in reg.names()


def test_tests_tasks_module_loads():
    reg = Registry([str(TEST_TASKS)])
    assert {"crash", "blob", "touch"} <= set(reg.names())
    assert reg.get("blob")(3) == b"xxx"


def test_importable_tasks_module():
    reg = Registry(["node.tasks"])  # re-registering the very same functions is no clash
    assert reg.get("square") is Registry().get("square")


BROKEN_MODULES = {  # file content -> the first line of the error, kept in the message
    "def f(:\n    pass\n": "SyntaxError: ",
    "import no_such_module_here\n": "ModuleNotFoundError: No module named 'no_such_module_here'",
    "raise RuntimeError('setup failed\\nsecond line')\n": "RuntimeError: setup failed",
    "import sys\nsys.exit(3)\n": "SystemExit: 3",
    "def square(n):\n    return 0\n": "task 'square' clashes with one already registered",
    "TASKS = ['square']\n": "TASKS must be a dict of name: function",
}


@pytest.mark.parametrize("content", BROKEN_MODULES)
def test_a_tasks_module_that_cannot_load_is_a_config_error(tmp_path, content):
    module = tmp_path / "broken.py"
    module.write_text(content)
    with pytest.raises(ConfigError) as err:
        Registry([str(module)])
    message = str(err.value)
    assert message.startswith(f"cannot load tasks module {module}: {BROKEN_MODULES[content]}")
    assert "\n" not in message


@pytest.mark.parametrize("name, reason", [
    ("/nonexistent/absent.py", "FileNotFoundError: no such file"),
    ("no_such_package.tasks", "ModuleNotFoundError: No module named 'no_such_package'"),
    ("", "ValueError: Empty module name"),
])
def test_a_missing_tasks_module_is_a_config_error(name, reason):
    with pytest.raises(ConfigError, match=f"^cannot load tasks module {name}: {reason}$"):
        Registry([name])


def test_two_modules_with_the_same_task_clash(tmp_path):
    (tmp_path / "one.py").write_text("def cube(n):\n    return n ** 3\n")
    (tmp_path / "two.py").write_text("def cube(n):\n    return 0\n")
    with pytest.raises(ConfigError, match=r"two.py: task 'cube' clashes"):
        Registry([str(tmp_path / "one.py"), str(tmp_path / "two.py")])


def test_registry_survives_pickling_for_spawned_children(tmp_path):
    """A spawned pool child gets the registry pickled: a file-loaded module's functions do
    not pickle (the module is not importable), so the registry travels as its module list."""
    module = tmp_path / "mine2.py"
    module.write_text("def cube(n):\n    return n ** 3\n")
    reg = Registry([str(module), str(TEST_TASKS)])
    blob = pickle.dumps(reg)
    copy = pickle.loads(blob)
    assert copy.modules == reg.modules and copy.names() == reg.names()
    assert copy.get("cube")(3) == 27 and copy.get("square")(3) == 9
    # and in a fresh interpreter, as a spawned child is
    child = subprocess.run([sys.executable, "-c", "import pickle, sys; reg = pickle.loads(sys.stdin.buffer.read()); "
                            "print(reg.get('cube')(4), reg.get('blob')(2))"],
                           input=blob, capture_output=True, cwd=str(ROOT), env=base_env(), timeout=60)
    assert child.returncode == 0, child.stderr.decode()
    assert child.stdout.decode().split() == ["64", "b'xx'"]


# -- the command line ----------------------------------------------------------------


def test_parse_arg_json_or_string():
    assert cli._parse_arg("3") == 3
    assert cli._parse_arg("0.5") == 0.5
    assert cli._parse_arg('"3"') == "3"
    assert cli._parse_arg("[1, 2]") == [1, 2]
    assert cli._parse_arg("hello") == "hello"
    assert cli._parse_arg("null") is None


def test_read_args_file(tmp_path):
    path = tmp_path / "args"
    path.write_text('[1]\n\n[2, "x"]\n  \n[]\n')
    assert cli._read_args_file(str(path)) == [[1], [2, "x"], []]


@pytest.mark.parametrize("line, message", [("5", "expected a JSON array"), ("{'a'", "not JSON"),
                                           ('{"a": 1}', "expected a JSON array")])
def test_read_args_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "args"
    path.write_text(f"[1]\n{line}\n")
    with pytest.raises(ConfigError, match=f"{path}:2: {message}"):
        cli._read_args_file(str(path))


@pytest.fixture
def no_env(monkeypatch):
    """No TASKFLEET_* variable from the caller's environment."""
    for name in [n for n in os.environ if n.startswith("TASKFLEET_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_parse_args_from_env(no_env):
    env = {
        "TASKFLEET_MASTER": "m:1234", "TASKFLEET_AUTHKEY_FILE": "/k", "TASKFLEET_CONCURRENCY": "3",
        "TASKFLEET_TASKS_MODULES": "a.b, c.py ,", "TASKFLEET_LISTEN": "127.0.0.1:6000", "TASKFLEET_STATE_DIR": "/s",
        "TASKFLEET_WORKER_TTL": "2.5", "TASKFLEET_MAX_PAYLOAD": "1000", "TASKFLEET_DRAIN_TIMEOUT": "1m",
        "TASKFLEET_DURABILITY": "fast", "TASKFLEET_RETENTION": "2h", "TASKFLEET_MAX_JOBS": "50",
        "TASKFLEET_LOG_LEVEL": "debug",
    }
    for name, value in env.items():
        no_env.setenv(name, value)
    worker = cli.parse_args(["worker"])
    assert (worker.master, worker.authkey_file, worker.concurrency, worker.drain_timeout, worker.log_level) == \
        (("m", 1234), "/k", 3, 60.0, "DEBUG")
    assert cli._modules(worker) == ["a.b", "c.py"]
    assert cli._modules(cli.parse_args(["worker", "--tasks-module", "x"])) == ["x"]
    master = cli.parse_args(["master"])
    assert (master.listen, master.state_dir, master.worker_ttl, master.max_payload) == \
        (("127.0.0.1", 6000), "/s", 2.5, 1000)
    assert (master.durability, master.retention, master.max_jobs) == ("fast", 7200.0, 50)


def test_flags_override_env(no_env):
    no_env.setenv("TASKFLEET_MASTER", "m:1234")
    no_env.setenv("TASKFLEET_CONCURRENCY", "many")  # never parsed: the flag wins
    worker = cli.parse_args(["worker", "--master", "o:1", "--concurrency", "2", "--drain-timeout", "0"])
    assert (worker.master, worker.concurrency, worker.drain_timeout) == (("o", 1), 2, 0.0)
    master = cli.parse_args(["master", "--worker-ttl", "1.5", "--max-payload", "512KiB", "--durability", "full",
                             "--retention", "30m", "--max-jobs", "7"])
    assert (master.worker_ttl, master.max_payload, master.durability, master.retention, master.max_jobs) == \
        (1.5, 524288, "full", 1800.0, 7)


def test_defaults_without_env(no_env):
    no_env.setenv("TASKFLEET_CONCURRENCY", "")  # empty counts as unset
    args = cli.parse_args(["submit", "square", "1", "2", "--wait", "--json", "--timeout", "3", "--retries", "0"])
    assert (args.task, args.args, args.wait, args.json, args.timeout, args.retries) == \
        ("square", ["1", "2"], True, True, 3.0, 0)
    assert args.master is None and args.log_level == "INFO"
    assert cli.parse_args(["submit", "square"]).timeout is None  # the master's default
    worker = cli.parse_args(["worker"])
    assert (worker.concurrency, worker.drain_timeout) == (None, 30.0)
    assert cli.parse_args(["worker", "--concurrency", "0"]).concurrency is None  # 0: one per CPU
    master = cli.parse_args(["master"])
    assert (master.listen, master.state_dir, master.worker_ttl, master.max_payload) == \
        (("0.0.0.0", 5000), None, 10.0, 1048576)
    assert (master.durability, master.retention, master.max_jobs) == ("full", 604800.0, 10000)
    assert cli._modules(master) == []
    with pytest.raises(ConfigError, match="no master address"):
        cli._master_address(args)


BAD_VALUES = [  # (subcommand, flag, env var, value, what the message must say is expected)
    ("master", "--worker-ttl", "TASKFLEET_WORKER_TTL", "10x", "a duration above 0"),
    ("master", "--worker-ttl", "TASKFLEET_WORKER_TTL", "0", "a duration above 0"),
    ("master", "--max-payload", "TASKFLEET_MAX_PAYLOAD", "0", "a size above 0"),
    ("master", "--max-payload", "TASKFLEET_MAX_PAYLOAD", "1 TB", "a size above 0"),
    ("master", "--durability", "TASKFLEET_DURABILITY", "safe", "one of full, fast"),
    ("master", "--retention", "TASKFLEET_RETENTION", "0", "a duration above 0"),
    ("master", "--retention", "TASKFLEET_RETENTION", "a week", "a duration above 0"),
    ("master", "--max-jobs", "TASKFLEET_MAX_JOBS", "0", "a whole number of 1 or more"),
    ("master", "--max-jobs", "TASKFLEET_MAX_JOBS", "1e4", "a whole number of 1 or more"),
    ("master", "--listen", "TASKFLEET_LISTEN", "host:99999", "a number from 1 to 65535"),
    ("master", "--metrics-listen", "TASKFLEET_METRICS_LISTEN", "host:99999", "a number from 0 to 65535"),
    ("master", "--log-level", "TASKFLEET_LOG_LEVEL", "loud", "one of DEBUG, INFO, WARNING, ERROR"),
    ("worker", "--concurrency", "TASKFLEET_CONCURRENCY", "many", "a whole number of 0 or more"),
    ("worker", "--concurrency", "TASKFLEET_CONCURRENCY", "-1", "a whole number of 0 or more"),
    ("worker", "--drain-timeout", "TASKFLEET_DRAIN_TIMEOUT", "-1", "a duration of 0 or more"),
    ("worker", "--master", "TASKFLEET_MASTER", "::1:5000", "[ADDR]:PORT"),
]


@pytest.mark.parametrize("source", ["flag", "env"])
@pytest.mark.parametrize("command, flag, env, value, expected", BAD_VALUES)
def test_a_bad_value_names_flag_env_value_and_what_is_expected(no_env, source, command, flag, env, value, expected):
    if source == "env":
        no_env.setenv(env, value)
        argv = [command]
    else:  # --log-level is a top-level flag, the others the subcommand's
        argv = [flag, value, command] if flag == "--log-level" else [command, flag, value]
    with pytest.raises(ConfigError) as err:
        cli.parse_args(argv)
    message = str(err.value)
    assert message.startswith(f"{flag} (env {env}): ")
    assert repr(value) in message and expected in message


@pytest.mark.parametrize("flag, value", [("--timeout", "0"), ("--timeout", "soon"), ("--retries", "-1")])
def test_bad_submit_values(no_env, flag, value):
    with pytest.raises(ConfigError, match=f"^{flag}: '{value}' is not "):
        cli.parse_args(["submit", "square", "1", flag, value])


def test_usage_errors_are_one_line_exit_2(capsys):
    for argv in (["worker", "--bogus"], [], ["results", "x"], ["master", "--worker-ttl"]):
        with pytest.raises(SystemExit) as exited:
            cli.parse_args(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("taskfleet: error: ") and err.count("\n") == 1 and "usage:" not in err, err


class Recorder:
    """Stands in for the engine: records how the command line calls it."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        Recorder.calls.append(("Worker", args, kwargs))

    def run(self):
        return 0

    @staticmethod
    def run_master(*args, **kwargs):
        Recorder.calls.append(("run_master", args, kwargs))
        return 0


@pytest.fixture
def engine(monkeypatch, no_env):
    """node.master and node.worker replaced by Recorder (the real ones are not imported)."""
    Recorder.calls = []
    monkeypatch.setitem(sys.modules, "node.master", types.SimpleNamespace(run_master=Recorder.run_master))
    monkeypatch.setitem(sys.modules, "node.worker", types.SimpleNamespace(Worker=Recorder))
    return Recorder.calls


def test_master_gets_its_settings_as_keywords(engine, tmp_path):
    key = write_key(tmp_path / "k")
    assert cli.main(["master", "--listen", "127.0.0.1:7000", "--state-dir", str(tmp_path / "state"),
                     "--authkey-file", str(key), "--worker-ttl", "30s", "--max-payload", "2MB",
                     "--durability", "fast", "--retention", "1d", "--max-jobs", "99", "--tasks-module", "m"]) == 0
    ((name, args, kwargs),) = engine
    assert name == "run_master"
    listen, keyring, state, modules = args
    assert (listen, state, modules) == (("127.0.0.1", 7000), str(tmp_path / "state"), ["m"])
    assert keyring.path == str(key) and keyring.keys() == [b"s3cret-agents-key"]  # the file, read again on change
    assert kwargs == {"worker_ttl": 30.0, "max_payload": 2000000, "durability": "fast", "retention": 86400.0,
                      "max_jobs": 99, "metrics_listen": ("127.0.0.1", 9464), "tls": None, "plain_listen": None}
    assert (tmp_path / "state").is_dir()


def test_worker_gets_the_key_file_path_after_one_check(engine, tmp_path):
    key = write_key(tmp_path / "k")
    assert cli.main(["worker", "--master", "m:1", "--authkey-file", str(key), "--concurrency", "4",
                     "--drain-timeout", "5m", "--tasks-module", "a", "--tasks-module", "b"]) == 0
    assert engine == [("Worker", (("m", 1), str(key), 4, ["a", "b"], 300.0), {"tls": None, "name": None})]
    loose = write_key(tmp_path / "loose", b"k", 0o644)
    assert cli.main(["worker", "--master", "m:1", "--authkey-file", str(loose)]) == 2
    assert len(engine) == 1  # a bad key file at first start: no worker


@pytest.mark.parametrize("error, code, message", [
    (OSError(errno.EADDRINUSE, "Address already in use"), 1, "cannot listen on 127.0.0.1:7000: Address already in use"),
    (OSError(errno.EACCES, "Permission denied"), 2,
     "cannot listen on 127.0.0.1:7000: Permission denied (a port below 1024 needs privileges)"),
])
def test_master_listen_errors(no_env, monkeypatch, tmp_path, capsys, error, code, message):
    """Exit 1 (restarted) when it may pass, 2 when the configuration must change."""
    def run_master(*args, **kwargs):
        raise error

    monkeypatch.setitem(sys.modules, "node.master", types.SimpleNamespace(run_master=run_master))
    argv = ["master", "--listen", "127.0.0.1:7000", "--state-dir", str(tmp_path), "--authkey-file",
            str(write_key(tmp_path / "k"))]
    assert cli.main(argv) == code
    assert capsys.readouterr().err == f"taskfleet: error: {message}\n"


def test_master_file_errors_are_not_listen_errors(no_env, monkeypatch, tmp_path, capsys):
    def run_master(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ledger.sqlite3"))

    monkeypatch.setitem(sys.modules, "node.master", types.SimpleNamespace(run_master=run_master))
    argv = ["master", "--state-dir", str(tmp_path), "--authkey-file", str(write_key(tmp_path / "k"))]
    cli.main(argv)
    err = capsys.readouterr().err
    assert "ledger.sqlite3" in err and "cannot listen" not in err


@pytest.mark.parametrize("make, message", [
    (lambda d: d.joinpath("file").write_text(""), "state dir {d}/file is not a directory"),
    (lambda d: None, "no state directory: pass --state-dir DIR or set TASKFLEET_STATE_DIR"),
])
def test_master_checks_the_state_dir_before_starting(engine, tmp_path, capsys, make, message):
    make(tmp_path)
    state = ["--state-dir", str(tmp_path / "file")] if "file" in message else []
    assert cli.main(["master", "--authkey-file", str(write_key(tmp_path / "k")), *state]) == 2
    assert capsys.readouterr().err == f"taskfleet: error: {message.format(d=tmp_path)}\n"
    assert engine == []


def test_main_config_errors_exit_2(tmp_path, capsys, monkeypatch):
    for name in ("TASKFLEET_AUTHKEY_FILE", "TASKFLEET_STATE_DIR", "TASKFLEET_MASTER"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["status", "--master", "127.0.0.1:1"]) == 2
    assert "no authkey file" in capsys.readouterr().err
    assert cli.main(["master", "--authkey-file", "/nonexistent"]) == 2
    assert "no state directory" in capsys.readouterr().err
    assert cli.main(["status", "--master", "127.0.0.1:99999", "--authkey-file", "/x"]) == 2
    assert "bad port" in capsys.readouterr().err


def test_result_as_dict_is_json():
    from node.client import Result

    good = Result(4, 2, True, 9, None, "h", 1, 0.5).as_dict("square")
    assert good == {"job": 4, "task": 2, "name": "square", "ok": True, "result": 9, "host": "h",
                    "attempts": 1, "duration": 0.5}
    failed = Result(4, 3, False, None, "boom", "h", 3, None).as_dict("fail")
    assert failed["error"] == "boom" and "result" not in failed
    json.dumps(failed)


def test_each_task_is_interrupted_at_its_own_timeout_not_an_earlier_tasks():
    """A pool process sets its alarm once for many tasks: an alarm set for an earlier
    task's deadline must not cut a later task short, and a later task with a shorter
    timeout must still be cut at its own."""
    import multiprocessing
    import time
    from multiprocessing import connection as mpc

    from node.worker.pool import Pool

    ctx = multiprocessing.get_context("fork")
    pool = Pool(ctx, 1, Registry(), ctx.RawValue("q", 1 << 20))
    try:
        chunk = [(1, "sleep", pickle.dumps((0.01,)), 0.2),  # sets the alarm for 0.2 s from now
                 (2, "sleep", pickle.dumps((0.5,)), 2.0),  # runs through that alarm
                 (3, "sleep", pickle.dumps((5.0,)), 0.3),  # a shorter deadline than the alarm's: cut
                 (4, "sleep", pickle.dumps((0.01,)), 5.0)]
        assert pool.submit(pool.slots[0], chunk, "epoch")
        outcomes, deadline = {}, time.monotonic() + 20
        while len(outcomes) < 4 and time.monotonic() < deadline:
            done, again = pool.step(mpc.wait(pool.wait_list(), 1.0))
            assert again == []
            outcomes.update((o[0], o) for o, _epoch in done)
        assert [outcomes[t][1] for t in (1, 2, 3, 4)] == [True, True, False, True], outcomes
        assert "timed out after 0.3 s" in outcomes[3][3] and 0.25 < outcomes[3][4] < 1.0  # not at 2's deadline
        assert pickle.loads(outcomes[2][2]) == 0.5
    finally:
        pool.stop()
