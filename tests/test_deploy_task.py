"""Tests of the deploy that need no cluster: ops/deploy.py (the recap parser, inventory
checks) and static guards on the playbooks (the units' settings, no_log on the authkey)."""

import re
from pathlib import Path

import jinja2
import pytest
import yaml
from invoke.exceptions import Exit

from ops import deploy
from ops.paths import ROOT

PLAYBOOKS = ROOT / "playbooks"
ROLES = PLAYBOOKS / "roles"

TAIL = "rescued=0    ignored=0"  # recap lines as Ansible prints them, split to fit the line length
RECAP = f"""
PLAY RECAP *********************************************************************
tf-master                  : ok=21   changed=0    unreachable=0    failed=0    skipped=3    {TAIL}
tf-worker1                 : ok=0    changed=0    unreachable=1    failed=0    skipped=0    {TAIL}
tf-worker2                 : ok=19   changed=2    unreachable=0    failed=1    skipped=3    {TAIL}

"""


def test_parse_recap_counts_per_host():
    recap = deploy.parse_recap("TASK [x] ***\nok: [tf-master]\n" + RECAP)
    assert recap["tf-master"]["ok"] == 21
    assert recap["tf-worker1"]["unreachable"] == 1
    assert recap["tf-worker2"] == {
        "ok": 19, "changed": 2, "unreachable": 0, "failed": 1, "skipped": 3, "rescued": 0, "ignored": 0,
    }


def test_parse_recap_ignores_colour_and_missing_recap():
    assert deploy.parse_recap("\x1b[0;32mok: [h]\x1b[0m") == {}
    coloured = RECAP.replace("tf-master", "\x1b[0;32mtf-master\x1b[0m")
    assert "tf-master" in deploy.parse_recap(coloured)


def test_missing_inventory_is_a_clear_error(tmp_path):
    with pytest.raises(Exit) as err:
        deploy._check_inventory(tmp_path / "nope")
    assert "does not exist" in str(err.value.message)


def test_inventory_with_only_variables_is_a_clear_error(tmp_path):
    (tmp_path / "group_vars").mkdir()
    with pytest.raises(Exit) as err:
        deploy._check_inventory(tmp_path)
    assert "lists no hosts" in str(err.value.message)


def test_leak_check_finds_the_generated_key(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "authkey").write_text("ab" * 48)
    assert deploy._leaked_authkey(tmp_path, "ok: [h] => " + "ab" * 48)
    assert not deploy._leaked_authkey(tmp_path, "ok: [h] => censored")
    assert not deploy._leaked_authkey(tmp_path / "other", "anything")


# -- static guards on the playbooks ------------------------------------------------------


def _defaults() -> dict:
    values = {}
    for path in sorted(ROLES.glob("*/defaults/main.yml")):
        values.update(yaml.safe_load(path.read_text()) or {})
    return values


UNIT_TEMPLATES = sorted(ROLES.glob("*/templates/taskfleet*.service*"))  # the agents' units


