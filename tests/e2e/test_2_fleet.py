"""The deployed fleet at work: jobs spread across hosts, a redeploy changes nothing,
and a worker host killed mid-job loses nothing."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

from ops.deploy import parse_recap
from tests.e2e.conftest import host, play_runs

JOB_SIZE = 240


def assert_exactly_one_result_each(results, total):
    indices = sorted(r.index for r in results)
    assert indices == list(range(total)), "every task has exactly one result"
    failed = [r for r in results if not r.ok]
    assert not failed, failed[:3]


def test_a_job_is_spread_across_worker_hosts(client, fleet):
    job = client.submit("burn", [(20,)] * JOB_SIZE)
    results = job.wait()
    assert_exactly_one_result_each(results, JOB_SIZE)
    assert all(r.value > 0 for r in results)  # burn returns its loop count
    by_host = {r.host for r in results}
    workers = {h.name for h in fleet.hosts if "workers" in h.groups}
    assert by_host <= workers
    assert len(by_host) >= 2, f"all {JOB_SIZE} tasks ran on {by_host}"


def test_invoke_submit_and_status(fleet, operator):
    proc = operator("submit", "square", "--args", "1 2 3", "--json")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    results = sorted((json.loads(line) for line in lines), key=lambda r: r["task"])
    assert [(r["task"], r["ok"], r["result"]) for r in results] == [(0, True, 1), (1, True, 4), (2, True, 9)]
    status = operator("status").stdout
    for h in fleet.hosts:
        if "workers" in h.groups:
            assert h.name in status


def test_invoke_demo_shows_which_host_did_what(fleet, operator):
    out = operator("demo", "--tasks", "60", "--ms", "20").stdout
    assert "60/60 results, 60 ok, 0 failed" in out
    counts = {h.name: int(m) for h in fleet.hosts for m in
              [line.split(":")[1].split()[0] for line in out.splitlines() if line.strip().startswith(h.name + ":")]}
    assert sum(counts.values()) == 60 and len(counts) >= 2, out


def test_invoke_logs_reads_each_hosts_journal(fleet, operator):
    out = operator("logs", "--lines", "200").stdout
    for h in fleet.hosts:
        assert f"==> {h.name} ({h.address})" in out
    assert "taskfleet.master" in out and "taskfleet.worker" in out
    one = operator("logs", "--host", "tf-worker1", "--lines", "20").stdout
    assert "==> tf-worker1" in one and "==> tf-master" not in one


def hosts_that_ran(output: str, task: str = "common : Create the taskfleet system group") -> set:
    """The hosts with a result for `task` in ansible-playbook's output (in every play and
    batch that ran it): those not skipped as unchanged (the task comes right after the skip)."""
    sections = [part.split("\nTASK [", 1)[0] for part in output.split(f"TASK [{task}]")[1:]]
    return {host for section in sections for host in re.findall(r"^(?:ok|changed): \[([^\]]+)\]", section, re.M)}


def assert_changed(recap: dict, expected: dict) -> None:
    assert recap, "no PLAY RECAP"
    assert all(counts["failed"] == 0 and counts["unreachable"] == 0 for counts in recap.values()), recap
    assert {host: counts["changed"] > 0 for host, counts in recap.items()} == expected, recap


def test_second_deploy_runs_every_task_and_changes_nothing(operator, fleet):
    proc = operator("deploy", "--full")
    assert hosts_that_ran(proc.stdout) == {h.name for h in fleet.hosts}, "--full skips no host"
    assert_changed(parse_recap(proc.stdout), {h.name: False for h in fleet.hosts})
    # Installed workers roll in batches of 25% (at least one), none as new.
    workers = {h.name for h in fleet.hosts if "workers" in h.groups}
    batches, size = play_runs(proc.stdout, "Deploy the installed workers, in batches"), max(1, len(workers) // 4)
    assert set().union(*batches) == workers and len(batches) == -(-len(workers) // size), batches
    assert all(len(b) <= size for b in batches), batches
    assert play_runs(proc.stdout, "Install the new workers, all at once") == [set()]


def test_a_deploy_with_mitogen_runs_every_task_and_changes_nothing(operator, fleet):
    proc = operator("deploy", "--mitogen", "--full")
    assert "(strategy: mitogen_linear)" in proc.stdout
    assert hosts_that_ran(proc.stdout) == {h.name for h in fleet.hosts}
    assert_changed(parse_recap(proc.stdout), {h.name: False for h in fleet.hosts})


def test_a_redeploy_skips_unchanged_hosts_and_repairs_drifted_ones(operator, fleet):
    workers = sorted(h.name for h in fleet.hosts if "workers" in h.groups)
    edited, stopped = workers[0], workers[-1]
    operator("deploy")  # every host stamped with this checkout's inputs
    proc = operator("deploy")
    assert hosts_that_ran(proc.stdout) == set(), "a deploy right after a deploy skips every host"
    assert_changed(parse_recap(proc.stdout), {h.name: False for h in fleet.hosts})

    host(edited).run_test("echo 'TASKFLEET_DRIFT=1' >> /etc/taskfleet/worker.env")
    host(stopped).run_test("systemctl stop taskfleet-worker.service")
    proc = operator("deploy")
    assert hosts_that_ran(proc.stdout) == {edited, stopped}
    assert_changed(parse_recap(proc.stdout), {h.name: h.name in (edited, stopped) for h in fleet.hosts})
    assert "TASKFLEET_DRIFT" not in host(edited).file("/etc/taskfleet/worker.env").content_string
    assert host(stopped).service("taskfleet-worker.service").is_running


def test_a_stamp_that_cannot_be_written_is_said_and_the_next_deploy_runs_in_full(operator, fleet):
    worker = sorted(h.name for h in fleet.hosts if "workers" in h.groups)[0]
    stamp = "/opt/taskfleet/deployed"
    host(worker).run_test(f"rm -f {stamp} && mkdir {stamp}")  # in the way of the stamp
    try:
        for _ in range(2):
            proc = operator("deploy")
            assert worker in hosts_that_ran(proc.stdout), "no stamp: deployed in full"
            said = " ".join(proc.stdout.split())
            assert f"{worker} is deployed, but its stamp {stamp} could not be written" in said, said[-3000:]
            assert_changed(parse_recap(proc.stdout), {h.name: False for h in fleet.hosts})
    finally:
        host(worker).run_test(f"rmdir {stamp}")
    operator("deploy")
    assert hosts_that_ran(operator("deploy").stdout) == set(), "stamped again, skipped again"


def _kill_host(node) -> None:
    """Stop the container at once and cut its link (its netns can outlive it)."""
    subprocess.run(["lxc-stop", "-k", "-n", node.container], check=True, capture_output=True)
    subprocess.run(["ip", "link", "set", node.veth, "down"], capture_output=True)  # may be gone already


def test_a_worker_host_killed_mid_job_loses_nothing(client, cluster, operator):
    victim = next(n for n in cluster if n.group == "workers")
    # Long enough to still run well after the kill, on 2 workers as on 19 (`invoke test --scale 20`).
    total = max(300, 150 * sum(n.group == "workers" for n in cluster))
    job = client.submit("sleep", [(0.1,)] * total)
    seen, killed_at = [], []

    def collect():
        for result in job.results():
            seen.append((time.monotonic(), result))

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any(r.host == victim.hostname for _, r in seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any(r.host == victim.hostname for _, r in seen), f"{victim.hostname} never ran a task"
    assert len(seen) < total, "the job finished before the host could be killed: make it longer"
    _kill_host(victim)
    killed_at.append(time.monotonic())
    try:
        reader.join(timeout=240)
        assert not reader.is_alive(), "the job did not complete after the host died"
        results = [r for _, r in seen]
        assert_exactly_one_result_each(results, total)
        after = {r.host for t, r in seen if t > killed_at[0] + 1}
        assert after and victim.hostname not in after, after
    finally:
        operator("cluster.up")  # bring the killed host back for whatever runs next


def test_the_killed_host_comes_back_and_rejoins(client, fleet):
    """After the kill above, `cluster.up` restarted the container: its enabled worker
    service starts on boot and rejoins the master, which kept its ledger."""
    workers = {h.name for h in fleet.hosts if "workers" in h.groups}
    deadline = time.monotonic() + 90
    alive = set()
    while time.monotonic() < deadline:
        alive = {w["host"] for w in client.status()["workers"] if w["alive"]}
        if alive == workers:
            break
        time.sleep(1)
    assert alive == workers
    results = client.submit("square", [(n,) for n in range(50)]).wait()
    assert [r.value for r in results] == [n * n for n in range(50)]


def test_a_users_task_module_is_shipped_and_runs(client, master_host, worker_hosts):
    """inventory/local ships examples/tasks/primes.py (taskfleet_tasks_files)."""
    for h in [master_host, *worker_hosts]:
        f = h.file("/opt/taskfleet/tasks/primes.py")
        assert f.exists and (f.user, f.group, f.mode) == ("root", "taskfleet", 0o644)
    results = client.submit("count_primes", [(1000,), (100000,)]).wait()
    assert [r.value for r in results] == [168, 9592]
