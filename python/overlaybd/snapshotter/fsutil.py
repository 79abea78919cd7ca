"""Filesystem helpers: disk usage like containerd's fs.DiskUsage, mount table, safe removal.

Why: Remove/Cleanup/reconcile must never `rmtree` through a live mount (that would delete
a container's or a device's files), so removal first unmounts everything below the path.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil

from ..host.mount import umount
from ..host.mountinfo import is_mounted, mounts_under

__all__ = ["disk_usage", "is_mounted", "mounts_under", "remove_tree", "umount"]

log = logging.getLogger(__name__)


def disk_usage(path: str) -> tuple[int, int]:
    """(bytes allocated, inodes) below `path`, each hard-linked inode counted once; no crossing of mounts."""
    seen: set[int] = set()
    size = inodes = 0
    try:
        dev = os.lstat(path).st_dev
    except FileNotFoundError:
        return 0, 0
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
