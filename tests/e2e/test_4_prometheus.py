"""The master's metrics read by the real thing: Debian's Prometheus on the controller,
with the scrape config the deploy wrote, counts a job's tasks.

The master's metrics are bound to its private address for this test (an inventory of the
same cluster with taskfleet_metrics_listen set), and put back on loopback after it.
"""

from __future__ import annotations

import yaml

from ops.paths import CLUSTER_DIR
from tests.waiting import wait_for

TASKS = 150
COMPLETED = "taskfleet_tasks_completed_total"


def test_prometheus_counts_a_jobs_tasks_with_the_generated_scrape_config(
        fleet, master_host, client, operator, inventory_copy, prometheus):
    master = fleet.hosts[0]
    listen = f"{master.address}:9464"
    inventory = inventory_copy("metrics-on-private", taskfleet_metrics_listen=listen,
                               taskfleet_metrics_scrape_interval="1s")
    scrape_config = CLUSTER_DIR / "prometheus" / f"{inventory.name}.yml"
    try:
        operator("deploy", "--inventory", str(inventory))
        assert master_host.file("/etc/taskfleet/master.env").contains(f"^TASKFLEET_METRICS_LISTEN={listen}$")
        assert master_host.socket(f"tcp://{listen}").is_listening
        config = yaml.safe_load(scrape_config.read_text())
        [job] = config["scrape_configs"]
        assert job["static_configs"][0]["targets"] == [listen], config

        server = prometheus(scrape_config)
        wait_for(lambda: server.query('up{job="taskfleet"} == 1'), 60, f"Prometheus to scrape {listen}", interval=0.5)
        [(labels, before)] = wait_for(lambda: server.query(COMPLETED), 30, f"{COMPLETED} in Prometheus", interval=0.5)
        assert labels["taskfleet_master"] == master.name and labels["instance"] == listen, labels

        results = client.submit("square", [(n,) for n in range(TASKS)]).wait()
        assert sorted(r.index for r in results) == list(range(TASKS)), "every task has exactly one result"
        assert all(r.ok for r in results), [r for r in results if not r.ok][:3]

        def counted():
            [(_, value)] = server.query(COMPLETED)
            return value if value >= before + TASKS else None

        after = wait_for(counted, 30, f"{COMPLETED} to grow by the job's {TASKS} tasks from {before:g}", interval=0.5)
        assert after == before + TASKS, f"{COMPLETED} went from {before:g} to {after:g} for a job of {TASKS} tasks"
    finally:
        scrape_config.unlink(missing_ok=True)
        operator("deploy")  # the default inventory: metrics back on the master's loopback
    assert master_host.file("/etc/taskfleet/master.env").contains("^TASKFLEET_METRICS_LISTEN=127.0.0.1:9464$")
    assert not master_host.socket(f"tcp://{listen}").is_listening
