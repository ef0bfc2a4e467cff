"""The metrics tooling without a cluster: `invoke dashboard`'s plain errors, and the
Prometheus scrape config the master role writes, for each form of taskfleet_metrics_listen."""

from __future__ import annotations

import os
import socket
import subprocess

import jinja2
import pytest
import yaml

from ops import dashboard_tasks
from ops import inventory as inv
from ops.paths import ROOT

INVOKE = ROOT / "invoke"
TEMPLATE = ROOT / "playbooks" / "roles" / "common" / "templates" / "prometheus-scrape.yml.j2"


def inventory(tmp_path, **master_vars):
    """A YAML inventory whose master is this machine's loopback, as user nobody-here."""
    hosts = {"all": {"children": {
        "master": {"hosts": {"tf-master": {"ansible_host": "127.0.0.1", "ansible_user": "nobody-here",
                                           **master_vars}}},
        "workers": {"hosts": {"tf-worker1": {"ansible_host": "127.0.0.1"}}},
    }}}
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(hosts))
    return path


def dashboard(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(INVOKE), "dashboard", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def one_error_line(proc, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_taken_port_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(dashboard("--inventory", str(inventory(tmp_path)), "--port", str(port)), 2)
    assert line.startswith(f"dashboard: port {port} on 127.0.0.1 is taken (Address already in use): choose another")


def test_an_unreachable_master_is_one_line(tmp_path):
    """Nothing listens for SSH on this machine's port 22 in the test environment (or it
    refuses user nobody-here): either way the master cannot be reached."""
    line = one_error_line(dashboard("--inventory", str(inventory(tmp_path)), "--port", "0"), 3)
    assert line.startswith("dashboard: cannot reach the master tf-master (127.0.0.1) over SSH: ")


@pytest.mark.parametrize(("value", "error"), [
    ("off", "is off: the master serves no dashboard"),
    ("{{ taskfleet_master_address }}:9464", "is a template"),
    ("10.0.0.5:http", "bad port in address"),
])
def test_a_metrics_address_the_dashboard_cannot_use_is_one_line(tmp_path, value, error):
    line = one_error_line(dashboard("--inventory", str(inventory(tmp_path, taskfleet_metrics_listen=value))), 2)
    assert line.startswith("dashboard: taskfleet_metrics_listen in ") and error in line, line


@pytest.mark.parametrize(("listen", "remote"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("10.0.0.5:9500", ("10.0.0.5", 9500)),
    ("0.0.0.0:9464", ("127.0.0.1", 9464)),  # every address of the master: its loopback is one
    (":9464", ("127.0.0.1", 9464)),
])
def test_the_tunnel_leads_to_the_metrics_address_as_the_master_sees_it(tmp_path, listen, remote):
    fleet = inv.load(inventory(tmp_path, taskfleet_metrics_listen=listen))
    assert dashboard_tasks._remote(fleet) == remote


def scrape_config(listen: str) -> tuple[dict, str]:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters["basename"] = os.path.basename  # Ansible's filter
    text = env.from_string(TEMPLATE.read_text()).render(
        ansible_managed="Ansible managed", inventory_hostname="tf-master", inventory_dir="/x/inventory/prod",
        taskfleet_metrics_listen=listen, taskfleet_master_address="10.0.0.5", taskfleet_metrics_scrape_interval="15s")
    return yaml.safe_load(text), text


@pytest.mark.parametrize(("listen", "target"), [
    ("10.0.0.5:9464", "10.0.0.5:9464"),
    ("10.0.0.5", "10.0.0.5:9464"),
    ("0.0.0.0:9500", "10.0.0.5:9500"),  # every address of the master: scrape its private one
    ("[fd00::5]:9464", "[fd00::5]:9464"),
    ("127.0.0.1:9464", "127.0.0.1:9464"),
])
def test_the_scrape_config_targets_the_masters_metrics_address(listen, target):
    config, text = scrape_config(listen)
    assert config == {"scrape_configs": [{
        "job_name": "taskfleet", "scrape_interval": "15s",
        "static_configs": [{"targets": [target], "labels": {"taskfleet_master": "tf-master"}}],
    }]}
    assert ("loopback only" in text) == listen.startswith("127.")


def test_the_scrape_config_of_a_master_without_metrics_scrapes_nothing():
    config, text = scrape_config("off")
    assert config == {"scrape_configs": []} and "serves no metrics" in text


def test_without_the_variable_the_dashboard_reads_the_roles_default(tmp_path):
    defaults = yaml.safe_load((ROOT / "playbooks" / "roles" / "common" / "defaults" / "main.yml").read_text())
    assert inv.load(inventory(tmp_path)).metrics_listen == defaults["taskfleet_metrics_listen"] == "127.0.0.1:9464"
