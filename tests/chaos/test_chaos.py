"""Chaos rounds: a real fleet on 127.0.0.1, one seeded fault per round, then every invariant.

Each round prints `chaos round N seed S: FAULT` when it starts and its outcome when it
ends; a failure lists every violation, the round's timeline and the command that
replays it (`./invoke chaos --rounds 1 --seed S`). The timeline is also kept in the
round's tmp dir (timeline.txt), and printed for every round with TASKFLEET_CHAOS_VERBOSE=1.
"""

import os
import time

import pytest

from faults import FAULTS
from harness import Round

pytestmark = pytest.mark.chaos


def say(capsys, text: str) -> None:
    """A line on the terminal even while pytest captures output."""
    with capsys.disabled():
        print(text, flush=True)


def test_chaos_round(plan, tmp_path, capsys):
    description, fault = FAULTS[plan.fault]
    name = f"chaos round {plan.number} seed {plan.seed}{plan.origin}"
    say(capsys, f"\n{name}: {description}")
    chaos = Round(plan.seed, plan.number, tmp_path, description, plan.replay)
    started, skipped = time.monotonic(), None
    try:
        fault(chaos)
        chaos.check()
    except AssertionError as exc:  # a bounded wait in the fault's setup ran out
        chaos.violate(str(exc))
    except pytest.skip.Exception as exc:  # e.g. no tmpfs mount allowed
        skipped = exc
    finally:
        chaos.teardown()
        (tmp_path / "timeline.txt").write_text("\n".join(chaos.timeline) + "\n")
    if os.environ.get("TASKFLEET_CHAOS_VERBOSE"):
        say(capsys, "\n".join(chaos.timeline))
    outcome = "skipped" if skipped else f"{len(chaos.violations)} violation(s)" if chaos.violations else "ok"
    say(capsys, f"{name}: {outcome} in {time.monotonic() - started:.1f} s")
    if skipped:
        raise skipped
    if chaos.violations:
        pytest.fail(chaos.report(), pytrace=False)
