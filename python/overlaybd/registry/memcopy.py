"""Bulk memory copies that release the GIL.

Why: a cold sequential read moves every byte twice inside this process (libcurl's chunk into the
fetch buffer, fetch buffer into the reader's buffer). A memoryview slice assignment holds the GIL
for the whole memcpy, which stalls the other fetch thread's libcurl callbacks and the cache writer;
`ctypes.memmove` is a foreign call, so it runs without the GIL. Small copies stay slice
assignments: below ~64 KiB the ctypes call costs more than it saves.
"""

from __future__ import annotations

import ctypes

NOGIL_MIN = 64 << 10
_memmove = ctypes.memmove
_char = ctypes.c_char
_addressof = ctypes.addressof


def copy_into(dst: memoryview, src: memoryview | bytes) -> None:
    """dst[:] = src (equal lengths), without the GIL for large copies."""
    n = src.nbytes if isinstance(src, memoryview) else len(src)
    if n < NOGIL_MIN or (isinstance(src, memoryview) and src.itemsize != 1) or dst.itemsize != 1:
        dst[:n] = src
        return
    try:
        d = _addressof(_char.from_buffer(dst))
        s = src if isinstance(src, bytes) else _addressof(_char.from_buffer(src))
    except TypeError:  # a read-only source or destination buffer: copy with the GIL
        dst[:n] = src
        return
    if len(dst) < n:
        raise ValueError(f"copy_into: destination holds {len(dst)} bytes, source has {n}")
    _memmove(d, s, n)
