"""Day-2 operations on the local cluster, each under a job in flight: removing a worker and
adding it back, a reset then a deploy, an authkey rotation. Each test deploys first and
leaves a deployed fleet behind (in a finally), so none depends on another."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from multiprocessing import AuthenticationError

from node import wire
from node.client import Client
from ops.deploy import LOG_DIR, parse_recap
from ops.paths import ROOT
from tests.e2e.conftest import host, play_runs
from tests.waiting import wait_for

LEFT_BEHIND = ["/etc/taskfleet", "/opt/taskfleet", "/etc/systemd/system/taskfleet-master.service",
               "/etc/systemd/system/taskfleet-worker.service", "/etc/systemd/system/taskfleet-firewall.service"]


def assert_done_once_each(results, total: int) -> None:
    """Nothing lost (one result per task), nothing failed, nothing run for nothing."""
    assert sorted(r.index for r in results) == list(range(total)), "every task has exactly one result"
    assert [r for r in results if not r.ok] == []
    assert [r for r in results if r.attempts != 1] == [], "a task was run twice"


def took(proc, pattern: str) -> float:
    """The duration the operator task printed (`... in 12.3 s`)."""
    return float(re.search(pattern + r".* in ([\d.]+) s", proc.stdout).group(1))


def systemd_state(hosts) -> dict:
    """Each agent's MainPID and NRestarts, by host: unchanged = no agent exited."""
    return {h.backend.host: h.check_output("systemctl show -p MainPID -p NRestarts taskfleet-master taskfleet-worker")
            for h in hosts}


def nothing_left(h, keep_state: bool) -> None:
    for path in LEFT_BEHIND:
        assert not h.file(path).exists, f"{path} left on {h.backend.host}"
    assert not h.user("taskfleet").exists and not h.group("taskfleet").exists
    assert h.run("pgrep -u taskfleet").rc == 1 or not h.user("taskfleet").exists
    assert not h.socket("tcp://0.0.0.0:5000").is_listening
    assert "taskfleet" not in h.check_output("nft list tables 2>/dev/null || true"), "the firewall's table is left"
    state = h.file("/var/lib/taskfleet")
    if keep_state:
        assert state.exists and state.user == "root" and h.file("/var/lib/taskfleet/ledger.sqlite3").exists
    else:
        assert not state.exists, f"/var/lib/taskfleet left on {h.backend.host}"


def test_removing_a_worker_mid_job_loses_nothing_and_deploy_brings_it_back(fleet, operator):
    operator("deploy")
    victim = [h for h in fleet.hosts if "workers" in h.groups][-1].name
    total = 300
    with Client.connect(fleet.master_address, str(fleet.authkey_file), retry_for=120, tls=fleet.tls_dir()) as client:
        job = client.submit("sleep", [(0.1,)] * total)
        wait_for(lambda: job.progress()["done"] >= 20, 60, "the job to be under way")
        try:
            removed = operator("worker.remove", victim, "--yes")
            print(f"worker.remove took {took(removed, 'worker.remove'):.1f} s")
            assert victim not in {w["host"] for w in client.status()["workers"]}
            results = job.wait()
            assert_done_once_each(results, total)
            h = host(victim)
            assert not h.user("taskfleet").exists and not h.file("/var/lib/taskfleet").exists
            for path in LEFT_BEHIND:
                assert not h.file(path).exists, f"{path} left on {victim}"
        finally:
            operator("deploy", "--limit", victim)
        wait_for(lambda: victim in {w["host"] for w in client.status()["workers"] if w["alive"]}, 60,
                 f"{victim} to rejoin")
        again = client.submit("sleep", [(0.05,)] * 80).wait()
        assert_done_once_each(again, 80)
        assert victim in {r.host for r in again}


