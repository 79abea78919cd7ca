"""LSMT index records (SegmentMapping, 16 bytes) and the index-level algorithms on them.

A mapping says "virtual sectors [offset, offset+length) live at sector `moffset` of file `tag`"
(or read as zeros when `zeroed`). All quantities are 512-byte sectors (format.md §1.2).
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from itertools import compress, repeat
from typing import NamedTuple

SECTOR = 512
MAX_OFFSET = (1 << 50) - 1  # also INVALID_OFFSET: marks padding records
INVALID_OFFSET = MAX_OFFSET
MAX_LENGTH = (1 << 14) - 1  # 16383 sectors
MAX_MOFFSET = (1 << 55) - 1
RECORD_SIZE = 16

_OFF_MASK = (1 << 50) - 1
_MOFF_MASK = (1 << 55) - 1
_REC = struct.Struct("<QQ")


class Mapping(NamedTuple):
    """One index record; offset/length/moffset in sectors; tag selects the source file."""

    offset: int
    length: int
    moffset: int
    zeroed: bool = False
    tag: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def mend(self) -> int:
        """End in the source file; zeroed mappings occupy no data (upstream `mend()`)."""
        return self.moffset if self.zeroed else self.moffset + self.length

    def pack(self) -> bytes:
        """The 16 on-disk bytes (two little-endian u64 bit-fields)."""
        if not (0 <= self.offset <= MAX_OFFSET and 0 <= self.length <= MAX_LENGTH):
            raise ValueError(f"mapping offset/length out of range: {self}")
        if not (0 <= self.moffset <= MAX_MOFFSET and 0 <= self.tag <= 255):
            raise ValueError(f"mapping moffset/tag out of range: {self}")
        lo = self.offset | (self.length << 50)
        hi = self.moffset | (int(bool(self.zeroed)) << 55) | (self.tag << 56)
        return _REC.pack(lo, hi)

    @classmethod
    def unpack(cls, buf: bytes | memoryview, pos: int = 0) -> Mapping:
        lo, hi = _REC.unpack_from(buf, pos)
        return cls(lo & _OFF_MASK, lo >> 50, hi & _MOFF_MASK, bool((hi >> 55) & 1), hi >> 56)


INVALID_MAPPING = Mapping(INVALID_OFFSET, 0, 0, False, 0)
INVALID_RECORD = INVALID_MAPPING.pack()


def unpack_records(buf: bytes | memoryview) -> Iterator[Mapping]:
    """All 16-byte records of `buf` in order (a trailing partial record is ignored)."""
    usable = len(buf) - len(buf) % RECORD_SIZE
    for lo, hi in _REC.iter_unpack(memoryview(buf)[:usable]):
        yield Mapping(lo & _OFF_MASK, lo >> 50, hi & _MOFF_MASK, bool((hi >> 55) & 1), hi >> 56)


def pack_records(mappings: Iterable[Mapping]) -> bytes:
    return b"".join(m.pack() for m in mappings)


def compress_raw_index(raw: Iterable[Mapping]) -> list[Mapping]:
    """Join neighbours that continue each other in LBA and file space (upstream `compress_raw_index`).

    The sum must stay strictly below MAX_LENGTH: that `<` (not `<=`) is what makes committed
    layers byte-identical to upstream's (runs are capped at 255 x 64 = 16320 sectors).
    """
    out: list[Mapping] = []
    for e in raw:
        if out:
            p = out[-1]
            if (
                p.offset + p.length == e.offset
                and p.mend == e.moffset
                and p.zeroed == e.zeroed
                and p.tag == e.tag
                and p.length + e.length < MAX_LENGTH
            ):
                out[-1] = p._replace(length=p.length + e.length)
                continue
        out.append(e)
    return out


def _u64(values: Iterable[int]) -> array[int]:
    return values if isinstance(values, array) and values.typecode == "Q" else array("Q", values)


def _u32(values: Iterable[int]) -> array[int]:
    return values if isinstance(values, array) and values.typecode == "I" else array("I", values)


def _flags(values: Iterable[int]) -> bytearray:
    return values if isinstance(values, bytearray) else bytearray(map(bool, values))


class Columns:
    """An index as parallel compact arrays (sectors): offsets and moffsets u64, lengths u32,
    zeroed and tags one byte each.

    Why arrays: a 1M-entry index as Python lists of ints costs ~150 bytes an entry and every
    layer of a stack holds one; as arrays it is 22 bytes, and the read path bisects them
    directly. `tags` is None when every mapping belongs to the same file (tag 0).
    """

    __slots__ = ("offs", "lens", "moffs", "zeros", "tags")

    def __init__(
        self,
        offs: Iterable[int],
        lens: Iterable[int],
        moffs: Iterable[int],
        zeros: Iterable[int],
        tags: Iterable[int] | None = None,
    ) -> None:
        self.offs = _u64(offs)
        self.lens = _u32(lens)
        self.moffs = _u64(moffs)
        self.zeros = _flags(zeros)
        self.tags = None if tags is None else tags if isinstance(tags, bytearray) else bytearray(tags)
        n = len(self.offs)
        if not len(self.lens) == len(self.moffs) == len(self.zeros) == n or (
            self.tags is not None and len(self.tags) != n
        ):
            raise ValueError("index columns differ in length")

    def __len__(self) -> int:
        return len(self.offs)

    @classmethod
    def from_mappings(cls, mappings: Sequence[Mapping]) -> Columns:
        return cls(
            [m.offset for m in mappings],
            [m.length for m in mappings],
            [m.moffset for m in mappings],
            [bool(m.zeroed) for m in mappings],
            [m.tag for m in mappings],
        )

    def to_mappings(self) -> list[Mapping]:
        """The index as Mapping tuples: ~150 bytes an entry, for compaction and tests, not reads."""
        new = tuple.__new__
        tags: Iterable[int] = self.tags if self.tags is not None else repeat(0, len(self.offs))
        cols = zip(self.offs, self.lens, self.moffs, map(bool, self.zeros), tags, strict=True)
        return [new(Mapping, c) for c in cols]

    def data_sectors(self) -> int:
        """Sectors backed by data (not zeroed)."""
        return sum(compress(self.lens, map((1).__xor__, self.zeros)))


def decode_words(words: array[int]) -> Columns:
    """Decode records given as little-endian u64 words (two per record), dropping invalid (padding)
    and empty ones; tags are discarded (every reader resets them).

    Works on strided views of `words` so that no per-entry Python objects are kept."""
    if sys.byteorder != "little":
        words.byteswap()
    view = memoryview(words)
    lo, hi = view[0::2], view[1::2]
    offs = array("Q", map(_OFF_MASK.__and__, lo))
    lens = array("I", map((50).__rrshift__, lo))
    moffs = array("Q", map(_MOFF_MASK.__and__, hi))
    zeros = bytearray(map((1).__and__, map((55).__rrshift__, hi)))
    if INVALID_OFFSET in offs or 0 in lens:
        keep = bytearray(o != INVALID_OFFSET and n != 0 for o, n in zip(offs, lens, strict=True))
        offs = array("Q", compress(offs, keep))
        lens = array("I", compress(lens, keep))
        moffs = array("Q", compress(moffs, keep))
        zeros = bytearray(compress(zeros, keep))
    return Columns(offs, lens, moffs, zeros)


def merge_columns(levels: Sequence[Columns]) -> Columns:
    """Flatten sorted per-layer indexes given TOP first: for each sector the topmost mapping
    (data or zeroed) wins, holes fall through; the result's tag is the winning layer's
    position from the top (upstream `merge_indexes`)."""
    if len(levels) == 1:
        c = levels[0]
        return Columns(c.offs, c.lens, c.moffs, c.zeros, bytearray(len(c)))
    o_offs: array[int] = array("Q")
    o_lens: array[int] = array("I")
    o_moffs: array[int] = array("Q")
    o_zeros = bytearray()
    o_tags = bytearray()
    depth = len(levels)

    def fill(level: int, begin: int, end: int) -> None:
        while level < depth:
            c = levels[level]
            offs, lens, moffs, zeros = c.offs, c.lens, c.moffs, c.zeros
            # first mapping ending after `begin` (sorted, non-overlapping: the one starting at or
            # before it, if it reaches past it, else the next); no per-level array of ends is built
            i = bisect_right(offs, begin) - 1
            if i < 0 or offs[i] + lens[i] <= begin:
                i += 1
            n = len(offs)
            while i < n and offs[i] < end:
                off = offs[i]
                if off > begin:
                    fill(level + 1, begin, off)
                    begin = off
                stop = off + lens[i]
                if stop > end:
                    stop = end
                z = zeros[i]
                o_offs.append(begin)
                o_lens.append(stop - begin)
                o_moffs.append(moffs[i] if z else moffs[i] + (begin - off))
                o_zeros.append(z)
                o_tags.append(level)
                begin = stop
                i += 1
            if begin >= end:
                return
            level += 1  # the remaining tail falls through to the next layer

    fill(0, 0, MAX_OFFSET)
    return Columns(o_offs, o_lens, o_moffs, o_zeros, o_tags)


def merge_indexes(indexes: Sequence[Sequence[Mapping]]) -> list[Mapping]:
    """`merge_columns` on Mapping lists (TOP first); tags of the result = position from the top."""
    return merge_columns([Columns.from_mappings(idx) for idx in indexes]).to_mappings()
