"""mount(8)/umount(8) with one error shape, and the teardown that never leaves a mount behind."""

from __future__ import annotations

import logging
import os
import subprocess

from .command import HostError, run, stderr_words
from .mountinfo import mounts_under

log = logging.getLogger(__name__)


class MountError(HostError):
    """mount failed; the message names source, target, type and mount's own words."""


def mount(source: str, target: str, fstype: str, options: str = "") -> None:
    """Mount `source` on `target` (created if missing)."""
    os.makedirs(target, exist_ok=True)
    cmd = ["mount", "-t", fstype]
    if options:
        cmd += ["-o", options]
    cmd += [source, target]
    try:
        run(cmd, f"mount {source} ({fstype}) on {target}")
    except HostError as e:
        raise MountError(str(e)) from e


def umount(path: str, *, lazy: bool = False) -> None:
    """Unmount `path`; a busy mount is detached lazily with a warning rather than left mounted."""
    args = ["umount", "-l", path] if lazy else ["umount", path]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0 and not lazy:
        log.warning("umount %s failed (%s); detaching lazily", path, stderr_words(r))
        subprocess.run(["umount", "-l", path], capture_output=True)


def umount_all_under(path: str, *, lazy: bool = False) -> None:
    """Unmount every mount at or below `path`, deepest first."""
    for mp in mounts_under(path):
        umount(mp, lazy=lazy)
