"""Read-side lookup table: a sorted, non-overlapping index flattened into parallel lists in bytes.

This is the hot path of every image read. The lists are built once per layer/stack, a lookup
is one `bisect`, and data is read straight into slices of the caller's buffer with the source
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
    """Parallel lists over sorted mappings: starts/ends in bytes, delta = file position - virtual
    position, and the `pread_into` of the file each mapping points to (None = zeroed)."""

    __slots__ = ("starts", "ends", "deltas", "readers")

    def __init__(self, index: Columns, readers: Sequence[Reader]) -> None:
        offs, lens, moffs, zeros, tags = index.offs, index.lens, index.moffs, index.zeros, index.tags
        self.starts: list[int] = [o * SECTOR for o in offs]
        self.ends: list[int] = [(o + n) * SECTOR for o, n in zip(offs, lens, strict=True)]
        self.deltas: list[int] = [(m - o) * SECTOR for m, o in zip(moffs, offs, strict=True)]
        if tags is None:
            rd = readers[0] if readers else None
            self.readers: list[Reader | None] = [None if z else rd for z in zeros]
        else:
            self.readers = [None if z else readers[t] for z, t in zip(zeros, tags, strict=True)]

    def read_into(self, buf: memoryview, offset: int, gap: GapFiller = zero_fill) -> None:
        """Fill all of `buf` with virtual bytes from `offset`; unmapped ranges go to `gap`."""
        n = len(buf)
        end = offset + n
        i = bisect_right(self.starts, offset) - 1
        if i >= 0 and end <= self.ends[i]:
            # fast path: the whole request lies in one mapping
            rd = self.readers[i]
            if rd is None:
                zero_fill(buf)
                return
            got = rd(buf, offset + self.deltas[i])
            if got != n:
                zero_fill(buf[got:])  # truncated source tail reads as zeros, like upstream
            return
        if i < 0 or self.ends[i] <= offset:
            i += 1
        starts, ends, deltas, readers = self.starts, self.ends, self.deltas, self.readers
        count = len(starts)
        pos = offset
        while pos < end:
            if i >= count or starts[i] >= end:
                gap(buf[pos - offset :], pos)
                return
            s = starts[i]
            if s > pos:
                gap(buf[pos - offset : s - offset], pos)
                pos = s
            stop = ends[i] if ends[i] < end else end
            view = buf[pos - offset : stop - offset]
            rd = readers[i]
            if rd is None:
                zero_fill(view)
            else:
                got = rd(view, pos + deltas[i])
                if got != len(view):
                    zero_fill(view[got:])
            pos = stop
            i += 1
