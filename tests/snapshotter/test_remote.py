"""Lazy overlaybd images end to end on the host: overlaybd-convert -> docker-registry -> rpull ->
ctr run --snapshotter=overlaybd, with the device served by the daemon's FUSE frontend (no TCMU here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers.containerd_stack import rpull
from helpers.oci_images import busybox_layer, files_layer, write_layout
from overlaybd.cli.convert import main as convert_main

pytestmark = [pytest.mark.containerd, pytest.mark.registry]


@pytest.fixture
def obd_image(registry, tmp_path) -> tuple[str, list[str]]:
    """A two-layer busybox image converted to overlaybd and pushed; returns (ref, layer digests)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_layout(src, "localhost/t/bb:1", [busybox_layer(), files_layer({"etc/motd": b"lazy hello\n"})])
    assert convert_main([f"oci:{src}", f"oci:{dst}:obd", "--vsize", "1", "--work-dir", str(tmp_path)]) == 0
    ref = registry.push_layout(dst, "obd", "obd/busybox:1")
    import json

    idx = json.loads((dst / "index.json").read_text())
    mdigest = idx["manifests"][0]["digest"]
    manifest = json.loads((dst / "blobs/sha256" / mdigest[7:]).read_text())
    return ref, [ly["digest"] for ly in manifest["layers"]]


def test_rpull_then_run_lazily(lazy_stack, obd_image, cname):
    ref, layer_digests = obd_image
    rpull(lazy_stack, ref)
    content = lazy_stack.ctr("content", "ls", "-q").stdout.split()
    assert not set(layer_digests) & set(content)  # layers were never downloaded into containerd
    out = lazy_stack.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "overlaybd",
        ref,
        cname,
        "/bin/sh",
        "-c",
        "cat /etc/os-release /etc/motd; echo written > /tmp/w; cat /tmp/w",
    )
    assert "ID=obdtest" in out.stdout and "lazy hello" in out.stdout and "written" in out.stdout
    # the lazy layers are committed remote snapshots with a config.v1.json fetching from the registry
    remote = [i for i in lazy_stack.backend() if i.labels.get("containerd.io/snapshot/remote") == "remote snapshot"]
    assert len(remote) == 2
    configs = list(Path(lazy_stack.snap_root / "snapshots").glob("*/block/config.v1.json"))
    assert any(f"http://{ref.split('/')[0]}/v2/obd/busybox/blobs" in c.read_text() for c in configs)


def test_rpull_twice_and_gc(lazy_stack, obd_image, cname):
    ref, _ = obd_image
    rpull(lazy_stack, ref)
    rpull(lazy_stack, ref)  # idempotent
    lazy_stack.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, cname, "/bin/true")
    lazy_stack.ctr("image", "rm", "--sync", ref)
    import time

    for _ in range(100):
        if not lazy_stack.backend():
            break
        time.sleep(0.1)
    assert lazy_stack.backend() == []


def test_ordinary_image_via_ctr_pull(lazy_stack, registry, tmp_path, cname):
    layout = tmp_path / "plain"
    write_layout(layout, "plain", [busybox_layer("ID=plain\n")])
    ref = registry.push_layout(layout, "plain", "plain/busybox:1")
    lazy_stack.ctr("image", "pull", "--plain-http", "--snapshotter", "overlaybd", ref)
    out = lazy_stack.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, cname, "/bin/cat", "/etc/os-release")
    assert "ID=plain" in out.stdout
    assert not any("remote" in i.labels.get("containerd.io/snapshot/remote", "") for i in lazy_stack.backend())


def test_registry_down_during_prepare(lazy_stack, obd_image, registry, cname):
    ref, _ = obd_image
    rpull(lazy_stack, ref)
    registry.stop()
    r = lazy_stack.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, cname, "/bin/true", check=False, timeout=300)
    assert r.returncode != 0
    assert "failed to attach overlaybd device" in r.stderr, r.stderr
    assert registry.host in r.stderr or "connect" in r.stderr.lower(), r.stderr
    registry.start()
    out = lazy_stack.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, cname, "/bin/cat", "/etc/motd")
    assert "lazy hello" in out.stdout


@pytest.mark.parametrize("point", ["remote.before-commit", "remote.after-commit"])
def test_snapshotter_killed_mid_rpull(lazy_stack, obd_image, cname, point):
    ref, _ = obd_image
    lazy_stack.restart_snapshotter({"OVERLAYBD_SNAPSHOTTER_CRASH": point})
    r = rpull(lazy_stack, ref, check=False)
    assert r.returncode != 0
    lazy_stack.start_snapshotter()
    rpull(lazy_stack, ref)
    out = lazy_stack.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, cname, "/bin/cat", "/etc/motd")
    assert "lazy hello" in out.stdout


