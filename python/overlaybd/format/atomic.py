"""Atomic output files: write to a temp file beside the target, fsync, rename.

A crash at any point leaves either no output or the previous complete output,
never a half-written layer that later opens as valid.
"""

from __future__ import annotations

import os
import tempfile
from types import TracebackType


class AtomicOutput:
    """A writable, seekable binary file that appears at `path` only on commit()."""

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o644, overwrite: bool = True) -> None:
        self.path = os.fspath(path)
        self.overwrite = overwrite
        if not overwrite and os.path.exists(self.path):
            raise FileExistsError(self.path)
        d = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=d)
        os.fchmod(fd, mode & ~_umask())
        self.file = os.fdopen(fd, "w+b", buffering=1 << 20)
        self.name = self.path
        self._done = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self.file.write(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Overwrite bytes at `offset` without moving the append position."""
        pos = self.file.tell()
        self.file.seek(offset)
        self.file.write(data)
        self.file.seek(pos)

    def commit(self) -> None:
        """Flush, fsync, and atomically rename into place (then fsync the directory)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if not self.overwrite and os.path.exists(self.path):
            os.unlink(self.tmp_path)
            raise FileExistsError(self.path)
        os.replace(self.tmp_path, self.path)
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._done = True

    def abort(self) -> None:
        """Discard the temp file."""
        if not self._done:
            try:
                self.file.close()
            finally:
                try:
                    os.unlink(self.tmp_path)
                except FileNotFoundError:
                    pass
            self._done = True

    def __enter__(self) -> "AtomicOutput":
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            if not self._done:
                self.commit()
        else:
            self.abort()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write a small file (config, result file) atomically."""
    with AtomicOutput(path, mode) as out:
        out.write(data)
