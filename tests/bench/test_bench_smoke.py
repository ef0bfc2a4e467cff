"""Smoke test of bench/throughput.py: every system runs in --quick mode with one worker,
and the CPU-per-task and history parts run small. No timing assertions: the machine may
be busy; only that each produced its figures."""

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


def test_cpu_per_task_is_measured_for_every_system(capsys):
    rows = throughput.run_cpu(40, setups=((1, 1),), verbose=False)
    assert [r["system"] for r in rows] == list(throughput.CPU_SYSTEMS)
    for row in rows:
        assert row["cpu_seconds"] >= 0 and row["cpu_us_per_task"] >= 0 and row["processes"] >= 2
    throughput.print_cpu_table(rows)
    assert "CPU per task" in capsys.readouterr().out


def test_history_reports_ratios():
    out = throughput.bench_history(checkpoints=(20, 40), job_tasks=100, verbose=False)
    assert [p["finished_jobs"] for p in out["points"]] == [20, 40]
    assert out["points"][-1]["jobs_in_ledger"] >= 40
    assert out["status_ratio"] > 0 and out["tasks_per_s_ratio"] > 0


def test_ratios_and_table(capsys):
    rows = [
        {"system": s, "workload": w, "tasks": 10, "workers": 1, "tasks_per_s": rate, "seconds": 1.0}
        for (s, w, rate) in (("taskfleet", "tiny", 100.0), ("tutorial", "tiny", 10.0), ("pool", "tiny", 1000.0),
                             ("taskfleet", "burn", 95.0), ("tutorial", "burn", 90.0), ("pool", "burn", 100.0),
                             ("taskfleet-fast", "tiny", 200.0), ("taskfleet-fast", "burn", 95.0),
                             ("taskfleet-tls", "tiny", 80.0))
    ]
    ratio_rows = throughput.ratios(rows)
    assert ratio_rows == [{"workers": 1, "tiny_taskfleet_over_tutorial": 10.0, "burn_taskfleet_over_pool": 0.95,
                           "tiny_full_over_fast": 0.5, "burn_full_over_fast": 1.0, "tiny_tls_over_plaintext": 0.8}]
    throughput.print_table(rows, ratio_rows)
    out = capsys.readouterr().out
    assert "taskfleet / tutorial" in out and "taskfleet-fast" in out and "durability full / fast" in out
    assert "TLS / plaintext" in out