def test_snapshotter_killed_with_running_lazy_container(lazy_stack, obd_image, cname):
    ref, _ = obd_image
    rpull(lazy_stack, ref)
    lazy_stack.ctr("run", "-d", "--snapshotter", "overlaybd", ref, cname, "/bin/sleep", "600")
    lazy_stack.restart_snapshotter()
    r = lazy_stack.ctr("task", "exec", "--exec-id", "e1", cname, "/bin/cat", "/etc/motd")
    assert "lazy hello" in r.stdout
    lazy_stack.ctr("task", "kill", "-s", "SIGKILL", cname)
    import time

    for _ in range(50):
        if lazy_stack.ctr("task", "delete", cname, check=False).returncode == 0:
            break
        time.sleep(0.1)
    lazy_stack.ctr("container", "rm", cname)
    out = lazy_stack.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, cname + "b", "/bin/cat", "/etc/motd")
    assert "lazy hello" in out.stdout


def _top_remote(stack):
    remote = [i for i in stack.backend() if i.labels.get("containerd.io/snapshot/remote")]
    parents = {i.parent for i in remote}
    return [i.name for i in remote if i.name not in parents][0]


def _mounted_source(m, tmp_path, name):
    """Mount a returned Mount (bind or a block device) at tmp_path/name; returns the path."""
    target = tmp_path / name
    target.mkdir()
    subprocess.run(["mount", "-t", m.type, "-o", ",".join(m.options), m.source, str(target)], check=True)
    return target


def test_writable_dir_and_dev_and_commit_seals(lazy_stack, obd_image, tmp_path):
    from overlaybd.containerd_api import snapshots_pb2 as pb

    ref, _ = obd_image
    rpull(lazy_stack, ref)
    top = _top_remote(lazy_stack)
    stub, ch = lazy_stack.snapshot_client()
    w = "containerd.io/snapshot/overlaybd.writable"
    try:
        m = stub.Prepare(pb.PrepareSnapshotRequest(key="w1", parent=top, labels={w: "dir"})).mounts
        assert len(m) == 1 and m[0].type == "bind" and m[0].source.endswith("/block/mountpoint")
        root = Path(m[0].source)
        assert (root / "etc/motd").read_text() == "lazy hello\n"
        (root / "etc/new").write_text("sealed data\n")
        sid = root.parent.parent.name
        stub.Commit(pb.CommitSnapshotRequest(name="W1", key="w1", labels={"x": "y"}))
        info = stub.Stat(pb.StatSnapshotRequest(key="W1")).info
        sealed = lazy_stack.snap_root / "snapshots" / sid / "fs/overlaybd.sealed"
        assert info.labels["containerd.io/snapshot/overlaybd.localcommitpath"] == str(sealed)
        assert sealed.exists() and not (lazy_stack.snap_root / "snapshots" / sid / "block/writable_data").exists()
        # a container on the sealed layer (rwMode overlayfs) sees the committed file through the RO device
        m = stub.Prepare(pb.PrepareSnapshotRequest(key="c1", parent="W1")).mounts
        assert m[0].type == "overlay"
        lower = [o for o in m[0].options if o.startswith("lowerdir=")][0][len("lowerdir=") :]
        assert Path(lower, "etc/new").read_text() == "sealed data\n"
        # dev mode: the raw block device is returned as an ext4 mount
        m = stub.Prepare(pb.PrepareSnapshotRequest(key="d1", parent=top, labels={w: "dev"})).mounts
        assert m[0].type == "ext4" and m[0].source.startswith("/dev/") and "discard" in m[0].options
        mnt = _mounted_source(m[0], tmp_path, "dev")
        try:
            assert (mnt / "etc/motd").exists()
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        for key in ("d1", "c1", "W1"):
            stub.Remove(pb.RemoveSnapshotRequest(key=key))
    finally:
        ch.close()


def test_ctr_run_writable_label_persists(lazy_stack, obd_image, cname):
    ref, _ = obd_image
    rpull(lazy_stack, ref)
    lazy_stack.ctr(
        "container",
        "create",
        "--snapshotter",
        "overlaybd",
        "--snapshotter-label",
        "containerd.io/snapshot/overlaybd.writable=dir",
        "--",
        ref,
        cname,
        "/bin/sh",
        "-c",
        "cat /data/n 2>/dev/null; echo again >> /data/n; mount | grep ' / '",
    )
    first = lazy_stack.ctr("task", "start", cname).stdout
    second = lazy_stack.ctr("task", "start", cname).stdout
    assert "again" not in first and "again" in second
    assert "type ext4" in first  # rootfs is the writable overlaybd device itself, not an overlay
    lazy_stack.ctr("container", "rm", cname)


