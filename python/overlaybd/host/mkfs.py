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


def mkfs_command(target: str, fstype: str = "ext4", uuid: str | None = None) -> list[str]:
    """The exact command line used for `target`; a fixed `uuid` (also the directory hash seed) makes the
    result reproducible (with E2FSPROGS_FAKE_TIME for the timestamps), as the prebuilt base layer needs."""
    if fstype not in SUPPORTED:
        raise MkfsError(f"{target}: file system type {fstype!r} not supported ({', '.join(SUPPORTED)} only)")
    if uuid is None:
        return ["mkfs.ext4", "-q", "-O", EXT4_FEATURES, "-G", "1", "-E", "discard", "-F", target]
    extended = f"discard,hash_seed={uuid}"
    return ["mkfs.ext4", "-q", "-O", EXT4_FEATURES, "-G", "1", "-E", extended, "-U", uuid, "-F", target]


def mkfs(target: str, fstype: str = "ext4", uuid: str | None = None) -> None:
    """Make an empty file system on `target` (a block device or an image file)."""
    try:
        run(mkfs_command(target, fstype, uuid), f"{target}: mkfs.{fstype}")
    except MkfsError:
        raise
    except HostError as e:
        raise MkfsError(str(e)) from e
