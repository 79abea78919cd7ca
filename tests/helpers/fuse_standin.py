"""A raw-file image with the overlaybd.image.Image interface.

A stand-in, not a mock: it stores bytes in a real sparse file. Used where a test needs a writable
image independent of the LSMT layer (the frontends must work with any object of this shape).
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path


class RawFileImage:
    """Sparse raw file as an image; discard punches holes so discarded ranges read as zeros."""

    def __init__(self, path: str, *, read_only: bool = False):
        self.name = path
        self.read_only = read_only
        self._fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.vsize = os.fstat(self._fd).st_size
        self.discards: list[tuple[int, int]] = []
        self.fsyncs = 0
        self._lock = threading.Lock()

    def size(self) -> int:
        return self.vsize

    def pread_into(self, buf: memoryview, offset: int) -> int:
        return os.preadv(self._fd, [buf], offset)

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def pwrite(self, data, offset: int) -> int:
        if self.read_only:
            raise OSError(30, "read-only image")
        return os.pwrite(self._fd, data, offset)

    def discard(self, offset: int, length: int) -> None:

        with self._lock:
            self.discards.append((offset, length))
        _punch_hole(self._fd, offset, length)

    def fsync(self) -> None:
        self.fsyncs += 1
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.fallocate(fd, 0x03, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")


def umount(path: str) -> None:
    subprocess.run(["umount", path], check=False)


def make_ext4(path: Path, size: int, files: dict[str, bytes]) -> None:
    """Build an ext4 image from a tree without mounting (mkfs.ext4 -d)."""
    src = path.with_suffix(".src")
    for name, data in files.items():
        p = src / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(path)], check=True)