def test_a_worker_host_that_is_down_is_forgotten_and_comes_back_with_a_deploy(fleet, cluster, operator):
    operator("deploy")
    victim = [n for n in cluster if n.group == "workers"][-1]
    with Client.connect(fleet.master_address, str(fleet.authkey_file), retry_for=120, tls=fleet.tls_dir()) as client:
        job = client.submit("sleep", [(0.1,)] * 200)
        wait_for(lambda: job.progress()["done"] >= 20, 60, "the job to be under way")
        subprocess.run(["lxc-stop", "-k", "-n", victim.container], check=True, capture_output=True)
        subprocess.run(["ip", "link", "set", victim.veth, "down"], capture_output=True)  # may be gone already
        try:
            wait_for(lambda: victim.hostname not in {w["host"] for w in client.status()["workers"] if w["alive"]},
                     60, f"the master to lose {victim.hostname}")
            removed = operator("worker.remove", victim.hostname, "--yes")
            assert f"{victim.hostname} is unreachable: the master forgets it by its inventory name" in removed.stdout
            assert "forgot 1 worker(s) of " + victim.hostname in removed.stdout
            assert victim.hostname not in {w["host"] for w in client.status()["workers"]}
            results = job.wait()  # the lost host's tasks were retried elsewhere: one result each, none failed
            assert sorted(r.index for r in results) == list(range(200)) and all(r.ok for r in results)
        finally:
            operator("cluster.up")
            operator("deploy", "--limit", victim.hostname)
        wait_for(lambda: victim.hostname in {w["host"] for w in client.status()["workers"] if w["alive"]}, 60,
                 f"{victim.hostname} to rejoin")


def test_reset_mid_job_then_deploy_serves_the_ledger_again(fleet, operator):
    operator("deploy")
    total = 400
    with Client.connect(fleet.master_address, str(fleet.authkey_file), tls=fleet.tls_dir()) as client:
        earlier = client.submit("square", [(n,) for n in range(20)])
        assert [r.value for r in earlier.wait()] == [n * n for n in range(20)]
        job = client.submit("sleep", [(0.05,)] * total)
        wait_for(lambda: job.progress()["done"] >= 20, 60, "the job to be under way")
    try:
        reset = operator("reset", "--yes")
        print(f"reset took {took(reset, 'reset: taskfleet removed'):.1f} s")
        for h in fleet.hosts:
            nothing_left(host(h.name), keep_state="master" in h.groups)
    finally:
        deployed = operator("deploy")
    print(f"deploy after reset: {deployed.stdout.split('ansible-playbook exited 0 after ')[1].split()[0]} s")
    with Client.connect(fleet.master_address, str(fleet.authkey_file), tls=fleet.tls_dir()) as client:
        assert [r.value for r in client.job(earlier.id).wait()] == [n * n for n in range(20)]
        assert_done_once_each(client.job(job.id).wait(), total)


def test_reset_with_purge_data_leaves_nothing_and_a_deploy_starts_afresh(fleet, operator):
    operator("deploy")
    with Client.connect(fleet.master_address, str(fleet.authkey_file), tls=fleet.tls_dir()) as client:
        earlier = client.submit("square", [(2,)])
        earlier.wait()
    try:
        operator("reset", "--yes", "--purge-data")
        again = parse_recap(operator("reset", "--yes", "--purge-data").stdout)  # a reset stopped halfway: run again
        assert again and all(c["failed"] == 0 and c["changed"] == 0 for c in again.values()), again
        for h in fleet.hosts:
            nothing_left(host(h.name), keep_state=False)
    finally:
        deployed = operator("deploy")
    # Workers with nothing installed run nothing: all of them at once, no batches.
    workers = {h.name for h in fleet.hosts if "workers" in h.groups}
    assert play_runs(deployed.stdout, "Install the new workers, all at once") == [workers]
    assert play_runs(deployed.stdout, "Deploy the installed workers, in batches") == [set()]
    with Client.connect(fleet.master_address, str(fleet.authkey_file), tls=fleet.tls_dir()) as client:
        assert client.status()["tasks"]["jobs"] == 0
        try:
            client.job(earlier.id)
        except LookupError as exc:
            assert f"no job {earlier.id}" in str(exc)
        else:
            raise AssertionError("a purged ledger still knows the earlier job")
        assert [r.value for r in client.submit("square", [(3,)]).wait()] == [9]


