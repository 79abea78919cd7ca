"""Fixtures for the FUSE frontend: skip where /dev/fuse or loop devices are missing; always clean up."""

from __future__ import annotations

import os

import pytest


def _needs_root_fuse_loop() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount, losetup)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices"
    return None


@pytest.fixture
def host_blockdev():
    """Cleans up whatever a test registered (mounts, loop devices, servers) in reverse order."""
    reason = _needs_root_fuse_loop()
    if reason:
        pytest.skip(reason)
    undo: list = []
    yield undo
    for fn in reversed(undo):
        try:
            fn()
        except Exception as e:  # keep cleaning up
            print(f"cleanup: {e}")
