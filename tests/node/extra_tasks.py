"""Tests-only tasks, loaded with --tasks-module tests/node/extra_tasks.py."""

import os


def crash():
    """Kill the pool process running it (no exception, no cleanup)."""
    os._exit(3)


def blob(n):
    """A result of n bytes."""
    return b"x" * n


def touch(path):
    """Create a file, so a test can see the task ran."""
    with open(path, "a") as handle:
        handle.write("ran\n")
    return path


def nap(seconds, marker_dir):
    """Leave a file in marker_dir when it starts (so a test knows it runs), then sleep."""
    import tempfile
    import time

    tempfile.NamedTemporaryFile(dir=marker_dir, delete=False).close()
    time.sleep(seconds)
    return seconds


def tally(path, value, then_sleep=0):
    """Append `value` to a file (a test counts how often each task ran), then sleep."""
    import time

    with open(path, "a") as handle:
        handle.write(f"{value}\n")
    time.sleep(then_sleep)
    return value


def echo(value):
    """Returns its argument: a marker sent as arguments comes back as the result."""
    return value
