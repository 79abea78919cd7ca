"""Filesystem helpers: disk usage like containerd's fs.DiskUsage, mount table, safe removal.

Why: Remove/Cleanup/reconcile must never `rmtree` through a live mount (that would delete
a container's or a device's files), so removal first unmounts everything below the path.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat

from ..host.mount import umount
from ..host.mountinfo import is_mounted, mounts_under

__all__ = ["confine_path", "disk_usage", "is_mounted", "mounts_under", "remove_tree", "umount"]

log = logging.getLogger(__name__)


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes allocated, inodes) of `path` and everything below it, each hard-linked inode counted once; no
    crossing of mounts. The root itself counts, as in containerd's fs.DiskUsage (filepath.Walk visits it)."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return 0, 0
    dev = top.st_dev
    seen: set[int] = {top.st_ino}
    size, inodes = top.st_blocks * 512, 1
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != dev or st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
                inodes += 1
                size += st.st_blocks * 512
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return size, inodes


def confine_path(path: str, allowed: tuple[str, ...], label: str) -> str:
    """`path` (from a client's label) as a real path inside one of the `allowed` directories, checked without
    changing anything: absolute and normalised (no `..`, `.`, `//`), its directory existing and resolving
    (symlinks followed) inside an allowed directory, and the file itself not a symlink or a non-regular file.
    Anything else is InvalidArgument naming the label. Returns the resolved path to use."""
    from .errors import InvalidArgument
    from .labels import esc

    def refuse(why: str) -> InvalidArgument:
        return InvalidArgument(f"label {label}={esc(path)!r}: {why}: invalid argument")

    if not path.startswith("/") or "\0" in path or os.path.normpath(path) != path or path.endswith("/"):
        raise refuse("must be an absolute, normalised path (no '..', '.' or '//')")
    real_dir = os.path.realpath(os.path.dirname(path))
    roots = [os.path.realpath(d) for d in allowed if d]
    if not any(real_dir == r or real_dir.startswith(r.rstrip("/") + "/") for r in roots):
        raise refuse(f"must be a file in the trace directory {allowed[0]} or the layer's snapshot directory")
    if not os.path.isdir(real_dir):
        raise refuse("its directory does not exist")
    target = os.path.join(real_dir, os.path.basename(path))
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return target
    if not stat.S_ISREG(st.st_mode):
        raise refuse("exists and is not a regular file")
    return target


def remove_tree(path: str) -> None:
    """Unmount everything below `path`, then delete it. Missing path is fine."""
    if not os.path.lexists(path):
        return
    for mp in mounts_under(path):
        umount(mp)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
