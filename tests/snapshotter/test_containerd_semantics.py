"""Issue 10: containerd's exact semantics, and no way to crash, stall or misuse the snapshotter.

Each item over gRPC with the project's stubs (straight to the snapshotter socket), or through containerd
1.6 where containerd sees the behaviour; codes and messages are containerd's where containerd has one
(`snapshots/storage/bolt.go`, `snapshots/overlay/overlay.go`, `labels/validate.go`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
from helpers.wait import wait_for
from overlaybd.containerd_api import snapshots_pb2 as pb
from overlaybd.snapshotter import labels as L

DIGEST = "sha256:" + "ab" * 32
REF = "sha256:" + "cd" * 32


def remote_labels(image_ref: str = "127.0.0.1:5999/x/y:1", ref: str = REF) -> dict[str, str]:
    """A lazily loaded overlaybd layer: committed at Prepare without touching the registry or a device."""
    return {
        L.TARGET_SNAPSHOT_REF: ref,
        L.TARGET_IMAGE_REF: image_ref,
        L.BLOB_DIGEST: DIGEST,
        L.BLOB_SIZE: "4096",
    }


def rpc_error(fn, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args)
    return ei.value


def prepare(stub, key: str, parent: str = "", labels: dict[str, str] | None = None):
    return stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="overlaybd", key=key, parent=parent, labels=labels or {}))


def remote_layer(stub, ref: str = REF) -> str:
    """Commit a lazy overlaybd layer named `ref` (the remote-snapshot protocol answers AlreadyExists)."""
    err = rpc_error(prepare, stub, "extract-1", "", remote_labels(ref=ref))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()
    return ref


def _ns(ts) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


# -- Update / Commit times ---------------------------------------------------------------------------------------
def test_commit_sets_created_and_updated_to_commit_time(client):
    stub, _ = client
    prepare(stub, "a")
    before = stub.Stat(pb.StatSnapshotRequest(key="a")).info
    time.sleep(0.05)
    stub.Commit(pb.CommitSnapshotRequest(name="A", key="a"))
    info = stub.Stat(pb.StatSnapshotRequest(key="A")).info
    assert _ns(info.created_at) == _ns(info.updated_at)  # bolt.go CommitActive: si.Updated = si.Created = now
    assert _ns(info.created_at) >= _ns(before.created_at) + 50_000_000
    # ... and it survives a restart (the store writes created_ns)
    listed = [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]
    assert _ns(listed[0].created_at) == _ns(info.created_at)


# -- Usage -------------------------------------------------------------------------------------------------------
def _ctr_usage(stack, snapshotter: str, key: str) -> tuple[int, int]:
    out = stack.ctr("snapshots", "--snapshotter", snapshotter, "usage", "-b", key).stdout.splitlines()
    fields = out[-1].split()
    return int(fields[-2]), int(fields[-1])


def _ctr_upper(stack, snapshotter: str, key: str) -> Path:
    out = stack.ctr("snapshots", "--snapshotter", snapshotter, "mounts", "/mnt", key).stdout.split()
    return Path(out[3])  # mount -t bind <source> /mnt -o rw,rbind


@pytest.mark.containerd
def test_usage_matches_containerd_overlayfs(stack):
    """The snapshot's root directory counts, active and committed: the same numbers as containerd's overlayfs."""
    payload = os.urandom(64 << 10)
    got: dict[str, list[tuple[int, int]]] = {}
    for sn in ("overlayfs", "overlaybd"):
        stack.ctr("snapshots", "--snapshotter", sn, "prepare", "u-active")
        upper = _ctr_upper(stack, sn, "u-active")
        (upper / "d").mkdir()
        (upper / "d" / "f").write_bytes(payload)
        os.sync()
        active = _ctr_usage(stack, sn, "u-active")
        stack.ctr("snapshots", "--snapshotter", sn, "commit", "u-committed", "u-active")
        got[sn] = [active, _ctr_usage(stack, sn, "u-committed")]
    assert got["overlaybd"] == got["overlayfs"], got
    root_blocks = os.lstat(stack.snap_root / "snapshots").st_blocks  # an empty ext4 dir: 4096 bytes
    if root_blocks == 8:
        assert got["overlaybd"][0] == (73728, 3)  # the numbers: root + d + 64 KiB file


# -- Mounts on a committed key ------------------------------------------------------------------------------------
def test_mounts_of_committed_is_failed_precondition(client):
    stub, _ = client
    prepare(stub, "a")
    stub.Commit(pb.CommitSnapshotRequest(name="A", key="a"))
    err = rpc_error(stub.Mounts, pb.MountsRequest(key="A"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "failed to get active mount: requested snapshot A not active or view: failed precondition"
    err = rpc_error(stub.Mounts, pb.MountsRequest(key="nope"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "failed to get active mount: snapshot does not exist: not found"


@pytest.mark.containerd
def test_mounts_of_committed_through_containerd(stack):
    sn = ("snapshots", "--snapshotter", "overlaybd")
    stack.ctr(*sn, "prepare", "m-a")
    stack.ctr(*sn, "commit", "m-A", "m-a")
    r = stack.ctr(*sn, "mounts", "/mnt", "m-A", check=False)
    assert r.returncode != 0 and "not active or view: failed precondition" in r.stderr, r.stderr


# -- record-trace-path ---------------------------------------------------------------------------------------------
def _record_labels(path: str) -> dict[str, str]:
    return {L.RECORD_TRACE: "yes", L.RECORD_TRACE_PATH: path}


def test_record_trace_path_confined(client, tmp_path):
    stub, s = client
    layer = remote_layer(stub)
    trace_dir = s.snap_root / "trace"
    assert trace_dir.is_dir()
    outside = tmp_path / "victim"
    outside.write_text("precious")
    (tmp_path / "victim.ok").write_text("ok")
    (tmp_path / "victim.lock").write_text("lock")
    (trace_dir / "escape").symlink_to(tmp_path)  # a directory symlink out of the trace dir
    (trace_dir / "link").symlink_to(outside)  # a file symlink out of it
    for bad in (
        str(outside),
        f"{trace_dir}/../../victim",
        f"{trace_dir}/escape/victim",
        f"{trace_dir}/link",
        f"{trace_dir}//t",
        f"{trace_dir}/missing/t",
        "/etc/passwd",
    ):
        err = rpc_error(prepare, stub, "rec", layer, _record_labels(bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, err.details())
        assert err.details().startswith(f"label {L.RECORD_TRACE_PATH}="), err.details()
        assert err.details().endswith(": invalid argument")
    assert outside.read_text() == "precious"
    assert (tmp_path / "victim.ok").read_text() == "ok" and (tmp_path / "victim.lock").read_text() == "lock"
    assert [i.name for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info] == [layer]


def test_record_trace_failed_prepare_keeps_files(client):
    """An allowed path whose Prepare then fails (no device frontend here) leaves the files as they were."""
    stub, s = client
    layer = remote_layer(stub)
    trace = s.snap_root / "trace" / "t"
    trace.write_text("earlier trace")
    Path(f"{trace}.ok").write_text("done")
    err = rpc_error(prepare, stub, "rec", layer, _record_labels(str(trace)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert trace.read_text() == "earlier trace" and Path(f"{trace}.ok").read_text() == "done"
    assert not Path(f"{trace}.lock").exists()
    assert sorted(p.name for p in trace.parent.iterdir()) == ["t", "t.ok"]


# -- List filters --------------------------------------------------------------------------------------------------
def test_list_regex_is_linear_time(client):
    stub, _ = client
    prepare(stub, "a" * 28 + "!")
    prepare(stub, "aaaa")
    start = time.monotonic()
    names = [i.name for r in stub.List(pb.ListSnapshotsRequest(filters=['name~="^(a+)+$"'])) for i in r.info]
    assert names == ["aaaa"] and time.monotonic() - start < 2.0
    err = rpc_error(lambda: list(stub.List(pb.ListSnapshotsRequest(filters=[r"name~=/(a)\1/"]))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad regexp" in err.details(), err.details()


def test_list_matches_outside_the_store_lock(tmp_path, monkeypatch):
    from overlaybd.config.snapshotter import config_from_dict
    from overlaybd.snapshotter import service

    sn = service.Snapshotter(config_from_dict({"root": str(tmp_path / "root")}), None)
    try:
        sn.prepare("k1", "", {})
        held: list[bool] = []

        def predicate(_s) -> bool:
            held.append(sn.store._lock._is_owned())
            return True

        monkeypatch.setattr(service, "compile_filters", lambda _f: predicate)
        assert [s.key for s in sn.list(["name~=/k/"])] == ["k1"]
        assert held == [False]
    finally:
        sn.close()


# -- Labels and keys -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1" * 40, "9223372036854775808", "0", "²", "-1", " 1"])
def test_numeric_label_range_checked(client, value):
    stub, s = client
    err = rpc_error(prepare, stub, "k", "", {**remote_labels(), L.BLOB_SIZE: value})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(f"label {L.BLOB_SIZE}=") and err.details().endswith(": invalid argument")
    assert "Traceback" not in s.log("snapshotter")
    assert s.backend() == []


def test_largest_blob_size_stored(client):
    stub, _ = client
    remote_layer_labels = {**remote_labels(), L.BLOB_SIZE: str((1 << 63) - 1)}
    assert rpc_error(prepare, stub, "k", "", remote_layer_labels).code() == grpc.StatusCode.ALREADY_EXISTS
    assert stub.Usage(pb.UsageRequest(key=REF)).size == (1 << 63) - 1


def test_label_size_containerd_message(client):
    stub, _ = client
    err = rpc_error(prepare, stub, "k", "", {"k" * 20: "v" * 4077})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # labels.Validate of containerd 1.6: the key cut to 10 bytes
    assert (
        err.details() == "label key and value greater than maximum size (4096 bytes), key: kkkkkkkkkk: invalid argument"
    )
    prepare(stub, "ok", "", {"k" * 20: "v" * 4076})


def test_key_size_bounded(client):
    stub, s = client
    huge = "k" * (1 << 20)
    err = rpc_error(prepare, stub, huge)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.details()) < 1024, err.details()[:200]
    assert err.details().startswith("snapshot key is 1048576 bytes, greater than maximum size (4096 bytes)")
    big = "k" * 4096
    prepare(stub, big)
    err = rpc_error(prepare, stub, big)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS  # not RESOURCE_EXHAUSTED for an oversized message
    err = rpc_error(stub.Commit, pb.CommitSnapshotRequest(name=huge, key=big))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("snapshot name is 1048576")
    assert [i.name for i in s.backend()] == [big]


def test_log_lines_escape_control_characters(client):
    stub, s = client
    evil = "evil\nFORGED log line\x00\x1b[31m"
    prepare(stub, evil)
    rpc_error(prepare, stub, evil)  # AlreadyExists: logged at debug level with the key
    rpc_error(prepare, stub, "x", "", remote_labels(ref="ref\nFORGED remote"))
    log = s.log("snapshotter")
    assert not any(line.startswith("FORGED") for line in log.splitlines()), log
    assert "evil\\x0aFORGED log line\\x00\\x1b[31m" in log and "ref\\x0aFORGED remote" in log
    assert [i.name for i in s.backend()][0] == evil  # the key itself is stored as given


# -- Start order ---------------------------------------------------------------------------------------------------
def test_snapshotter_starts_before_the_frontend(stack_factory):
    s = stack_factory(start=False)
    s.start_snapshotter()
    stub, ch = s.snapshot_client()
    try:
        layer = remote_layer(stub)
        sd = next(p for p in (s.snap_root / "snapshots").iterdir())
        ch.close()
        s.stop_snapshotter()
        mark = sd / "block" / "backstore_mark"
        mark.write_text("/dev/loop250")  # a device of a daemon that is gone: reconcile must ask the frontend
        s.start_snapshotter()  # no overlaybd-tcmu yet: starts anyway
        time.sleep(0.5)
        assert s.snapshotter.poll() is None and "Traceback" not in s.log("snapshotter"), s.log("snapshotter")
        assert "device reconcile deferred until the frontend is up" in s.log("snapshotter")
        stub, ch = s.snapshot_client()
        prepare(stub, "plain")  # ordinary snapshots need no frontend
        err = rpc_error(prepare, stub, "c1", layer)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert f"FUSE frontend at {s.fuse_sock} is not reachable" in err.details(), err.details()
        assert mark.exists()
        # the frontend appears: the deferred reconcile runs (the stale device is forgotten) with no restart
        s.start_daemon()
        wait_for(lambda: not mark.exists(), 15, "the deferred device reconcile")
        err = rpc_error(prepare, stub, "c3", layer)  # now the daemon itself answers (the registry is absent)
        assert "is not reachable" not in err.details(), err.details()
        assert s.snapshotter.poll() is None
    finally:
        ch.close()


# -- Registry down during Prepare -----------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


@pytest.mark.parametrize("deadline", [3])
def test_registry_wait_bounded_by_read_deadline(stack_factory, tmp_path, deadline):
    obd = tmp_path / "overlaybd.json"
    obd.write_text(json.dumps({"readDeadlineSec": deadline}))
    host = f"127.0.0.1:{_closed_port()}"
    s = stack_factory(
        {"overlaybdConfigPath": str(obd), "mirrorRegistry": [{"host": host, "insecure": True}]}, start=False
    )
    s.start_snapshotter()
    stub, ch = s.snapshot_client()
    try:
        labels = {**remote_labels(f"{host}/x/y:1"), L.ACCELERATION_LAYER: "yes"}
        result: dict[str, object] = {}

        def call() -> None:
            start = time.monotonic()
            result["err"] = rpc_error(prepare, stub, "accel", "some-parent", labels)
            result["elapsed"] = time.monotonic() - start

        t = threading.Thread(target=call)
        t.start()
        t.join(60)
        err = result["err"]
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert DIGEST in err.details()
        # retried until the deadline (the next pause would pass it), not the fixed 10 s of before
        assert deadline / 2 <= float(result["elapsed"]) < deadline + 4, result["elapsed"]
    finally:
        ch.close()
