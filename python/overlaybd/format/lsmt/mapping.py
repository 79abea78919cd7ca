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


class Columns:
    """An index as parallel lists (sectors): the compact, fast form for big indexes.

    `tags` is None when every mapping belongs to the same file (tag 0).
    """

    __slots__ = ("offs", "lens", "moffs", "zeros", "tags")

    def __init__(
        self, offs: list[int], lens: list[int], moffs: list[int], zeros: list[bool], tags: list[int] | None = None
    ) -> None:
        self.offs = offs
        self.lens = lens
        self.moffs = moffs
        self.zeros = zeros
        self.tags = tags

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
        new = tuple.__new__
        tags = self.tags if self.tags is not None else [0] * len(self.offs)
        cols = zip(self.offs, self.lens, self.moffs, self.zeros, tags, strict=True)
        return [new(Mapping, c) for c in cols]


def decode_columns(raw: bytes | memoryview) -> Columns:
    """Decode packed records, dropping invalid (padding) and empty ones; tags are discarded
    (every reader resets them)."""
    words = array("Q")
    words.frombytes(memoryview(raw)[: len(raw) - len(raw) % RECORD_SIZE])
    if sys.byteorder != "little":
        words.byteswap()
    lo = words[0::2]
    hi = words[1::2]
    offs = [x & _OFF_MASK for x in lo]
    lens = [x >> 50 for x in lo]
    moffs = [x & _MOFF_MASK for x in hi]
    zeros = [bool(x >> 55 & 1) for x in hi]
    if INVALID_OFFSET in offs or 0 in lens:
        keep = [i for i, (o, n) in enumerate(zip(offs, lens, strict=True)) if o != INVALID_OFFSET and n]
        offs = [offs[i] for i in keep]
        lens = [lens[i] for i in keep]
        moffs = [moffs[i] for i in keep]
        zeros = [zeros[i] for i in keep]
    return Columns(offs, lens, moffs, zeros)


def merge_columns(levels: Sequence[Columns]) -> Columns:
    """Flatten sorted per-layer indexes given TOP first: for each sector the topmost mapping
    (data or zeroed) wins, holes fall through; the result's tag is the winning layer's
    position from the top (upstream `merge_indexes`)."""
    if len(levels) == 1:
        c = levels[0]
        return Columns(c.offs, c.lens, c.moffs, c.zeros, [0] * len(c))
    ends = [[o + n for o, n in zip(c.offs, c.lens, strict=True)] for c in levels]
    o_offs: list[int] = []
    o_lens: list[int] = []
    o_moffs: list[int] = []
    o_zeros: list[bool] = []
    o_tags: list[int] = []
    depth = len(levels)

    def fill(level: int, begin: int, end: int) -> None:
        while level < depth:
            c = levels[level]
            offs, moffs, zeros = c.offs, c.moffs, c.zeros
            lvl_ends = ends[level]
            i = bisect_right(lvl_ends, begin)  # first mapping ending after `begin`
            n = len(offs)
            while i < n and offs[i] < end:
                off = offs[i]
                if off > begin:
                    fill(level + 1, begin, off)
                    begin = off
                stop = lvl_ends[i] if lvl_ends[i] < end else end
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
