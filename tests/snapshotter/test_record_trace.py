"""overlaybd-record-trace end to end: record a container's reads of an rpulled image, publish the image with an
acceleration layer, then rpull it on a fresh host: the trace replay fills the registry cache before any container
reads, so the traced file is readable with the registry stopped.

Also the snapshotter's checks of the record-trace labels (the acceleration layer's format: tests/oci/)."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
from helpers.containerd_stack import VENV_BIN, rpull
from helpers.oci_images import busybox_layer, files_layer, write_layout
from overlaybd.cli.convert import main as convert_main
from overlaybd.format.trace import read_trace
from overlaybd.snapshotter import labels as L

MiB = 1 << 20
BIG = random.Random(7).randbytes(4 * MiB)  # read by the recorded command
COLD = random.Random(8).randbytes(4 * MiB)  # never read: must not be prefetched
COMMAND = ["/bin/sh", "-c", "cat /data/big > /dev/null && echo read-ok"]


def _ready_stack(stack_factory, registry):
    s = stack_factory({"mirrorRegistry": [{"host": registry.host, "insecure": True}]}, start=False)
    s.start_daemon()
    s.start_snapshotter()
    s.start_containerd()
    return s


@pytest.fixture
def traced_image(registry, tmp_path) -> tuple[str, str]:
    """busybox + a layer with /data/big and /data/cold, converted to overlaybd and pushed; (ref, files layer)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_layout(src, "localhost/t/rt:1", [busybox_layer(), files_layer({"data/big": BIG, "data/cold": COLD})])
    assert convert_main([f"oci:{src}", f"oci:{dst}:obd", "--vsize", "1", "--work-dir", str(tmp_path)]) == 0
    ref = registry.push_layout(dst, "obd", "obd/rt:1")
    idx = json.loads((dst / "index.json").read_text())
    manifest = json.loads((dst / "blobs/sha256" / idx["manifests"][0]["digest"][7:]).read_text())
    return ref, manifest["layers"][-1]["digest"]


