"""The overlayfs fallback under the real containerd 1.6: ordinary OCI images through the proxy snapshotter."""

from __future__ import annotations

import pytest
from helpers.containerd_stack import IMAGE

pytestmark = pytest.mark.containerd


def test_import_and_run(stack, cname):
    stack.import_busybox()
    r = stack.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "overlaybd",
        IMAGE,
        cname,
        "/bin/sh",
        "-c",
        "cat /etc/os-release; echo hello-from-overlaybd-snapshotter",
    )
    assert "ID=obdtest" in r.stdout
    assert "hello-from-overlaybd-snapshotter" in r.stdout


def test_rootfs_changes_survive_restart(stack, cname):
    stack.import_busybox()
    stack.ctr(
        "container",
        "create",
        "--snapshotter",
        "overlaybd",
        "--",
        IMAGE,
        cname,
        "/bin/sh",
        "-c",
        "test -f /data/n && cat /data/n; echo run >> /data/n",
    )
    first = stack.ctr("task", "start", cname).stdout  # attached start deletes the task when it exits
    second = stack.ctr("task", "start", cname).stdout
    assert "run" not in first
    assert second.strip() == "run"
    stack.ctr("container", "rm", cname)  # removes the rootfs snapshot
    stack.ctr(
        "container",
        "create",
        "--snapshotter",
        "overlaybd",
        "--",
        IMAGE,
        cname,
        "/bin/sh",
        "-c",
        "cat /data/n 2>/dev/null || echo gone",
    )
    third = stack.ctr("task", "start", cname).stdout
    assert third.strip() == "gone"


def test_ctr_snapshots_commands(stack):
    stack.import_busybox()
    sn = ("snapshots", "--snapshotter", "overlaybd")
    stack.ctr(*sn, "prepare", "work1")
    out = stack.ctr(*sn, "mounts", "/mnt", "work1").stdout
    assert "mount -t bind" in out and "rbind" in out
    stack.ctr(*sn, "commit", "done1", "work1")
    stack.ctr(*sn, "view", "view1", "done1")
    out = stack.ctr(*sn, "mounts", "/mnt", "view1").stdout
    assert "ro" in out
    r = stack.ctr(*sn, "prepare", "work1x", "no-such-parent", check=False)
    assert r.returncode != 0 and "not found" in r.stderr
    r = stack.ctr(*sn, "rm", "done1", check=False)
    assert r.returncode != 0  # has a child
    usage = stack.ctr(*sn, "usage").stdout
    assert "KEY" in usage
    # ctr's snapshot commands hold a lease only while they run, so containerd's GC may already have
    # collected these unreferenced snapshots; either way they must end up gone from the backend too.
    stack.ctr(*sn, "rm", "view1", check=False)
    stack.ctr(*sn, "rm", "done1", check=False)
    stack.ctr("image", "rm", "--sync", IMAGE)
    _wait_backend_empty(stack)


def _backend_names(stack):
    from overlaybd.containerd_api import snapshots_pb2 as pb

    stub, ch = stack.snapshot_client()
    try:
        return sorted(i.name for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info)
    finally:
        ch.close()


def _wait_backend_empty(stack):
    import time

    for _ in range(100):
        if not _backend_names(stack):
            break
        time.sleep(0.1)
    assert _backend_names(stack) == []


def test_gc_removes_unreferenced_snapshots(stack, cname):
    stack.import_busybox()
    assert any(n.startswith("default/") for n in _backend_names(stack))
    stack.ctr("run", "--rm", "--snapshotter", "overlaybd", IMAGE, cname, "/bin/true")
    stack.ctr("image", "rm", "--sync", IMAGE)
    _wait_backend_empty(stack)
    assert [p for p in (stack.snap_root / "snapshots").iterdir()] == []
