"""Unit tests: config (addresses, authkey), the task registry, CLI argument handling."""

import json
import pickle

import pytest

from node import cli, config
from node.config import ConfigError, parse_address, read_authkey
from node.tasks import Registry, UnknownTask

from conftest import TEST_TASKS, write_key

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


def test_tasks_module_name_clash(tmp_path):
    module = tmp_path / "clash.py"
    module.write_text("def square(n):\n    return 0\n")
    with pytest.raises(ValueError, match="'square' from .*clash.py clashes"):
        Registry([str(module)])


def test_tasks_module_missing_file(tmp_path):
    with pytest.raises(ImportError, match="no tasks file"):
        Registry([str(tmp_path / "absent.py")])


def test_registry_survives_pickling_for_spawned_children(tmp_path):
    module = tmp_path / "mine2.py"
    module.write_text("def cube(n):\n    return n ** 3\n")
    reg = Registry([str(module)])
    assert reg.modules == (str(module),)
    assert reg.get("cube")(3) == 27
    assert pickle.loads(pickle.dumps(Registry())).get("square")(3) == 9


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


def test_parser_flags_and_env_defaults(monkeypatch):
    monkeypatch.setenv("TASKFLEET_MASTER", "m:1234")
    monkeypatch.setenv("TASKFLEET_AUTHKEY_FILE", "/k")
    monkeypatch.setenv("TASKFLEET_CONCURRENCY", "3")
    monkeypatch.setenv("TASKFLEET_TASKS_MODULES", "a.b, c.py ,")
    monkeypatch.setenv("TASKFLEET_LISTEN", "127.0.0.1:6000")
    monkeypatch.setenv("TASKFLEET_STATE_DIR", "/s")
    monkeypatch.setenv("TASKFLEET_WORKER_TTL", "2.5")
    monkeypatch.setenv("TASKFLEET_MAX_PAYLOAD", "1000")
    parser = cli.build_parser()
    worker = parser.parse_args(["worker"])
    assert (worker.master, worker.authkey_file, worker.concurrency) == ("m:1234", "/k", 3)
    assert [m.strip() for m in cli._modules(worker)] == ["a.b", "c.py"]
    assert cli._modules(parser.parse_args(["worker", "--tasks-module", "x"])) == ["x"]
    master = parser.parse_args(["master"])
    assert (master.listen, master.state_dir, master.worker_ttl, master.max_payload) == \
        ("127.0.0.1:6000", "/s", 2.5, 1000)
    overridden = parser.parse_args(["worker", "--master", "o:1", "--concurrency", "2"])
    assert (overridden.master, overridden.concurrency) == ("o:1", 2)


def test_parser_without_env(monkeypatch):
    for name in ("TASKFLEET_MASTER", "TASKFLEET_CONCURRENCY", "TASKFLEET_TASKS_MODULES", "TASKFLEET_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    parser = cli.build_parser()
    args = parser.parse_args(["submit", "square", "1", "2", "--wait", "--json", "--timeout", "3", "--retries", "0"])
    assert (args.task, args.args, args.wait, args.json, args.timeout, args.retries) == \
        ("square", ["1", "2"], True, True, 3.0, 0)
    assert args.master is None
    assert parser.parse_args(["worker"]).concurrency is None
    assert parser.parse_args(["master"]).listen == "0.0.0.0:5000"
    assert cli._modules(parser.parse_args(["master"])) == []
    with pytest.raises(ConfigError, match="no master address"):
        cli._master_address(args)


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
