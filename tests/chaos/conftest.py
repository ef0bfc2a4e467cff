"""Which chaos rounds run (each is one seed; the seed picks the fault and its points).

- By default (so in `./invoke test`): DEFAULT_SEEDS, which cover every fault, plus one
  seed from TASKFLEET_CHAOS_SEED or, when that is unset, today's date (YYYYMMDD).
- With TASKFLEET_CHAOS_ROUNDS=N (`./invoke chaos --rounds N --seed S`): seeds S .. S+N-1.
- TASKFLEET_CHAOS_FAULT=NAME: every round runs that fault (the seed still picks its points).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import pytest

from faults import FAULTS, fault_of

# Every fault at least once; twice those with the most timing variants (32: hostile peers on a
# master with 512 file descriptors).
DEFAULT_SEEDS = [1, 2, 3, 5, 6, 7, 9, 13, 14, 16, 17, 18, 19, 20, 25, 27, 29, 31, 32]


@dataclass(frozen=True)
class Plan:
    """One round: its number, its seed, where the seed came from, its fault."""

    number: int
    seed: int
    origin: str
    fault: str
    forced: bool

    @property
    def replay(self) -> str:
        return f"./invoke chaos --rounds 1 --seed {self.seed}" + (f" --fault {self.fault}" if self.forced else "")

    @property
    def id(self) -> str:
        return f"r{self.number:02d}-seed{self.seed}-{self.fault}"


def planned_rounds(env=os.environ) -> list[Plan]:
    """The rounds to run, from the environment (see the module docstring)."""
    forced = env.get("TASKFLEET_CHAOS_FAULT", "").strip()
    if forced and forced not in FAULTS:
        raise pytest.UsageError(f"unknown chaos fault {forced!r}: one of {', '.join(sorted(FAULTS))}")
    given = env.get("TASKFLEET_CHAOS_SEED", "").strip()
    seed = int(given) if given else int(datetime.date.today().strftime("%Y%m%d"))
    origin = " (TASKFLEET_CHAOS_SEED)" if given else " (today's date)"
    rounds = env.get("TASKFLEET_CHAOS_ROUNDS", "").strip()
    if rounds:
        seeds = [(s, "") for s in range(seed, seed + int(rounds))]
    else:
        seeds = [(s, "") for s in DEFAULT_SEEDS] + [(seed, origin)]
    return [Plan(number, s, why, forced or fault_of(s), bool(forced)) for number, (s, why) in enumerate(seeds, 1)]


def pytest_generate_tests(metafunc):
    if "plan" in metafunc.fixturenames:
        plans = planned_rounds()
        metafunc.parametrize("plan", plans, ids=[p.id for p in plans])