def _render_unit(template: Path, agent: str) -> dict:
    """The unit rendered with the role defaults (unrendered Jinja in a default stays as
    text): {directive: [values]} of its [Service] section, plus 'text'."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = env.from_string(template.read_text()).render(
        {**_defaults(), "taskfleet_agent": agent, "ansible_managed": "managed"})
    service = text.split("[Service]", 1)[1].split("[Install]", 1)[0]
    directives: dict = {}
    for line in service.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            directives.setdefault(key, []).append(value)
    return {**directives, "text": text}


def test_one_unit_template_for_both_agents():
    assert [p.relative_to(ROLES).as_posix() for p in UNIT_TEMPLATES] == ["common/templates/taskfleet.service.j2"]


@pytest.mark.parametrize("agent", ["master", "worker"])
@pytest.mark.parametrize("template", UNIT_TEMPLATES, ids=lambda p: p.name)
def test_units_are_notify_with_watchdog_limits_and_no_restart_on_config_errors(template, agent):
    unit = _render_unit(template, agent)
    defaults = _defaults()
    expected = {
        "Type": "notify", "NotifyAccess": "main", "TimeoutStartSec": str(defaults["taskfleet_start_timeout"]),
        "WatchdogSec": str(defaults["taskfleet_watchdog_sec"]), "LimitNOFILE": str(defaults["taskfleet_limit_nofile"]),
        "Restart": "on-failure", "RestartPreventExitStatus": "2", "EnvironmentFile": f"/etc/taskfleet/{agent}.env",
        "TasksMax": str(defaults["taskfleet_tasks_max"]),
    }
    assert {key: unit.get(key) for key in expected} == {key: [value] for key, value in expected.items()}
    assert (defaults["taskfleet_watchdog_sec"], defaults["taskfleet_limit_nofile"]) == (60, 65536)
    assert "MemoryMax" not in unit, "no memory cap unless taskfleet_memory_max is set"
    assert unit["ExecStart"][0].endswith(f"/current/taskfleet-node.pyz {agent}")
    for directive in defaults["taskfleet_unit_hardening"]:
        key, _, value = directive.partition("=")
        assert unit.get(key) == [value], directive


def test_the_memory_cap_is_a_knob():
    template = ROLES / "common" / "templates" / "taskfleet.service.j2"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = env.from_string(template.read_text()).render(
        {**_defaults(), "taskfleet_agent": "worker", "ansible_managed": "m", "taskfleet_memory_max": "1G"})
    assert "\nMemoryMax=1G\n" in text


def _tasks(node):
    """Every task in a tasks file, a play list or a block, with the no_log it inherits."""
    def walk(items, inherited):
        for item in items or []:
            no_log = item.get("no_log", inherited)
            if "hosts" in item:  # a play
                for section in ("pre_tasks", "tasks", "post_tasks", "handlers"):
                    yield from walk(item.get(section), no_log)
            elif any(k in item for k in ("block", "rescue", "always")):
                for section in ("block", "rescue", "always"):
                    yield from walk(item.get(section), no_log)
            else:
                yield item, no_log
    return list(walk(node, False))


SECRET = re.compile(r"authkey|\.key\b", re.I)  # the shared key; a TLS private key (node.key, NAME.key, ca.key)


def _authkey_tasks_without_no_log(tasks) -> list:
    """Names of tasks that mention a secret (the authkey, a private key) anywhere but in
    their name, yet may log."""
    return [task.get("name", "?") for task, no_log in tasks
            if SECRET.search(yaml.safe_dump({k: v for k, v in task.items() if k != "name"}))
            and no_log is not True]


TASK_FILES = sorted([*ROLES.glob("*/tasks/*.yml"), *ROLES.glob("*/handlers/*.yml"), *PLAYBOOKS.glob("*.yml")])


def _project_tasks() -> list:
    """Every task of the roles and playbooks, with its inherited no_log."""
    return [t for path in TASK_FILES for t in _tasks(yaml.safe_load(path.read_text()))]


def test_every_task_touching_a_secret_is_no_log():
    tasks = _project_tasks()
    assert len(tasks) > 30, "the walker found too few tasks: it has lost track of the playbooks' layout"
    assert len([1 for task, _ in tasks if "authkey" in yaml.safe_dump(task)]) >= 6
    assert len([1 for task, _ in tasks if "node.key" in yaml.safe_dump(task)]) >= 1
    assert _authkey_tasks_without_no_log(tasks) == []


def test_the_no_log_guard_catches_a_leaky_task():
    leaky = [{"name": "Show it", "ansible.builtin.debug": {"msg": "{{ taskfleet_authkey }}"}},
             {"name": "Hidden", "block": [{"ansible.builtin.copy": {"content": "{{ taskfleet_authkey }}"}}],
              "no_log": True},
             {"name": "Explicitly logged", "ansible.builtin.stat": {"path": "{{ taskfleet_authkey_path }}"},
              "no_log": False},
             {"name": "About the authkey, touching nothing", "ansible.builtin.debug": {"msg": "hi"}},
             {"name": "Copy a private key", "ansible.builtin.copy": {"src": "issued/h.key", "dest": "/x/node.key"}}]
    assert _authkey_tasks_without_no_log(_tasks(leaky)) == ["Show it", "Explicitly logged", "Copy a private key"]


def _delegated_per_host(tasks) -> list:
    """Names of tasks delegated to an inventory host (not the controller) once per host of the
    play: N hosts at once open N sessions on one connection to it, and sshd refuses those past
    its MaxSessions (10) as UNREACHABLE. Such a task must run once (per batch)."""
    found = []
    for task, _ in tasks:
        applied = [v.get("apply", {}) for k, v in task.items() if k.endswith("include_role") and isinstance(v, dict)]
        for spot in [task, *applied]:
            if spot.get("delegate_to") not in (None, "localhost") and spot.get("run_once") is not True:
                found.append(task.get("name", "?"))
    return found


def test_tasks_delegated_to_a_host_run_once_per_batch():
    tasks = _project_tasks()
    assert len([1 for task, _ in tasks if "taskfleet_master_group][0]" in str(task.get("delegate_to", ""))]) >= 1
    assert _delegated_per_host(tasks) == []
    per_host = [{"name": "Ask the master", "ansible.builtin.command": {"cmd": "x"}, "delegate_to": "{{ m }}"},
                {"name": "Once", "ansible.builtin.command": {"cmd": "x"}, "delegate_to": "{{ m }}", "run_once": True},
                {"name": "On the controller", "ansible.builtin.stat": {"path": "/"}, "delegate_to": "localhost"},
                {"name": "Role per host", "ansible.builtin.include_role": {"name": "r", "apply": {"delegate_to": "m"}}}]
    assert _delegated_per_host(_tasks(per_host)) == ["Ask the master", "Role per host"]


def test_the_mitogen_opt_in_points_ansible_at_its_strategy():
    env = deploy.mitogen_env()
    assert env["ANSIBLE_STRATEGY"] == "mitogen_linear"
    assert (Path(env["ANSIBLE_STRATEGY_PLUGINS"]) / "mitogen_linear.py").is_file()
