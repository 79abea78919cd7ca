"""Crash safety: the snapshotter dies at every step of an RPC (and with running containers); after a
restart the store, the directories and containerd's metadata agree, and containerd's GC can clean up."""

from __future__ import annotations

import signal
import sqlite3
import time

import pytest
from helpers.containerd_stack import IMAGE

pytestmark = pytest.mark.containerd


def rows_and_dirs_agree(stack) -> None:
    db = sqlite3.connect(stack.snap_root / "metadata.db")
    ids = sorted(str(r[0]) for r in db.execute("SELECT id FROM snapshots"))
    db.close()
    assert ids == stack.snapshot_dirs()


def gc_to_empty(stack) -> None:
    stack.ctr("image", "rm", "--sync", IMAGE, check=False)
    for _ in range(100):
        if not stack.backend():
            break
        time.sleep(0.1)
    assert stack.backend() == []
    assert stack.snapshot_dirs() == []


@pytest.mark.parametrize(
    "point", ["create.before-commit", "create.after-commit", "commit.before-commit", "commit.after-commit"]
)
def test_crash_during_unpack(stack_factory, cname, point):
    stack = stack_factory(start=False)
    stack.start_snapshotter({"OVERLAYBD_SNAPSHOTTER_CRASH": point})
    stack.start_containerd()
    r = stack.ctr("image", "import", "--snapshotter", "overlaybd", str(_tar(stack)), check=False)
    assert r.returncode != 0
    assert stack.snapshotter.wait(10) == 137
    stack.start_snapshotter()
    rows_and_dirs_agree(stack)
    stack.import_busybox()
    out = stack.ctr("run", "--rm", "--snapshotter", "overlaybd", IMAGE, cname, "/bin/cat", "/etc/os-release")
    assert "ID=obdtest" in out.stdout
    gc_to_empty(stack)


def test_crash_during_remove(stack_factory, cname):
    stack = stack_factory(start=False)
    stack.start_snapshotter({"OVERLAYBD_SNAPSHOTTER_CRASH": "remove.after-commit"})
    stack.start_containerd()
    stack.import_busybox()
    stack.ctr("image", "rm", "--sync", IMAGE, check=False)  # GC's Remove kills the snapshotter
    assert stack.snapshotter.wait(10) == 137
    stack.start_snapshotter()  # reconcile removes the directory whose row is gone
    rows_and_dirs_agree(stack)
    gc_to_empty(stack)


def test_kill_with_running_container(stack, cname):
    stack.import_busybox()
    stack.ctr("run", "-d", "--snapshotter", "overlaybd", IMAGE, cname, "/bin/sleep", "600")
    stack.restart_snapshotter()
    rows_and_dirs_agree(stack)
    r = stack.ctr("task", "exec", "--exec-id", "e1", cname, "/bin/sh", "-c", "echo alive > /tmp/x; cat /tmp/x")
    assert r.stdout.strip() == "alive"
    stack.ctr("task", "kill", "-s", "SIGKILL", cname)
    for _ in range(50):
        if stack.ctr("task", "delete", cname, check=False).returncode == 0:
            break
        time.sleep(0.1)
    stack.ctr("container", "rm", cname)
    gc_to_empty(stack)


def test_sigterm_is_graceful(stack):
    stack.import_busybox()
    stack.stop_snapshotter(signal.SIGTERM)
    stack.start_snapshotter()
    rows_and_dirs_agree(stack)
    gc_to_empty(stack)


def _tar(stack):
    from helpers.oci_images import busybox_layer, write_layout_tar

    tar = stack.base / "busybox-oci.tar"
    if not tar.exists():
        write_layout_tar(tar, stack.base / "layout", IMAGE, [busybox_layer()])
    return tar
