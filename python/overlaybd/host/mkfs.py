"""Make the file system of a fresh overlaybd image, with one set of options for every caller.

Why these options: no journal (the LSMT layer is the journal: a committed layer is immutable),
one block group per flex group so small images stay small, and discard so that deleted blocks
become holes in the writable layer.
"""

from __future__ import annotations

from .command import HostError, run

EXT4_FEATURES = "^has_journal,sparse_super,flex_bg"
SUPPORTED = ("ext4",)


class MkfsError(HostError):
    """mkfs failed or the file system type is not supported; the message names the target."""


def mkfs_command(target: str, fstype: str = "ext4") -> list[str]:
    """The exact command line used for `target`."""
    if fstype not in SUPPORTED:
        raise MkfsError(f"{target}: file system type {fstype!r} not supported ({', '.join(SUPPORTED)} only)")
    return ["mkfs.ext4", "-q", "-O", EXT4_FEATURES, "-G", "1", "-E", "discard", "-F", target]


def mkfs(target: str, fstype: str = "ext4") -> None:
    """Make an empty file system on `target` (a block device or an image file)."""
    try:
        run(mkfs_command(target, fstype), f"{target}: mkfs.{fstype}")
    except MkfsError:
        raise
    except HostError as e:
        raise MkfsError(str(e)) from e
