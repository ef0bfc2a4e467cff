"""`invoke chaos`: long runs of the chaos tier (tests/chaos), one seeded fault per round."""

from __future__ import annotations

import random
import shlex

from invoke import task
from invoke.exceptions import Exit

from ops.paths import ROOT


@task(help={
    "rounds": "how many rounds (default 20)",
    "seed": "the first round's seed; round i runs seed SEED+i-1 (default: a random one, printed)",
    "fault": "run only this fault, e.g. master-kill9-submit or disk-full (default: each seed picks one)",
    "exitfirst": "stop at the first failing round",
    "verbose": "print every round's timeline, not only failing ones'",
    "pytest_args": "extra pytest arguments, e.g. \"-k disk-full\"",
})
def chaos(c, rounds=20, seed=None, fault="", exitfirst=False, verbose=False, pytest_args=""):
    """Chaos rounds: master and worker kills, fresh state dir, full disk, hostile peers (seeded, replayable)."""
    first = int(seed) if seed is not None else random.SystemRandom().randrange(1, 10**6)
    print(f"==> chaos: {rounds} round(s), seeds {first}..{first + int(rounds) - 1}"
          + (f", fault {fault}" if fault else ""), flush=True)
    env = {"PYTHONUNBUFFERED": "1", "TASKFLEET_CHAOS_ROUNDS": str(int(rounds)), "TASKFLEET_CHAOS_SEED": str(first),
           "TASKFLEET_CHAOS_FAULT": fault, "TASKFLEET_CHAOS_VERBOSE": "1" if verbose else ""}
    command = ["pytest", "-p", "no:cacheprovider", "-rs", "-m", "chaos", "-k", "test_chaos_round",
               *(["-x"] if exitfirst else []), *shlex.split(pytest_args), "tests/chaos"]
    with c.cd(str(ROOT)):
        result = c.run(shlex.join(command), warn=True, pty=False, env=env)
    if result.exited:
        raise Exit(code=result.exited)
