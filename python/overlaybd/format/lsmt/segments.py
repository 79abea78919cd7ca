"""Read-side lookups over a sorted, non-overlapping index (its compact Columns, in sectors).

This is the hot path of every image read. A lookup is one `bisect` over the offsets array
(no per-entry table is built, so a 1M-entry index costs its 22 MB once, however it is
stacked), and data is read straight into slices of the caller's buffer with the source
file's own `pread_into` (no intermediate bytes objects).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence

from ..errors import Unaligned
from .mapping import SECTOR, Columns

Reader = Callable[[memoryview, int], int]
GapFiller = Callable[[memoryview, int], None]

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