def test_rwmode_dir_sparse_from_config(stack_factory, registry, obd_image, cname):
    s = stack_factory(
        {"mirrorRegistry": [{"host": registry.host, "insecure": True}], "rwMode": "dir", "writableLayerType": "sparse"},
        start=False,
    )
    s.start_daemon()
    s.start_snapshotter()
    s.start_containerd()
    ref, _ = obd_image
    rpull(s, ref)
    out = s.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "overlaybd",
        ref,
        cname,
        "/bin/sh",
        "-c",
        "echo x > /tmp/y; cat /etc/motd; mount | grep ' / '",
    ).stdout
    assert "lazy hello" in out and "type ext4" in out


def test_auto_remove_dev(stack_factory, registry, obd_image, cname):
    s = stack_factory(
        {"mirrorRegistry": [{"host": registry.host, "insecure": True}], "autoRemoveDev": True}, start=False
    )
    s.start_daemon()
    s.start_snapshotter()
    s.start_containerd()
    ref, _ = obd_image
    rpull(s, ref)
    s.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, cname, "/bin/true")
    assert list((s.snap_root / "snapshots").glob("*/block/backstore_mark"))  # (GC has not removed the rootfs yet)
    s.gc()  # containerd removes the container's snapshot from the backend
    assert not list((s.snap_root / "snapshots").glob("*/block/backstore_mark"))  # device detached again


def test_ctr_pull_of_overlaybd_image_is_local_block(lazy_stack, obd_image, cname):
    """Without rpull the layers are downloaded and unpacked by containerd (upstream's "localBD"): the unpacked
    overlaybd.commit files become the device's lowers, and the container still sees the image's tree."""
    ref, _ = obd_image
    lazy_stack.ctr("image", "pull", "--plain-http", "--snapshotter", "overlaybd", ref)
    out = lazy_stack.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, cname, "/bin/cat", "/etc/motd")
    assert "lazy hello" in out.stdout
    configs = list((lazy_stack.snap_root / "snapshots").glob("*/block/config.v1.json"))
    assert configs and all("overlaybd.commit" in c.read_text() for c in configs)


def test_crash_during_remove_of_writable_releases_device(lazy_stack, obd_image):
    """Row deleted, then the snapshotter dies before unmount/detach: the next start unmounts and detaches."""
    from overlaybd.containerd_api import snapshots_pb2 as pb
    from overlaybd.fuse.control import request

    ref, _ = obd_image
    rpull(lazy_stack, ref)
    top = _top_remote(lazy_stack)
    lazy_stack.restart_snapshotter({"OVERLAYBD_SNAPSHOTTER_CRASH": "remove.after-commit"})
    stub, ch = lazy_stack.snapshot_client()
    try:
        m = stub.Prepare(
            pb.PrepareSnapshotRequest(key="w1", parent=top, labels={"containerd.io/snapshot/overlaybd.writable": "dir"})
        )
        sid = Path(m.mounts[0].source).parent.parent.name
        import grpc

        with pytest.raises(grpc.RpcError):  # the snapshotter died mid-RPC
            stub.Remove(pb.RemoveSnapshotRequest(key="w1"))
    finally:
        ch.close()
    assert lazy_stack.snapshotter.wait(10) == 137
    devices = request({"op": "list"}, str(lazy_stack.fuse_sock))["devices"]
    assert any(k.endswith(f"-{sid}") for k in devices)
    lazy_stack.start_snapshotter()
    devices = request({"op": "list"}, str(lazy_stack.fuse_sock))["devices"]
    assert not any(k.endswith(f"-{sid}") for k in devices), (
        f"device of snapshot {sid} still attached after restart: {devices}\n"
        f"--- snapshotter log ---\n{lazy_stack.log('snapshotter')}\n--- daemon log ---\n{lazy_stack.log('daemon')}"
    )
    assert sid not in lazy_stack.snapshot_dirs()


def test_daemon_restart_reconciles_devices(lazy_stack, obd_image, cname):
    """The device daemon dies: the snapshotter's next start drops the dead device mounts and marks,
    and the next container attaches the layer again."""
    ref, _ = obd_image
    rpull(lazy_stack, ref)
    lazy_stack.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, cname, "/bin/true")
    marks = list((lazy_stack.snap_root / "snapshots").glob("*/block/backstore_mark"))
    assert marks  # the layer device stays attached (autoRemoveDev false)
    lazy_stack.kill_daemon()
    lazy_stack.start_daemon()
    lazy_stack.restart_snapshotter()
    assert not any(m.exists() for m in marks)
    out = lazy_stack.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, cname + "b", "/bin/cat", "/etc/motd")
    assert "lazy hello" in out.stdout
