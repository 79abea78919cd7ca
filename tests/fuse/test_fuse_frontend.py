"""The FUSE single-file frontend on the host kernel: real /dev/fuse, real loop devices, real ext4."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers.fuse_standin import RawFileImage, make_ext4, umount
from overlaybd.fuse.server import FuseError, FuseFileServer
from overlaybd.host import loop

pytestmark = pytest.mark.root  # FUSE mount, loop devices

BLOB = bytes((7 * i + 3) & 255 for i in range(20000))


def _serve(undo, image, mountpoint: Path, **kw) -> FuseFileServer:
    srv = FuseFileServer(image, str(mountpoint), **kw)
    srv.start()
    undo.append(srv.stop)
    return srv


def _attach(undo, path: Path, read_only: bool) -> str:
    dev = loop.attach(str(path), read_only=read_only)
    undo.append(lambda: loop.detach(dev))
    return dev


def _mount(undo, dev: str, mnt: Path, opts: str) -> None:
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "ext4", "-o", opts, dev, str(mnt)], check=True)
    undo.append(lambda: umount(str(mnt)))


def test_raw_reads_match_backing_file(tmp_path, host_blockdev):
    raw = tmp_path / "raw.img"
    raw.write_bytes(os.urandom(3 * 1024 * 1024 + 512))
    img = RawFileImage(str(raw), read_only=True)
    host_blockdev.append(img.close)
    mp = tmp_path / "disk.img"
    _serve(host_blockdev, img, mp)
    assert mp.stat().st_size == raw.stat().st_size
    assert mp.read_bytes() == raw.read_bytes()
    with pytest.raises(OSError):
        os.open(mp, os.O_RDWR)


def test_mountpoint_must_be_a_file(tmp_path, host_blockdev):
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 4096)
    img = RawFileImage(str(raw), read_only=True)
    host_blockdev.append(img.close)
    with pytest.raises(FuseError, match="mountpoint"):
        FuseFileServer(img, str(tmp_path)).start()


def test_readwrite_ext4_through_loop_survives_reopen(tmp_path, host_blockdev):
    raw = tmp_path / "fs.img"
    make_ext4(raw, 64 * 1024 * 1024, {"etc/hello.txt": b"hello overlaybd\n"})
    img = RawFileImage(str(raw))
    mp = tmp_path / "disk.img"
    srv = _serve(host_blockdev, img, mp)
    dev = _attach(host_blockdev, mp, read_only=False)
    mnt = tmp_path / "mnt"
    _mount(host_blockdev, dev, mnt, "rw,discard")
    assert (mnt / "etc/hello.txt").read_text() == "hello overlaybd\n"
    (mnt / "new.bin").write_bytes(BLOB * 50)
    (mnt / "new.bin").unlink()
    (mnt / "kept.bin").write_bytes(BLOB)
    subprocess.run(["sync"], check=True)
    subprocess.run(["fstrim", str(mnt)], check=True)
    assert img.discards, "fstrim must reach the image as discard"
    # tear down in order: umount, detach, unmount fuse, close
    for fn in reversed(host_blockdev[-3:]):
        fn()
    del host_blockdev[-3:]
    srv.stop()
    assert img.fsyncs > 0
    img.close()
    # re-open read-only and verify
    img2 = RawFileImage(str(raw), read_only=True)
    host_blockdev.append(img2.close)
    mp2 = tmp_path / "disk2.img"
    _serve(host_blockdev, img2, mp2)
    dev2 = _attach(host_blockdev, mp2, read_only=True)
    _mount(host_blockdev, dev2, mnt, "ro,noload")
    assert (mnt / "kept.bin").read_bytes() == BLOB
    assert not (mnt / "new.bin").exists()
