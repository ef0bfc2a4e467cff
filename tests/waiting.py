"""The one bounded wait every test tier uses: poll, and fail with a message, never hang."""

from __future__ import annotations

import time


def wait_for(condition, timeout: float, what: str, interval: float = 0.05, prefix: str = ""):
    """Poll `condition` until it returns something truthy and return that; raise
    AssertionError ("timed out after T s waiting for WHAT") after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{prefix}timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