def _record(
    stack, ref: str, new_ref: str, work: Path, command: list[str] = COMMAND, timeout: int = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(VENV_BIN / "overlaybd-record-trace"),
            "--address",
            str(stack.sock),
            "--plain-http",
            "--timeout",
            str(timeout),
            "--work-dir",
            str(work),
            "--trace-dir",
            str(stack.snap_root / "trace"),
            ref,
            new_ref,
            "--",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _configs(stack) -> list[tuple[Path, dict]]:
    return [(p, json.loads(p.read_text())) for p in (stack.snap_root / "snapshots").glob("*/block/config.v1.json")]


def _cached_bytes(stack, digest: str) -> int:
    """Bytes of blob `digest` held in the daemon's block cache (its sparse data file's allocated size)."""
    files = [
        p
        for p in (stack.base / "cache").rglob("*")
        if p.is_file() and digest[7:] in p.name and not p.name.endswith(".meta")
    ]
    return sum(p.stat().st_blocks * 512 for p in files)


def _wait_replayed(stack) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for text in (stack.log("overlaybd"), stack.log("daemon")):
            for line in text.splitlines():
                if "prefetch trace" in line and "replayed:" in line:
                    return line
        time.sleep(0.2)
    raise AssertionError(f"no trace replay logged\n{stack.log('daemon')}\n{stack.log('overlaybd')}")


@pytest.mark.containerd
@pytest.mark.registry
def test_record_publish_and_replay(stack_factory, registry, traced_image, tmp_path, cname):
    ref, files_digest = traced_image
    new_ref = f"{registry.host}/obd/rt:accel"

    # 1. record on host A
    a = _ready_stack(stack_factory, registry)
    rpull(a, ref)
    # the image's device is in use by a running container: recording would miss its reads, so it is refused
    a.ctr("run", "-d", "--snapshotter", "overlaybd", ref, cname, "/bin/sleep", "600")
    r = _record(a, ref, new_ref, tmp_path / "rec")
    assert r.returncode == 1 and "in use by other snapshots" in r.stderr, r.stderr
    a.ctr("task", "kill", "-s", "SIGKILL", cname)
    a.ctr("task", "delete", "--force", cname)
    a.ctr("container", "rm", cname)
    # still attached but unused now: the snapshotter re-attaches it to record
    r = _record(a, ref, new_ref, tmp_path / "rec")
    assert r.returncode == 0, f"{r.stderr}\n--- snapshotter ---\n{a.log('snapshotter')}\n{a.log('daemon')}"
    assert "read-ok" in r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    trace_path = tmp_path / "rec" / "trace"
    assert summary["records"] > 0 and summary["trace"] == str(trace_path)
    assert list((a.snap_root / "trace").iterdir()) == []  # the recording's own directory is gone
    records = read_trace(trace_path)
    assert {rec.layer_index for rec in records} <= {0, 1} and sum(rec.count for rec in records) >= len(BIG)
    # recording was for that one attach: no layer config keeps recordTracePath
    assert all("recordTracePath" not in cfg for _, cfg in _configs(a))
    # a command that outlives --timeout is killed; what it read until then is published
    r = _record(a, ref, f"{registry.host}/obd/rt:slept", tmp_path / "slept", ["/bin/sleep", "600"], timeout=5)
    assert r.returncode == 0, f"{r.stderr}\n--- snapshotter ---\n{a.log('snapshotter')}"
    assert json.loads(r.stdout.strip().splitlines()[-1])["timedOut"] is True
    assert not a.ctr("container", "ls", "-q").stdout.strip()

    # 2. the published image: the old layers plus the acceleration layer
    b = _ready_stack(stack_factory, registry)
    rpull(b, new_ref, check=True)
    accel = [(p, cfg) for p, cfg in _configs(b) if cfg.get("accelerationLayer")]
    assert len(accel) == 1
    accel_cfg_path, accel_cfg = accel[0]
    assert len(accel_cfg["lowers"]) == 3 and accel_cfg["lowers"][-1]["dir"] == str(accel_cfg_path.parent)
    assert (accel_cfg_path.parent / "trace").read_bytes() == trace_path.read_bytes()
    assert _cached_bytes(b, files_digest) == 0

    # 3. attaching the image (no container reads anything) replays the trace into the cache
    top = [i.name for i in b.backend() if i.labels.get(L.ACCELERATION_LAYER) == "yes"][0]
    from overlaybd.containerd_api import snapshots_pb2 as pb

    stub, ch = b.snapshot_client()
    try:
        stub.Prepare(pb.PrepareSnapshotRequest(key="probe", parent=top))
        line = _wait_replayed(b)
        assert ", 0 errors" in line, line
        cached = _cached_bytes(b, files_digest)
        assert len(BIG) <= cached < len(BIG) + len(COLD), (cached, line)
        stub.Remove(pb.RemoveSnapshotRequest(key="probe"))
        # a writable device on the acceleration layer stacks on the image layers only (the trace layer is left out)
        m = stub.Prepare(pb.PrepareSnapshotRequest(key="w", parent=top, labels={L.WRITABLE: "dir"})).mounts
        wcfg = json.loads((Path(m[0].source).parent / "config.v1.json").read_text())
        assert len(wcfg["lowers"]) == 2 and "accelerationLayer" not in wcfg
        assert (Path(m[0].source) / "data/big").read_bytes() == BIG
        stub.Remove(pb.RemoveSnapshotRequest(key="w"))
    finally:
        ch.close()

    # 4. the traced reads need no registry any more
    registry.stop()
    try:
        out = b.ctr("run", "--rm", "--snapshotter", "overlaybd", new_ref, cname, *COMMAND)
        assert "read-ok" in out.stdout
    finally:
        registry.start()


@pytest.mark.containerd
def test_record_trace_label_checks(stack, tmp_path):
    """Malformed record-trace labels are rejected at Prepare with InvalidArgument, naming the label."""
    import grpc
    from overlaybd.containerd_api import snapshots_pb2 as pb

    stub, ch = stack.snapshot_client()
    try:
        for labels, needle in (
            ({L.RECORD_TRACE: "yes", L.RECORD_TRACE_PATH: "relative/trace"}, L.RECORD_TRACE_PATH),
            ({L.RECORD_TRACE: "yes"}, L.RECORD_TRACE_PATH),
            ({L.RECORD_TRACE: "yes", L.RECORD_TRACE_PATH: str(tmp_path / "t")}, "not an overlaybd layer"),
            ({L.RECORD_TRACE: "yes", L.RECORD_TRACE_PATH: str(tmp_path / "t"), L.WRITABLE: "dir"}, "rwMode"),
        ):
            with pytest.raises(grpc.RpcError) as ei:
                stub.Prepare(pb.PrepareSnapshotRequest(key="rt", labels=labels))
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
            assert needle in ei.value.details()
    finally:
        ch.close()
    assert not (tmp_path / "t").exists()
