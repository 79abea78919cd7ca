"""The kernel's mount table (/proc/self/mountinfo), parsed once, in one place.

Why: removal must never recurse through a live mount and teardown must find every mount it
made; both need the same, correctly unescaped view of the table.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Undo the kernel's octal escapes (\\040 for space, \\011 tab, \\012 newline, \\134 backslash)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field) if "\\" in field else field


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo: where, what file system, from which source."""

    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str


def entries(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount, in table order."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 7:
                continue
            try:
                sep = fields.index("-", 6)
            except ValueError:
                continue
            tail = fields[sep + 1 :]
            out.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    mountpoint=unescape(fields[4]),
                    fstype=tail[0] if tail else "",
                    source=unescape(tail[1]) if len(tail) > 1 else "",
                    options=fields[5],
                )
            )
    return out


def mounts_under(path: str, *, include_self: bool = True) -> list[str]:
    """Mount points at (if `include_self`) or below `path`, deepest first."""
    prefix = os.path.realpath(path)
    found = set()
    for e in entries():
        if (include_self and e.mountpoint == prefix) or e.mountpoint.startswith(prefix.rstrip("/") + "/"):
            found.add(e.mountpoint)
    return sorted(found, key=len, reverse=True)


def is_mounted(path: str) -> bool:
    """True when `path` (resolved) is a mount point."""
    real = os.path.realpath(path)
    return any(e.mountpoint == real for e in entries())
