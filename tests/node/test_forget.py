"""`forget`: the master drops the workers of a removed host from status, never a connected one."""

from __future__ import annotations

import signal
import socket

from tests.node.conftest import wait_for


def test_forget_refuses_a_connected_worker_and_drops_a_lost_one(agents):
    agents.start_master(ttl=1.0)
    worker = agents.start_worker()
    agents.wait_workers(1)
    host = socket.gethostname()
    refused = agents.cli("forget", host)
    assert refused.returncode == 2
    assert refused.stderr.startswith("taskfleet: error: worker ") and f"on {host} is still connected" in refused.stderr
    assert [w["alive"] for w in agents.status()["workers"]] == [True]

    worker.kill_group(signal.SIGKILL)  # lost, not gone: status keeps showing it
    wait_for(lambda: [w["state"] for w in agents.status()["workers"]] == ["lost"], 15, "the worker to count as lost")
    forgot = agents.cli("forget", host, "no-such-host")
    assert forgot.returncode == 0, forgot.stderr
    assert forgot.stdout == f"forgot 1 worker(s) of {host}\nforgot 0 worker(s) of no-such-host\n"
    assert agents.status()["workers"] == []
    with agents.client() as client:  # the host may come back: a new worker joins as usual
        agents.start_worker()
        agents.wait_workers(1)
        assert [r.value for r in client.submit("square", [[4]]).wait()] == [16]