def test_key_rotation_mid_job_no_restart_and_the_old_key_refused_after_remove(fleet, operator, tmp_path):
    operator("deploy")
    agents = [host(h.name) for h in fleet.hosts]
    before = systemd_state(agents)
    old_file = tmp_path / "old-authkey"
    shutil.copy(fleet.authkey_file, old_file)
    old = wire.Keyring(str(old_file)).dial_key()
    total = 600
    old_client = Client(fleet.master_address, old, tls=fleet.tls_dir())  # keeps the old key throughout
    job = old_client.submit("sleep", [(0.05,)] * total)
    calls = []  # (monotonic time, "ok" or the error) of the old-key client's calls, until it is refused

    def keep_calling():
        while True:
            try:
                old_client.status()
                calls.append((time.time(), "ok"))
            except AuthenticationError as exc:
                calls.append((time.time(), str(exc)))
                return
            time.sleep(0.2)

    caller = threading.Thread(target=keep_calling, daemon=True)
    caller.start()
    started = time.time()
    # A rotation stopped after its first step, run with plain ansible-playbook ...
    installed = subprocess.run([str(ROOT / ".venv/bin/ansible-playbook"), "-i", str(fleet.inventory),
                                "playbooks/key-rotate.yml", "-e", "taskfleet_key_step=install"],
                               cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "ANSIBLE_CONFIG": "ansible.cfg"})
    assert installed.returncode == 0 and "Step install done" in installed.stdout, installed.stdout[-2000:]
    refused_deploy = operator("deploy", check=False)  # ... blocks a deploy, which would write the old key alone
    assert refused_deploy.returncode != 0 and "Check no authkey rotation is under way" in refused_deploy.stdout
    rotated = operator("key.rotate", "--yes")  # ... and is finished by running the command again
    for step in ("install", "use", "remove"):
        print(f"key.rotate {step}: {took(rotated, f'key.rotate: {step} done'):.1f} s")
    print(f"key.rotate in all: {took(rotated, 'key.rotate: authkey'):.1f} s")
    assert "none restarted" in rotated.stdout

    caller.join(30)
    assert not caller.is_alive(), "the old key is still served after the remove step"
    remove_started = min(t for t in (datetime.strptime(p.name, "key-rotate-remove-%Y%m%d-%H%M%S-%f.log").timestamp()
                                     for p in LOG_DIR.glob("key-rotate-remove-*.log")) if t >= started)
    served = [t for t, what in calls if what == "ok"]
    assert served and max(served) > started and calls[-1][0] >= remove_started
    assert all(what == "ok" for t, what in calls if t < remove_started), "the old key failed before the remove step"
    assert f"it refused authkey {wire.fingerprint(old)}" in calls[-1][1]
    old_client.close()

    with Client.connect(fleet.master_address, str(fleet.authkey_file), tls=fleet.tls_dir()) as client:
        assert_done_once_each(client.job(job.id).wait(), total)
        status = client.status()
    new = wire.fingerprint(wire.Keyring(str(fleet.authkey_file)).dial_key())
    assert status["keyring"] == {"ring": [new], "caller": new} and new != wire.fingerprint(old)
    assert {w["key"] for w in status["workers"] if w["alive"]} == {new}
    assert systemd_state(agents) == before, "an agent exited or restarted during the rotation"
    recap = parse_recap(operator("deploy").stdout)  # the new key is what a deploy writes: nothing changes
    assert recap and {h: c["changed"] for h, c in recap.items()} == {h: 0 for h in recap}
    refused = subprocess.run([sys.executable, "-m", "node", "status", "--master", fleet.master_address,
                              "--authkey-file", str(old_file), "--tls-dir", str(fleet.tls_dir())],
                             capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert f"it refused authkey {wire.fingerprint(old)}" in refused.stderr

    keys = [old.decode(), wire.Keyring(str(fleet.authkey_file)).dial_key().decode()]
    for log in LOG_DIR.glob("key-rotate-*.log"):
        assert not [k for k in keys if k in log.read_text()], f"a key in {log}"
    for h in agents:
        seen = h.check_output("ps -eo args") + h.check_output("journalctl -u 'taskfleet-*' --no-pager -n 2000")
        assert not [k for k in keys if k in seen], f"a key in the process args or journal of {h.backend.host}"
