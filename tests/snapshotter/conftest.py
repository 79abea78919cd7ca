"""Fixtures: containerd + overlaybd-snapshotter stacks and a loopback registry (see helpers/containerd_stack.py).

Everything started here is stopped in the finalizer even when the test fails: tasks and
containers are killed/deleted, containerd, the snapshotter and the daemon terminated, then every
mount and loop device below the scratch dir is released before it is deleted.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from helpers.containerd_stack import Registry, Stack, new_base, release_below


@pytest.fixture
def stack_factory():
    made: list[tuple[Stack, Path]] = []

    def make(snap_config: dict | None = None, start: bool = True) -> Stack:
        base = new_base()
        s = Stack(base, snap_config)
        made.append((s, base))
        if start:
            s.start_snapshotter()
            s.start_containerd()
        return s

    yield make
    for s, base in made:
        try:
            s.close()
        finally:
            release_below(str(base))
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def lazy_stack(stack_factory, registry) -> Stack:
    """A stack with the overlaybd daemon (FUSE frontend) whose snapshotter pulls from `registry` over http."""
    s = stack_factory({"mirrorRegistry": [{"host": registry.host, "insecure": True}]}, start=False)
    s.start_daemon()
    s.start_snapshotter()
    s.start_containerd()
    return s


@pytest.fixture
def client(stack_factory):
    """(snapshots gRPC stub, stack) with only the snapshotter running: the RPCs straight over its socket."""
    s = stack_factory(start=False)
    s.start_snapshotter()
    stub, ch = s.snapshot_client()
    yield stub, s
    ch.close()


@pytest.fixture
def stack(stack_factory) -> Stack:
    return stack_factory()


@pytest.fixture
def registry():
    base = Path(tempfile.mkdtemp(prefix="obdreg-", dir="/tmp"))
    r = Registry(base)
    yield r
    r.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cname() -> str:
    return "t" + uuid.uuid4().hex[:10]
