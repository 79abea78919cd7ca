"""The contract every device frontend serves: what an opened image offers, and how to open one.

Why here and not in a frontend: TCMU (SCSI) and FUSE (a single file + loop) are siblings that
serve the same images; both, and the daemon that picks one, depend on this contract rather than
on each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .image import open_image


class BlockImage(Protocol):
    """What a frontend needs from an opened image (`open_image` returns one, so does a bare `Stack`)."""

    @property
    def read_only(self) -> bool: ...

    def size(self) -> int: ...
    def pread_into(self, buf: memoryview, offset: int) -> int: ...
    def pwrite(self, data: bytes | memoryview, offset: int) -> int: ...
    def discard(self, offset: int, length: int) -> None: ...
    def fsync(self) -> None: ...


#: config.v1.json path -> opened image; raises with a message naming the file and field
ImageOpener = Callable[[str], BlockImage]


def default_opener(service: Any = None) -> ImageOpener:
    """`open_image` bound to the daemon's service config (registry, cache, download settings)."""

    def open_(config_path: str) -> BlockImage:
        return open_image(config_path, service=service)

    return open_
