"""The confirmation every destructive operator task asks for (skipped with --yes)."""

from __future__ import annotations

import sys

from invoke.exceptions import Exit


def confirm(what: str, answer: str = "yes") -> None:
    """Print `what`, then ask for `answer` typed back; anything else (or no terminal) stops
    the task with exit 1 and nothing changed."""
    print(what)
    if not sys.stdin.isatty():
        raise Exit("not confirmed: no terminal to ask on (pass --yes to run it from a script)", 1)
    try:
        typed = input(f"Type {answer!r} to go on: ").strip()
    except EOFError:
        typed = ""
    if typed != answer:
        raise Exit("not confirmed: nothing changed", 1)
