"""Hashing a whole virtual disk, shared by the tests that compare images with the vectors' hashes."""

from __future__ import annotations

import hashlib

MIB = 1 << 20


def logical_sha256(img) -> str:
    """sha256 of the whole virtual disk of `img` (any RandomAccessFile), streamed in 1 MiB reads."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(MIB))
    off, size = 0, img.size()
    while off < size:
        n = img.pread_into(buf[: min(MIB, size - off)], off)
        assert n > 0, f"short read at {off} of {size}"
        h.update(buf[:n])
        off += n
    return h.hexdigest()
