"""Smoke test of bench/throughput.py: every system runs in --quick mode with one worker.
No timing assertions: the machine may be busy; only that each produced a throughput."""

import pytest

from bench import throughput


@pytest.mark.parametrize("system", throughput.SYSTEMS)
def test_quick_run_gives_positive_throughputs(system):
    counts = {"tiny": 200, "burn": 20}
    rows = throughput.run_matrix(counts, workers=(1,), systems=(system,), verbose=False)
    assert {(r["system"], r["workload"]) for r in rows} == {(system, "tiny"), (system, "burn")}
    for row in rows:
        assert row["workers"] == 1
        assert row["tasks_per_s"] > 0


def test_ratios_and_table(capsys):
    rows = [
        {"system": s, "workload": w, "tasks": 10, "workers": 1, "tasks_per_s": rate, "seconds": 1.0}
        for (s, w, rate) in (("taskfleet", "tiny", 100.0), ("tutorial", "tiny", 10.0), ("pool", "tiny", 1000.0),
                             ("taskfleet", "burn", 95.0), ("tutorial", "burn", 90.0), ("pool", "burn", 100.0))
    ]
    ratio_rows = throughput.ratios(rows)
    assert ratio_rows == [{"workers": 1, "tiny_taskfleet_over_tutorial": 10.0, "burn_taskfleet_over_pool": 0.95}]
    throughput.print_table(rows, ratio_rows)
    assert "taskfleet / tutorial" in capsys.readouterr().out
