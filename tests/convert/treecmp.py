"""Entry-by-entry snapshot of a directory tree, and the two references the fidelity tests compare with.

`snapshot` records type, mode, uid/gid, size, content hash, link target, rdev, every xattr, mtime
(ns) and hardlink groups. `ext4_dir` gives a directory on a fresh ext4 loop mount (the file system
the convertor writes); `ContainerdRef` imports layers as an OCI image into a real containerd and
mounts the overlayfs snapshotter's view of the top layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from helpers.containerd_stack import Stack, release_below
from helpers.oci_images import write_layout_tar


def _hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "dir"),
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "chr"),
        (stat.S_ISBLK, "blk"),
        (stat.S_ISFIFO, "fifo"),
    ):
        if test(mode):
            return name
    return "other"


def snapshot(root: str, now_ns: int) -> dict[str, dict]:
    """path -> attributes; mtimes at or after `now_ns` (set by the applier's clock) read as "now"."""
    out: dict[str, dict] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = _kind(st.st_mode)
            e: dict = {"type": kind, "uid": st.st_uid, "gid": st.st_gid}
            e["mtime"] = "now" if st.st_mtime_ns >= now_ns else st.st_mtime_ns
            if kind != "symlink":
                e["mode"] = oct(stat.S_IMODE(st.st_mode))
            if kind == "file":
                e["size"], e["sha256"] = st.st_size, _hash(path)
            if kind == "symlink":
                e["target"] = os.readlink(path)
            if kind in ("chr", "blk"):
                e["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            try:
                names = os.listxattr(path, follow_symlinks=False)
            except OSError:
                names = []
            e["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False).hex() for n in sorted(names)}
            if kind != "dir":
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            out[rel] = e
    for group in inodes.values():
        if len(group) > 1:
            for rel in group:
                out[rel]["links"] = sorted(group)
    return out


def diff(ours: dict[str, dict], ref: dict[str, dict]) -> dict[str, object]:
    """Differences as {path: (ours, ref)} or {path/field: (ours, ref)}."""
    out: dict[str, object] = {}
    for p in sorted(set(ours) | set(ref)):
        a, b = ours.get(p), ref.get(p)
        if a is None or b is None:
            out[p] = (a and a["type"], b and b["type"])
            continue
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out[f"{p}/{k}"] = (a.get(k), b.get(k))
    return out


@contextlib.contextmanager
def ext4_dir(size_mb: int = 256) -> Iterator[Path]:
    """A fresh ext4 (the convertor's file system) loop-mounted in a scratch dir; yields the mount point."""
    base = Path(tempfile.mkdtemp(prefix="obdfid-", dir="/tmp"))
    img, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-O", "^has_journal", str(img)],
        check=True,
        capture_output=True,
    )
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        release_below(str(base))
        subprocess.run(["rm", "-rf", str(base)], check=False)


class ContainerdRef:
    """A real containerd (temp root/state/socket) that unpacks layers with its overlayfs snapshotter."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.stack = Stack(base)
        self.stack.start_containerd()
        self.n = 0

    def import_layers(self, layers: list[bytes]) -> subprocess.CompletedProcess:
        """`ctr images import` of an OCI archive holding `layers` (gzip, as registries serve them)."""
        self.n += 1
        name = f"localhost/fidelity/img{self.n}:1"
        tar = self.base / f"img{self.n}.tar"
        write_layout_tar(tar, self.base / f"layout{self.n}", name, layers)
        return self.stack.ctr("images", "import", "--snapshotter", "overlayfs", str(tar), check=False)

    @contextlib.contextmanager
    def view(self, layers: list[bytes]) -> Iterator[Path]:
        """The overlayfs view containerd gives a container of an image made of `layers`."""
        r = self.import_layers(layers)
        assert r.returncode == 0, f"containerd refused the image: {r.stderr}\n{self.stack.log('containerd')}"
        diff_ids = ["sha256:" + hashlib.sha256(raw).hexdigest() for raw in layers]
        chain = diff_ids[0]
        for d in diff_ids[1:]:
            chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
        key = f"view-{self.n}"
        mnt = self.base / f"mnt{self.n}"
        mnt.mkdir()
        self.stack.ctr("snapshots", "--snapshotter", "overlayfs", "view", key, chain)
        cmd = self.stack.ctr("snapshots", "--snapshotter", "overlayfs", "mounts", str(mnt), key).stdout.strip()
        subprocess.run(shlex.split(cmd), check=True, capture_output=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
            self.stack.ctr("snapshots", "--snapshotter", "overlayfs", "rm", key, check=False)

    def close(self) -> None:
        self.stack.close()


def now_ns() -> int:
    return time.time_ns() - 1_000_000_000  # clock granularity slack
