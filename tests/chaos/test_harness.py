"""The chaos harness's own checks, on made-up observations: each must catch what it is for."""

import os
import signal
import subprocess
import sys

import pytest

from harness import RUN_VAR, STRIDE, Round, plain_error, tagged_processes

pytestmark = pytest.mark.chaos


@pytest.fixture
def chaos(tmp_path):
    return Round(7, 1, tmp_path, "test", "./invoke chaos --rounds 1 --seed 7")


def row(job, index, value, ok=True):
    return {"job": job, "task": index, "ok": ok, "result": value, "error": None if ok else "boom"}


def test_plain_error_accepts_one_line_only():
    assert plain_error("taskfleet: error: no job 3 on this master\n") is None
    assert plain_error("Traceback (most recent call last):\n  ...\nValueError: x\n") == "a traceback"
    assert plain_error("") and plain_error("taskfleet: error: a\ntaskfleet: error: b\n")


def test_a_result_names_its_submission_and_index(chaos):
    wrong = []
    assert chaos._owner(4, row(4, 5, (2 * STRIDE + 5) ** 2), wrong) == 2 and not wrong
    chaos._owner(4, row(4, 5, (2 * STRIDE + 6) ** 2), wrong)  # another task's result
    chaos._owner(4, row(4, 5, 17), wrong)  # not a square
    chaos._owner(4, row(3, 5, (2 * STRIDE + 5) ** 2), wrong)  # another job's row
    chaos._owner(4, row(4, 5, None, ok=False), wrong)
    assert len(wrong) == 4, wrong


def test_exactly_once_catches_duplicates_gaps_and_strays(chaos):
    chaos._check_exactly_once("ok", [2, 0, 1], 3)
    assert not chaos.violations
    for indices in ([0, 1, 1], [0, 1], [0, 1, 2, 3]):
        chaos._check_exactly_once("bad", indices, 3)
    assert len(chaos.violations) == 3


def test_era_of_a_submit_around_a_move_to_a_fresh_state_dir(chaos):
    class Sub:
        def __init__(self, finished):
            self.finished = finished

    assert chaos.era(Sub(5.0)) == "current"
    chaos.swaps.append((10.0, 12.0))
    assert [chaos.era(Sub(t)) for t in (9.0, 11.0, 13.0)] == ["old", "either", "current"]


def test_tagged_processes_finds_a_process_by_its_environment(chaos):
    env = dict(os.environ, **{RUN_VAR: chaos.run_id})
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        chaos.wait_for(lambda: proc.pid in tagged_processes(chaos.run_id), 10, "the tagged process to show")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.pid not in tagged_processes(chaos.run_id)
