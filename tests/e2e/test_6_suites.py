"""The mixed fleet: each node runs the Debian suite and Python that TASKFLEET_NODE_OS gave it,
and one job spreads over workers of every suite."""

from __future__ import annotations

from ops import localcluster

JOB_SIZE = 120


def test_each_node_runs_its_suite_and_python(cluster, master_host, worker_hosts):
    by_name = {h.backend.host: h for h in (master_host, *worker_hosts)}
    for node in cluster:
        h = by_name[node.hostname]
        release, python = localcluster.SUITES[node.suite]
        os_release = h.file("/etc/os-release").content_string
        assert f"VERSION_CODENAME={node.suite}" in os_release, node.hostname
        assert f'VERSION_ID="{release}"' in os_release, node.hostname
        assert h.check_output("/usr/bin/python3 --version").startswith(f"Python {python}."), node.hostname


def test_a_job_spreads_over_workers_of_every_suite(cluster, client):
    suite_of = {n.hostname: n.suite for n in cluster if n.group == "workers"}
    results = client.submit("burn", [(20,)] * JOB_SIZE).wait()
    assert sorted(r.index for r in results) == list(range(JOB_SIZE))
    assert [r for r in results if not r.ok] == []
    assert {suite_of[r.host] for r in results} == set(suite_of.values())
