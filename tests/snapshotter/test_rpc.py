"""The ten RPCs straight over the snapshotter's unix socket: containerd's error codes and label rules."""

from __future__ import annotations

import os

import grpc
import pytest
from overlaybd.containerd_api import snapshots_pb2 as pb


def code(fn, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args)
    return ei.value.code()


def prepare(stub, key, parent="", labels=None):
    return stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="overlaybd", key=key, parent=parent, labels=labels or {}))


def commit(stub, name, key, labels=None, parent=""):
    return stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}, parent=parent))


def listing(stub, *filters):
    return [i for r in stub.List(pb.ListSnapshotsRequest(filters=list(filters))) for i in r.info]


def test_prepare_commit_view_mounts(client):
    stub, s = client
    m = prepare(stub, "ns/1/a").mounts
    assert len(m) == 1 and m[0].type == "bind" and m[0].options == ["rw", "rbind"]
    upper = m[0].source
    with open(os.path.join(upper, "f"), "w") as f:
        f.write("x" * 5000)
    commit(stub, "ns/2/A", "ns/1/a", {"l": "1"})
    info = stub.Stat(pb.StatSnapshotRequest(key="ns/2/A")).info
    assert info.kind == pb.COMMITTED and info.labels == {"l": "1"} and info.parent == ""
    assert stub.Usage(pb.UsageRequest(key="ns/2/A")).size >= 5000
    assert code(stub.Stat, pb.StatSnapshotRequest(key="ns/1/a")) == grpc.StatusCode.NOT_FOUND

    m = prepare(stub, "ns/3/b", "ns/2/A").mounts
    assert m[0].type == "overlay"
    opts = m[0].options
    assert f"lowerdir={upper}" in opts and any(o.startswith("upperdir=") for o in opts)
    assert any(o.startswith("workdir=") for o in opts)
    commit(stub, "ns/4/B", "ns/3/b")
    m = stub.View(pb.ViewSnapshotRequest(key="ns/5/v", parent="ns/4/B")).mounts
    assert m[0].type == "overlay" and not any(o.startswith("upperdir=") for o in m[0].options)
    lower = [o for o in m[0].options if o.startswith("lowerdir=")][0]
    assert lower.endswith(":" + upper)  # nearest parent first
    m1 = stub.View(pb.ViewSnapshotRequest(key="ns/6/v1", parent="ns/2/A")).mounts
    assert m1[0].type == "bind" and m1[0].options == ["ro", "rbind"] and m1[0].source == upper
    assert stub.Mounts(pb.MountsRequest(key="ns/6/v1")).mounts == m1
    assert stub.Stat(pb.StatSnapshotRequest(key="ns/6/v1")).info.kind == pb.VIEW


