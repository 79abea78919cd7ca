"""Sealed and committed LSMT layers opened read-only (`open_file_ro`, format.md §1.6).

Everything the trailer claims is checked against the real file size before anything of that
size is allocated, so a corrupt or hostile layer fails with a named error instead of a huge
allocation or a wrong read.
"""

from __future__ import annotations

from array import array
from itertools import compress, islice
from operator import add, le

from ..errors import BadIndex, BadMagic, Truncated
from ..fileio import RandomAccessFile, read_exact
from .header import HT_SPACE, HeaderTrailer
from .mapping import RECORD_SIZE, SECTOR, Columns, Mapping, decode_words
from .segments import SegmentTable, check_aligned, zero_fill

MAX_RO_INDEX_SIZE = 1_000_000  # upstream MAX_LSMT_RO_INDEX_SIZE
HEADER_SECTORS = HT_SPACE // SECTOR


def validate_index(path: str, index: Columns, lo: int, hi: int, where: str = "index") -> None:
    """Sorted, non-overlapping, data inside file sectors [lo, hi) (zeroed: lo <= moffset <= hi).

    The common all-good case runs as C-level scans that keep nothing per entry; the slow loop
    only locates a failure."""
    offs, lens, moffs, zeros = index.offs, index.lens, index.moffs, index.zeros
    ordered = all(map(le, map(add, offs, lens), islice(offs, 1, None)))
    data_end = max(compress(map(add, moffs, lens), map((1).__xor__, zeros)), default=lo)
    in_range = not moffs or (min(moffs) >= lo and max(moffs) <= hi and data_end <= hi)
    if ordered and in_range:
        return
    prev_end = -1
    for i, (off, n, m, z) in enumerate(zip(offs, lens, moffs, zeros, strict=True)):
        if off < prev_end:
            msg = f"sector {off} overlaps or precedes the previous mapping's end {prev_end}"
            raise BadIndex(path, f"{where}[{i}].offset", msg)
        prev_end = off + n
        if z:
            if not lo <= m <= hi:
                raise BadIndex(path, f"{where}[{i}].moffset", f"zeroed moffset {m} outside [{lo}, {hi}]")
        elif m < lo or m + n > hi:
            raise BadIndex(path, f"{where}[{i}].moffset", f"data sectors [{m}, {m + n}) outside [{lo}, {hi})")
    raise AssertionError("unreachable: index check failed without a located entry")


class ReadOnlyLayer:
    """A sealed or committed layer: header, trailer, sorted index (tags reset to 0), reads."""

    read_only = True

    def __init__(self, f: RandomAccessFile, header: HeaderTrailer, trailer: HeaderTrailer, index: Columns):
        self.file = f
        self.name = f.name
        self.header = header
        self.trailer = trailer
        self.index = index
        self.vsize = trailer.virtual_size
        self.uuid = trailer.uuid
        self.parent_uuid = trailer.parent_uuid
        self.table = SegmentTable(index, [f.pread_into])  # shares the index arrays, no copy
        general = ReadOnlyLayer.pread_into.__get__(self)
        self.pread_into = self.table.fast_reader(self.vsize, general)  # type: ignore[method-assign,assignment]

    @property
    def mappings(self) -> list[Mapping]:
        """Sorted index with tags reset to 0, as new Mapping tuples on each use (~150 bytes an
        entry: for compaction and tests; reads and statistics use the compact `index`)."""
        return self.index.to_mappings()

    def size(self) -> int:
        return self.vsize

    def pread_into(self, buf: memoryview, offset: int) -> int:
        """Read virtual bytes; short only at vsize. Offset and length must be 512-aligned."""
        n = len(buf)
        if offset % SECTOR or n % SECTOR:
            check_aligned(self.name, offset, n)
        if offset + n > self.vsize:
            n = max(0, self.vsize - offset)
            buf = buf[:n]
        if n:
            self.table.read_into(buf, offset, zero_fill)
        return n

    def pread(self, size: int, offset: int) -> bytes:
        buf = bytearray(size)
        n = self.pread_into(memoryview(buf), offset)
        return bytes(buf[:n])

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ReadOnlyLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ReadOnlyLayer({self.name!r}, vsize={self.vsize}, entries={len(self.index)})"


