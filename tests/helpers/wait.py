"""Polling for background work (daemons, downloads, unmounts): a bound on waiting, never a timing assertion."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    """Return once `pred()` is true; fail the test (AssertionError naming `what`) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
