"""Crash points for the crash-safety tests: `OVERLAYBD_SNAPSHOTTER_CRASH=<point>` makes the process die there.

Why in the product: a crash between two specific steps (mkdir and COMMIT, COMMIT and the reply,
row deletion and rmtree) cannot be hit reliably from outside; the test sets the variable on a
real snapshotter process, which then exits like a SIGKILL would (no cleanup, no flush).
"""

from __future__ import annotations

import os

ENV = "OVERLAYBD_SNAPSHOTTER_CRASH"


def crashpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os._exit(137)
