"""Filesystem helpers: disk usage like containerd's fs.DiskUsage, mount table, safe removal.

Why: Remove/Cleanup/reconcile must never `rmtree` through a live mount (that would delete
a container's or a device's files), so removal first unmounts everything below the path.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess

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


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts_under(path: str) -> list[str]:
    """Mount points at or below `path`, deepest first (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape(line.split()[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
    return sorted(set(found), key=len, reverse=True)


def is_mounted(path: str) -> bool:
    return _in_mountinfo(os.path.realpath(path))


def _in_mountinfo(real: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == real for line in f)


def umount(path: str, lazy: bool = False) -> None:
    args = ["umount", "-l", path] if lazy else ["umount", path]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0 and not lazy:
        log.warning("umount %s failed (%s); detaching lazily", path, r.stderr.strip())
        subprocess.run(["umount", "-l", path], capture_output=True)


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