def test_error_codes(client):
    stub, _ = client
    nf, ae, fp, ia = (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    prepare(stub, "a")
    assert code(prepare, stub, "a") == ae
    assert code(prepare, stub, "b", "missing") == nf
    assert code(prepare, stub, "b", "a") == ia  # parent not committed
    assert code(stub.Mounts, pb.MountsRequest(key="nope")) == nf
    assert code(stub.Remove, pb.RemoveSnapshotRequest(key="nope")) == nf
    assert code(stub.Usage, pb.UsageRequest(key="nope")) == nf
    assert code(commit, stub, "x", "nope") == nf
    commit(stub, "A", "a")
    assert code(commit, stub, "B", "A") == fp  # not active
    prepare(stub, "c", "A")
    assert code(commit, stub, "A", "c") == ae  # name exists
    assert code(stub.Remove, pb.RemoveSnapshotRequest(key="A")) == fp  # has a child
    stub.View(pb.ViewSnapshotRequest(key="v", parent="A"))
    assert code(commit, stub, "V", "v") == fp  # views cannot be committed
    assert code(prepare, stub, "") == ia
    assert code(prepare, stub, "big", "", {"k": "v" * 5000}) == ia
    # rebase (Commit.parent, containerd 2.2): allowed when the active had no parent
    prepare(stub, "r")
    commit(stub, "R", "r", parent="A")
    assert stub.Stat(pb.StatSnapshotRequest(key="R")).info.parent == "A"
    assert code(commit, stub, "C2", "c", None, "R") == ia  # cannot change an existing parent
    stub.Remove(pb.RemoveSnapshotRequest(key="c"))
    stub.Remove(pb.RemoveSnapshotRequest(key="v"))
    stub.Remove(pb.RemoveSnapshotRequest(key="R"))
    stub.Remove(pb.RemoveSnapshotRequest(key="A"))
    assert listing(stub) == []
    stub.Cleanup(pb.CleanupRequest())


def test_update_masks(client):
    stub, _ = client
    prepare(stub, "a", labels={"x": "1", "y": "2"})

    def upd(labels, *paths):
        req = pb.UpdateSnapshotRequest(info=pb.Info(name="a", labels=labels))
        if paths:
            req.update_mask.paths.extend(paths)
        return dict(stub.Update(req).info.labels)

    assert upd({"z": "3"}) == {"z": "3"}  # no mask: replace all
    assert upd({"x": "9", "q": "ignored"}, "labels.x") == {"z": "3", "x": "9"}
    assert upd({}, "labels.z") == {"x": "9"}  # absent value deletes
    assert upd({"a": "b"}, "labels") == {"a": "b"}
    with pytest.raises(grpc.RpcError) as ei:
        upd({"a": "c"}, "parent")
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert code(stub.Update, pb.UpdateSnapshotRequest(info=pb.Info(name="nope"))) == grpc.StatusCode.NOT_FOUND
    # Commit replaces the labels; the active's labels are not inherited
    commit(stub, "A", "a", {"only": "this"})
    assert dict(stub.Stat(pb.StatSnapshotRequest(key="A")).info.labels) == {"only": "this"}


def test_list_filters(client):
    stub, _ = client
    prepare(stub, "a", labels={"containerd.io/snapshot.ref": "sha256:aa"})
    commit(stub, "A", "a", {"containerd.io/snapshot.ref": "sha256:aa", "team": "red"})
    prepare(stub, "b", "A", {"team": "blue"})

    def names(*f):
        return sorted(i.name for i in listing(stub, *f))

    assert names() == ["A", "b"]
    assert names('labels."containerd.io/snapshot.ref"==sha256:aa,parent==""') == ["A"]
    assert names('labels."containerd.io/snapshot.ref"==sha256:aa,parent=="X"') == []
    assert names("kind==active") == ["b"]
    assert names("labels.team==red", "labels.team==blue") == ["A", "b"]
    assert names("labels.team!=red") == ["b"]
    assert names("name~=/^[Aa]$/") == ["A"]
    assert names("labels.team") == ["A", "b"]
    assert code(listing, stub, 'labels."unterminated==1') == grpc.StatusCode.INVALID_ARGUMENT


def test_list_batches_of_100(client):
    stub, _ = client
    for i in range(150):
        prepare(stub, f"k{i}")
    replies = list(stub.List(pb.ListSnapshotsRequest()))
    assert [len(r.info) for r in replies] == [100, 50]


def test_async_remove_defers_to_cleanup(stack_factory):
    s = stack_factory({"asyncRemove": True}, start=False)
    s.start_snapshotter()
    stub, ch = s.snapshot_client()
    try:
        prepare(stub, "a")
        stub.Remove(pb.RemoveSnapshotRequest(key="a"))
        assert s.backend() == [] and s.snapshot_dirs() == ["1"]  # directory left for Cleanup
        stub.Cleanup(pb.CleanupRequest())
        assert s.snapshot_dirs() == []
    finally:
        ch.close()


def test_reconcile_drops_rows_without_dirs(stack_factory):
    import shutil

    s = stack_factory(start=False)
    s.start_snapshotter()
    stub, ch = s.snapshot_client()
    prepare(stub, "a")
    commit(stub, "A", "a")
    prepare(stub, "b", "A")
    ch.close()
    s.stop_snapshotter()
    shutil.rmtree(s.snap_root / "snapshots" / "2")  # b's directory vanished (e.g. manual cleanup)
    (s.snap_root / "snapshots" / "77").mkdir()  # a stray directory no row owns
    s.start_snapshotter()
    assert [i.name for i in s.backend()] == ["A"] and s.snapshot_dirs() == ["1"]
    assert "dropped" in s.log("snapshotter") and "'77'" in s.log("snapshotter")