def read_trailer(f: RandomAccessFile) -> tuple[HeaderTrailer, HeaderTrailer, int]:
    """Header and trailer of a sealed/committed layer, flags checked; returns the trailer offset."""
    name = f.name
    fsize = f.size()
    if fsize < HT_SPACE:
        raise Truncated(name, "size", f"{fsize} bytes; a sealed/committed layer has at least {2 * HT_SPACE}")
    header = HeaderTrailer.unpack(read_exact(f, HT_SPACE, 0, "header"), name, "header")
    if not header.is_header:
        raise BadMagic(name, "header.flags", f"0x{header.flags:x} lacks the HEADER bit")
    if not header.is_data:
        raise BadMagic(name, "header.flags", f"0x{header.flags:x}: an index file, not a data file")
    if fsize < 2 * HT_SPACE:
        raise Truncated(name, "size", f"{fsize} bytes; a sealed/committed layer has at least {2 * HT_SPACE}")
    trailer_off = fsize - HT_SPACE
    try:
        trailer = HeaderTrailer.unpack(read_exact(f, HT_SPACE, trailer_off, "trailer"), name, "trailer")
    except BadMagic as e:
        raise BadMagic(name, e.field, e.message + "; no trailer: layer not sealed/committed (a RW data file?)") from e
    if trailer.is_header or not trailer.is_data or not trailer.is_sealed:
        raise BadMagic(name, "trailer.flags", f"0x{trailer.flags:x}, expected a sealed data trailer (0x06)")
    return header, trailer, trailer_off


def read_index_words(f: RandomAccessFile) -> tuple[HeaderTrailer, HeaderTrailer, array[int]]:
    """Header, trailer and the raw index records of a sealed/committed layer as u64 words
    (little-endian as on disk), read straight into the array (no bytes copy).

    The trailer's index fields are checked against the file size before anything is
    allocated, so a damaged trailer cannot make us read or allocate a claimed size.
    """
    name = f.name
    header, trailer, trailer_off = read_trailer(f)
    count = trailer.index_size
    if count > MAX_RO_INDEX_SIZE:
        raise BadIndex(name, "trailer.index_size", f"{count} records exceeds the limit {MAX_RO_INDEX_SIZE}")
    if trailer.index_offset < HT_SPACE:
        raise BadIndex(name, "trailer.index_offset", f"{trailer.index_offset} lies inside the header")
    if trailer.index_offset > trailer_off:
        raise Truncated(name, "trailer.index_offset", f"{trailer.index_offset} is beyond the trailer at {trailer_off}")
    size = count * RECORD_SIZE
    if size > trailer_off - trailer.index_offset:
        raise Truncated(
            name,
            "trailer.index_size",
            f"{count} records ({size} bytes) do not fit between index_offset "
            f"{trailer.index_offset} and the trailer at {trailer_off}",
        )
    words = array("Q", [0]) * (2 * count)
    with memoryview(words) as view, view.cast("B") as raw:
        got = f.pread_into(raw, trailer.index_offset)
    if got != size:
        raise Truncated(name, "index", f"need {size} bytes at offset {trailer.index_offset}, file has only {got}")
    return header, trailer, words


def read_index_bytes(f: RandomAccessFile) -> tuple[HeaderTrailer, HeaderTrailer, bytes]:
    """`read_index_words` as packed record bytes (for readers that decode records themselves)."""
    header, trailer, words = read_index_words(f)
    return header, trailer, words.tobytes()


def open_ro(f: RandomAccessFile) -> ReadOnlyLayer:
    """Open a sealed or committed layer from an already unwrapped byte source."""
    name = f.name
    header, trailer, words = read_index_words(f)
    index = decode_words(words)
    del words
    validate_index(name, index, HEADER_SECTORS, trailer.index_offset // SECTOR)
    return ReadOnlyLayer(f, header, trailer, index)
