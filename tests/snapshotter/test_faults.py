"""Bad labels are rejected with InvalidArgument (also as seen by ctr), and a full state dir gives a clear
ResourceExhausted error without leaving half-created snapshots."""

from __future__ import annotations

import os
import subprocess

import grpc
import pytest
from helpers.containerd_stack import IMAGE
from overlaybd.containerd_api import snapshots_pb2 as pb

DIGEST = "sha256:" + "ab" * 32
REMOTE = {
    "containerd.io/snapshot.ref": "sha256:" + "cd" * 32,
    "containerd.io/snapshot/image-ref": "127.0.0.1:5999/x/y:1",
    "containerd.io/snapshot/overlaybd/blob-digest": DIGEST,
    "containerd.io/snapshot/overlaybd/blob-size": "4096",
}


@pytest.mark.parametrize(
    "bad",
    [
        {"containerd.io/snapshot/overlaybd/blob-digest": "md5:abc"},
        {"containerd.io/snapshot/overlaybd/blob-size": "-1"},
        {"containerd.io/snapshot/overlaybd/blob-size": "12k"},
        {"containerd.io/snapshot/overlaybd/vsize": "0"},
        {"containerd.io/snapshot/overlaybd.writable": "sometimes"},
        {"containerd.io/snapshot/image-ref": "UPPER/Case::bad"},
        {"k": "v" * 4096},
    ],
)
def test_bad_labels_invalid_argument(client, bad):
    stub, s = client
    labels = {**REMOTE, **bad}
    with pytest.raises(grpc.RpcError) as ei:
        stub.Prepare(pb.PrepareSnapshotRequest(key="k1", labels=labels))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    key = next(iter(bad))
    assert key.split("/")[-1][:10] in ei.value.details() or "reference" in ei.value.details()
    assert s.backend() == [] and s.snapshot_dirs() == []


def test_bad_update_label_invalid_argument(client):
    stub, _ = client
    stub.Prepare(pb.PrepareSnapshotRequest(key="k1"))
    req = pb.UpdateSnapshotRequest(info=pb.Info(name="k1", labels={"containerd.io/snapshot/overlaybd/vsize": "x"}))
    req.update_mask.paths.append("labels.containerd.io/snapshot/overlaybd/vsize")
    with pytest.raises(grpc.RpcError) as ei:
        stub.Update(req)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.containerd
def test_bad_label_through_ctr(stack, cname):
    stack.import_busybox()
    r = stack.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "overlaybd",
        "--snapshotter-label",
        "containerd.io/snapshot/overlaybd.writable=sometimes",
        IMAGE,
        cname,
        "/bin/true",
        check=False,
    )
    assert r.returncode != 0
    assert "overlaybd.writable" in r.stderr and "invalid argument" in r.stderr


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs as the snapshotter's state dir (unmounted at teardown)."""
    mnt = tmp_path / "state"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=4000", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: str) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.root  # a tmpfs as the state dir
def test_disk_full_state_dir(stack_factory, small_fs):
    s = stack_factory({"root": str(small_fs / "root")}, start=False)
    s.start_snapshotter()
    stub, ch = s.snapshot_client()
    try:
        stub.Prepare(pb.PrepareSnapshotRequest(key="before"))
        filler = str(small_fs / "filler")
        _fill(filler)
        failures = 0
        for i in range(20):  # the WAL may absorb a few small transactions before the disk-full surfaces
            try:
                stub.Prepare(pb.PrepareSnapshotRequest(key=f"k{i}", labels={"pad": "x" * 3000}))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                assert "no space left" in e.details() and str(small_fs / "root") in e.details()
                failures += 1
        assert failures > 0
        os.unlink(filler)
        stub.Prepare(pb.PrepareSnapshotRequest(key="after"))
        keys = {i.name for i in s.backend()}
        assert {"before", "after"} <= keys
        s.restart_snapshotter()
        assert len(s.backend()) == len(s.snapshot_dirs())
    finally:
        ch.close()


@pytest.mark.containerd
def test_disk_full_surfaces_through_ctr(stack_factory, small_fs, cname):
    s = stack_factory({"root": str(small_fs / "root")})
    _fill(str(small_fs / "filler"))
    from helpers.containerd_stack import IMAGE as image
    from helpers.oci_images import busybox_layer, write_layout_tar

    tar = s.base / "bb.tar"
    write_layout_tar(tar, s.base / "layout", image, [busybox_layer()])
    r = s.ctr("image", "import", "--snapshotter", "overlaybd", str(tar), check=False)
    assert r.returncode != 0 and "no space left in snapshotter root" in r.stderr, r.stderr
    os.unlink(small_fs / "filler")
    s.ctr("image", "import", "--snapshotter", "overlaybd", str(tar))
    out = s.ctr("run", "--rm", "--snapshotter", "overlaybd", image, cname, "/bin/cat", "/etc/os-release")
    assert "ID=obdtest" in out.stdout
