"""Attach a file to a loop block device and detach it again (util-linux losetup, present on Flatcar)."""

from __future__ import annotations

import subprocess


class LoopError(RuntimeError):
    """losetup failed; the message names the file or device and losetup's own words."""


def attach(path: str, *, read_only: bool = False, direct_io: bool = False) -> str:
    """Attach `path` to the first free loop device and return its path (/dev/loopN)."""
    cmd = ["losetup", "--find", "--show"]
    if read_only:
        cmd.append("--read-only")
    if direct_io:
        cmd.append("--direct-io=on")
    cmd.append(path)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise LoopError(f"{path}: losetup: {r.stderr.strip() or r.returncode}")
    return r.stdout.strip()


def detach(device: str) -> None:
    """Detach a loop device (the kernel finishes it once the last opener closes)."""
    r = subprocess.run(["losetup", "--detach", device], capture_output=True, text=True)
    if r.returncode != 0:
        raise LoopError(f"{device}: losetup --detach: {r.stderr.strip() or r.returncode}")


def backing_file(device: str) -> str | None:
    """The file behind a loop device, or None if it is not attached."""
    name = device.rsplit("/", 1)[-1]
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None
