"""The writable layer's in-memory index (upstream `Index0`): inserts replace what they overlap.

Replaying a RW index file's records in file order through `insert` gives "last write wins";
`dump()` is the sorted, trimmed list that sealing and commit write out.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from .mapping import SECTOR, Columns, Mapping
from .segments import GapFiller, Reader, zero_fill

ZERO = -1
GAP = -2


class Index0:
    """Sorted non-overlapping mappings kept as parallel lists (sectors) for bisect lookups."""

    __slots__ = ("offs", "lens", "moffs", "zeros")

    def __init__(self) -> None:
        self.offs: list[int] = []
        self.lens: list[int] = []
        self.moffs: list[int] = []
        self.zeros: list[bool] = []

    def __len__(self) -> int:
        return len(self.offs)

    def insert(self, offset: int, length: int, moffset: int, zeroed: bool) -> None:
        """Insert, cutting away the overlapped parts of older mappings (upstream `Index0::insert`):
        a left remainder keeps its moffset, a right remainder's moffset advances by the cut."""
        if length <= 0:
            return
        end = offset + length
        offs, lens = self.offs, self.lens
        i = bisect_right(offs, offset) - 1
        if i < 0 or offs[i] + lens[i] <= offset:
            i += 1
        j = bisect_left(offs, end)
        n_offs = [offset]
        n_lens = [length]
        n_moffs = [moffset]
        n_zeros = [zeroed]
        if i < j:
            first_off = offs[i]
            if first_off < offset:
                n_offs.insert(0, first_off)
                n_lens.insert(0, offset - first_off)
                n_moffs.insert(0, self.moffs[i])
                n_zeros.insert(0, self.zeros[i])
            last_off = offs[j - 1]
            last_end = last_off + lens[j - 1]
            if last_end > end:
                z = self.zeros[j - 1]
                cut = end - last_off
                n_offs.append(end)
                n_lens.append(last_end - end)
                n_moffs.append(self.moffs[j - 1] + (0 if z else cut))
                n_zeros.append(z)
        offs[i:j] = n_offs
        lens[i:j] = n_lens
        self.moffs[i:j] = n_moffs
        self.zeros[i:j] = n_zeros

    def columns(self) -> Columns:
        """A snapshot copy as Columns (tags 0)."""
        return Columns(list(self.offs), list(self.lens), list(self.moffs), list(self.zeros))

    def dump(self, tag: int = 0) -> list[Mapping]:
        cols = zip(self.offs, self.lens, self.moffs, self.zeros, strict=True)
        return [Mapping(o, n, m, z, tag) for o, n, m, z in cols]

    def resolve(self, offset: int, end: int) -> list[tuple[int, int, int]]:
        """Pieces (start, stop, file_pos) covering byte range [offset, end): file_pos >= 0 is data
        in the data file, ZERO a zeroed mapping, GAP an unmapped range. Pure lookup, no I/O, so a
        caller can hold a lock just for this and do the reads afterwards."""
        offs, lens, moffs, zeros = self.offs, self.lens, self.moffs, self.zeros
        sec = offset // SECTOR
        i = bisect_right(offs, sec) - 1
        if i < 0 or offs[i] + lens[i] <= sec:
            i += 1
        count = len(offs)
        pos = offset
        out: list[tuple[int, int, int]] = []
        while pos < end:
            if i >= count or offs[i] * SECTOR >= end:
                out.append((pos, end, GAP))
                break
            s = offs[i] * SECTOR
            if s > pos:
                out.append((pos, s, GAP))
                pos = s
            e = (offs[i] + lens[i]) * SECTOR
            stop = e if e < end else end
            out.append((pos, stop, ZERO if zeros[i] else moffs[i] * SECTOR + (pos - s)))
            pos = stop
            i += 1
        return out


def read_pieces(
    buf: memoryview, offset: int, pieces: list[tuple[int, int, int]], reader: Reader, gap: GapFiller = zero_fill
) -> None:
    """Carry out the reads `Index0.resolve` planned, into slices of `buf` (which starts at `offset`)."""
    for start, stop, fpos in pieces:
        view = buf[start - offset : stop - offset]
        if fpos >= 0:
            got = reader(view, fpos)
            if got != len(view):
                zero_fill(view[got:])
        elif fpos == ZERO:
            zero_fill(view)
        else:
            gap(view, start)
