"""The byte-source contract every layer reader is built on.

A layer may live in a local file, inside a tar wrapper, inside a ZFile, or in a
registry blob behind a cache. Readers only need positional reads and a size, so
they all speak `RandomAccessFile`. The hot path is `pread_into`, which fills a
caller-owned buffer (no intermediate copies).
"""

from __future__ import annotations

import os
import stat
from typing import Protocol, runtime_checkable

from .errors import FormatError


@runtime_checkable
class RandomAccessFile(Protocol):
    """Positional reads over a byte source of known size."""

    name: str

    def size(self) -> int:
        """Logical size in bytes."""
        ...

    def pread_into(self, buf: memoryview, offset: int) -> int:
        """Fill `buf` from `offset`; return bytes read (short only at end of file)."""
        ...

    def pread(self, size: int, offset: int) -> bytes:
        """Convenience copy-returning read (not for hot paths)."""
        ...

    def close(self) -> None: ...


def _kind(mode: int) -> str:
    """What a non-regular file is, for the error that refuses it."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return f"mode 0o{stat.S_IFMT(mode):o}"


class LocalFile:
    """A regular file on local disk, read with os.preadv into caller buffers.

    Anything else is refused when opened: a FIFO or character device would block or never end
    (their size is 0 and reads do not stop), a directory cannot be read.
    """

    def __init__(self, path: str | os.PathLike[str], writable: bool = False) -> None:
        self.name = os.fspath(path)
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below
            self.fd = os.open(self.name, flags | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise FormatError(self.name, "file", f"cannot open: {e.strerror}") from e
        mode = os.fstat(self.fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(self.fd)
            self.fd = -1
            raise FormatError(self.name, "file", f"not a regular file ({_kind(mode)})")
        os.set_blocking(self.fd, True)
        self.writable = writable

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def fd_span(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, offset): the bytes are in this file's descriptor as they are (readers above may pread it)."""
        return (self.fd, offset) if offset >= 0 and self.fd >= 0 else None

    def pread_into(self, buf: memoryview, offset: int) -> int:
        total = 0
        want = len(buf)
        while total < want:
            n = os.preadv(self.fd, [buf[total:]], offset + total)
            if n == 0:
                break
            total += n
        return total

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        return done

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "LocalFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalFile({self.name!r})"


def read_exact(f: RandomAccessFile, size: int, offset: int, what: str) -> bytes:
    """Read exactly `size` bytes or raise Truncated naming the region `what`."""
    from .errors import Truncated

    buf = bytearray(size)
    n = f.pread_into(memoryview(buf), offset)
    if n != size:
        raise Truncated(f.name, what, f"need {size} bytes at offset {offset}, file has only {n}")
    return bytes(buf)
