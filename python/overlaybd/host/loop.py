"""Attach a file to a loop block device and detach it again (util-linux losetup, present on Flatcar)."""

from __future__ import annotations

from .command import HostError, run


class LoopError(HostError):
    """losetup failed; the message names the file or device and losetup's own words."""


def attach(path: str, *, read_only: bool = False, direct_io: bool = False) -> str:
    """Attach `path` to the first free loop device and return its path (/dev/loopN)."""
    cmd = ["losetup", "--find", "--show"]
    if read_only:
        cmd.append("--read-only")
    if direct_io:
        cmd.append("--direct-io=on")
    cmd.append(path)
    try:
        return run(cmd, f"{path}: losetup").stdout.strip()
    except HostError as e:
        raise LoopError(str(e)) from e


def detach(device: str) -> None:
    """Detach a loop device (the kernel finishes it once the last opener closes)."""
    try:
        run(["losetup", "--detach", device], f"{device}: losetup --detach")
    except HostError as e:
        raise LoopError(str(e)) from e


def backing_file(device: str) -> str | None:
    """The file behind a loop device, or None if it is not attached."""
    name = device.rsplit("/", 1)[-1]
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def devices_backed_by(path_prefix: str) -> list[str]:
    """Loop devices whose backing file is at or below `path_prefix` (for leak checks and teardown)."""
    import glob
    import os

    prefix = os.path.realpath(path_prefix)
    found = []
    for sysdir in glob.glob("/sys/block/loop*"):
        dev = "/dev/" + os.path.basename(sysdir)
        backing = backing_file(dev)
        if backing and (backing == prefix or backing.startswith(prefix.rstrip("/") + "/")):
            found.append(dev)
    return sorted(found)
