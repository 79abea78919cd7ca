"""Read-side lookups over a sorted, non-overlapping index (its compact Columns, in sectors).

This is the hot path of every image read. A lookup is one `bisect` over the offsets array
(no per-entry table is built, so a 1M-entry index costs its 22 MB once, however it is
stacked), and data is read straight into slices of the caller's buffer with the source
file's own `pread_into` (no intermediate bytes objects).
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import cast

from ..errors import Unaligned
from .mapping import SECTOR, Columns

Reader = Callable[[memoryview, int], int]
GapFiller = Callable[[memoryview, int], None]


def _load_c_reader() -> Callable[..., Reader] | None:
    """`SegReader` from the format package's optional C helper (built as `zfile/_zbatch`), or None
    (not built, or OVERLAYBD_ZFILE_PURE_PYTHON set): then `fast_reader` is a Python closure."""
    if os.environ.get("OVERLAYBD_ZFILE_PURE_PYTHON"):
        return None
    try:
        from ..zfile._zbatch import SegReader  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return cast(Callable[..., Reader], SegReader)


_C_READER = _load_c_reader()

_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))


def zero_fill(view: memoryview, _offset: int = 0) -> None:
    """Fill `view` with zeros (holes and zeroed mappings)."""
    n = len(view)
    pos = 0
    while pos < n:
        step = min(n - pos, _ZERO_CHUNK)
        view[pos : pos + step] = _ZEROS[:step]
        pos += step


def check_aligned(path: str, offset: int, length: int) -> None:
    if offset % SECTOR:
        raise Unaligned(path, "offset", f"{offset} is not a multiple of {SECTOR}")
    if length % SECTOR:
        raise Unaligned(path, "length", f"{length} is not a multiple of {SECTOR}")


class SegmentTable:
    """Lookups over a sorted, non-overlapping index kept as its compact Columns (no copy).

    `readers[tag]` is the `pread_into` of the file a mapping's tag points to (tag 0 when the
    index has no tags). Offsets in the index are sectors; arguments and reads are bytes.
    """

    __slots__ = ("offs", "lens", "moffs", "zeros", "tags", "readers")

    def __init__(self, index: Columns, readers: Sequence[Reader]) -> None:
        self.offs = index.offs
        self.lens = index.lens
        self.moffs = index.moffs
        self.zeros = index.zeros
        self.tags = index.tags
        self.readers = tuple(readers)

    def _reader(self, i: int) -> Reader | None:
        """The reader of mapping `i`, or None when it is zeroed."""
        if self.zeros[i]:
            return None
        return self.readers[self.tags[i] if self.tags is not None else 0]

    def fast_reader(self, vsize: int, general: Reader) -> Reader:
        """A `pread_into` for a read-only view of `vsize` bytes over this table: a request that lies in
        one data mapping costs one bisect, a few array reads and the source's own `pread_into`, in a
        single Python frame; anything else (unaligned, past vsize, holes, zeroed or several mappings,
        a short source read) goes to `general`, which must give the same bytes and errors.

        With the C helper this is its `SegReader` (same logic, no Python frame, a C binary search);
        otherwise a closure, because each Python frame and attribute load is a visible share of a
        random 4 KiB read (~0.1 us of ~1 us), so the hot path keeps everything in cells."""
        offs, lens, moffs, zeros, readers = self.offs, self.lens, self.moffs, self.zeros, self.readers
        tags = self.tags
        if _C_READER is not None:
            return _C_READER(offs, lens, moffs, zeros, tags, readers, vsize, general)
        if tags is None or len(readers) == 1:
            rd0 = readers[0]

            def pread_one(buf: memoryview, offset: int) -> int:
                n = len(buf)
                end = offset + n
                if not (offset | n) & 511 and 0 < end <= vsize:
                    i = bisect_right(offs, offset >> 9) - 1
                    if i >= 0:
                        start = offs[i]
                        if end <= (start + lens[i]) << 9 and not zeros[i]:
                            if rd0(buf, offset + ((moffs[i] - start) << 9)) == n:
                                return n
                return general(buf, offset)

            return pread_one

        def pread_tagged(buf: memoryview, offset: int) -> int:
            n = len(buf)
            end = offset + n
            if not (offset | n) & 511 and 0 < end <= vsize:
                i = bisect_right(offs, offset >> 9) - 1
                if i >= 0:
                    start = offs[i]
                    if end <= (start + lens[i]) << 9 and not zeros[i]:
                        if readers[tags[i]](buf, offset + ((moffs[i] - start) << 9)) == n:
                            return n
            return general(buf, offset)

        return pread_tagged

    def read_into(self, buf: memoryview, offset: int, gap: GapFiller = zero_fill) -> None:
        """Fill all of `buf` with virtual bytes from `offset`; unmapped ranges go to `gap`."""
        n = len(buf)
        end = offset + n
        offs, lens = self.offs, self.lens
        i = bisect_right(offs, offset // SECTOR) - 1
        if i >= 0:
            start = offs[i]
            stop = (start + lens[i]) * SECTOR
            if end <= stop:
                # fast path: the whole request lies in one mapping
                rd = self._reader(i)
                if rd is None:
                    zero_fill(buf)
                    return
                got = rd(buf, offset + (self.moffs[i] - start) * SECTOR)
                if got != n:
                    zero_fill(buf[got:])  # truncated source tail reads as zeros, like upstream
                return
            if stop <= offset:
                i += 1
        else:
            i = 0
        count = len(offs)
        pos = offset
        while pos < end:
            if i >= count or offs[i] * SECTOR >= end:
                gap(buf[pos - offset :], pos)
                return
            start = offs[i] * SECTOR
            if start > pos:
                gap(buf[pos - offset : start - offset], pos)
                pos = start
            stop = start + lens[i] * SECTOR
            if stop > end:
                stop = end
            view = buf[pos - offset : stop - offset]
            rd = self._reader(i)
            if rd is None:
                zero_fill(view)
            else:
                got = rd(view, pos + (self.moffs[i] - offs[i]) * SECTOR)
                if got != len(view):
                    zero_fill(view[got:])
            pos = stop
            i += 1
