"""TurboOCI ("warp") layers: LSMT layers whose data comes from two files (format.md §1.9).

A warp layer maps each range either to its own file (tag 0, "fsmeta": filesystem metadata) or
to a *target* file (tag 1, "remote data": the uncompressed OCI layer tar the files' contents
already live in). So a converted image only has to ship the metadata.

Both sources are presented as one address space (`WarpSources`): bytes below `TARGET_BASE` are
the layer's own file, bytes from `TARGET_BASE` on are the target. Tag-1 moffsets are shifted by
`TARGET_BASE_SECTOR` in the in-memory index, which lets a warp layer be an ordinary
`ReadOnlyLayer`/`WritableLayer` for `Stack`, `merge` and the read path (no per-layer tag
plumbing, one reader per layer), while the on-disk form keeps the real tags and moffsets.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Sequence

from ..errors import BadIndex, BadMagic, FormatError, Truncated, Unaligned
from ..fileio import LocalFile, RandomAccessFile, read_exact
from .compact import PCOPY_STEP, Sink
from .header import FLAG_DATA, FLAG_HEADER, FLAG_SEALED, HT_SPACE, MAGIC0, HeaderTrailer, normalize_uuid, random_uuid
from .index0 import read_pieces
from .mapping import (
    INVALID_OFFSET,
    MAX_LENGTH,
    RECORD_SIZE,
    SECTOR,
    Columns,
    Mapping,
    compress_raw_index,
    pack_records,
)
from .readonly import ReadOnlyLayer, read_index_bytes
from .segments import GapFiller, check_aligned, zero_fill
from .writable import MAX_RW_INDEX_SIZE, WritableLayer, _pwrite_all, create_layer_files

TAG_FSMETA = 0  # upstream SegmentType::fsMeta: the layer's own file
TAG_REMOTE = 1  # upstream SegmentType::remoteData: the target (uncompressed layer tar)
TARGET_BASE_SECTOR = 1 << 54  # no real file reaches 2**63 bytes, so the halves never collide
TARGET_BASE = TARGET_BASE_SECTOR * SECTOR
HEADER_SECTORS = HT_SPACE // SECTOR
COPY_CHUNK = 1 << 20
_OFF_MASK = (1 << 50) - 1
_MOFF_MASK = (1 << 55) - 1


class WarpSources:
    """RandomAccessFile over a warp layer's own file (below TARGET_BASE) and its target (above).

    Owns both: close() closes both. `fd` is the own file's descriptor (a writable layer fstat()s
    and fsync()s it). Without a target, reading remote data raises a FormatError naming it.
    """

    def __init__(self, own: RandomAccessFile, target: RandomAccessFile | None) -> None:
        self.own = own
        self.target = target
        self.name = own.name
        self.fd: int = getattr(own, "fd", -1)

    def size(self) -> int:
        """End of the combined space (the target's end above TARGET_BASE)."""
        return TARGET_BASE + (self.target.size() if self.target is not None else 0)

    def pread_into(self, buf: memoryview, offset: int) -> int:
        if offset >= TARGET_BASE:
            if self.target is None:
                raise FormatError(self.name, "target", "layer maps remote data but no target file was given")
            return self.target.pread_into(buf, offset - TARGET_BASE)
        if offset + len(buf) > TARGET_BASE:
            buf = buf[: TARGET_BASE - offset]
        return self.own.pread_into(buf, offset)

    def pread(self, size: int, offset: int) -> bytes:
        buf = bytearray(size)
        n = self.pread_into(memoryview(buf), offset)
        return bytes(buf[:n])

    def close(self) -> None:
        try:
            self.own.close()
        finally:
            if self.target is not None:
                self.target.close()

    def __repr__(self) -> str:
        return f"WarpSources({self.own!r}, target={self.target!r})"


def _decode_tagged(raw: bytes) -> tuple[list[int], list[int], list[int], list[bool], list[int]]:
    """Packed records -> columns with tags, invalid (padding) and empty records dropped."""
    words = array("Q")
    words.frombytes(raw[: len(raw) - len(raw) % RECORD_SIZE])
    if sys.byteorder != "little":
        words.byteswap()
    lo, hi = words[0::2], words[1::2]
    offs = [x & _OFF_MASK for x in lo]
    lens = [x >> 50 for x in lo]
    moffs = [x & _MOFF_MASK for x in hi]
    zeros = [bool(x >> 55 & 1) for x in hi]
    tags = [x >> 56 for x in hi]
    if INVALID_OFFSET in offs or 0 in lens:
        keep = [i for i, (o, n) in enumerate(zip(offs, lens, strict=True)) if o != INVALID_OFFSET and n]
        offs, lens, moffs = [offs[i] for i in keep], [lens[i] for i in keep], [moffs[i] for i in keep]
        zeros, tags = [zeros[i] for i in keep], [tags[i] for i in keep]
    return offs, lens, moffs, zeros, tags


def _normalize_tags(path: str, tags: list[int], where: str) -> list[int]:
    """Upstream subtracts the smallest tag (a RW warp stacked on n lowers writes n and n+1).

    Quirk kept for byte-compatible reads: a layer holding only remote data thus gets tag 0
    everywhere (its ranges are then read from the layer file, or, usually, fail the moffset check).
    """
    if not tags:
        return tags
    low = min(tags)
    if low:
        tags = [t - low for t in tags]
    if max(tags) > TAG_REMOTE:
        i = next(i for i, t in enumerate(tags) if t > TAG_REMOTE)
        msg = f"tag {tags[i] + low}: a warp layer has only 2 sources (lowest tag {low})"
        raise BadIndex(path, f"{where}[{i}].tag", msg)
    return tags


class WarpLayer(ReadOnlyLayer):
    """A committed TurboOCI layer: reads go to the layer file (tag 0) or the target (tag 1).

    `index`/`mappings` use the combined address space of `file` (a WarpSources), like every
    ReadOnlyLayer; `tagged_mappings` is the on-disk view with real tags and moffsets.
    """

    def __init__(
        self, sources: WarpSources, header: HeaderTrailer, trailer: HeaderTrailer, index: Columns, tags: Sequence[int]
    ) -> None:
        super().__init__(sources, header, trailer, index)
        self.sources = sources
        self.layer_file = sources.own
        self.target = sources.target
        self.tags = bytearray(tags)  # one byte an entry (each is 0 or 1)

    @property
    def tagged_mappings(self) -> list[Mapping]:
        idx = self.index
        out = []
        for o, n, m, z, t in zip(idx.offs, idx.lens, idx.moffs, idx.zeros, self.tags, strict=True):
            out.append(Mapping(o, n, m - TARGET_BASE_SECTOR if (t == TAG_REMOTE and not z) else m, bool(z), t))
        return out

    def __repr__(self) -> str:
        target = self.target.name if self.target is not None else None
        return f"WarpLayer({self.name!r}, target={target!r}, vsize={self.vsize}, entries={len(self.index)})"


def open_warp_ro(layer: RandomAccessFile, target: RandomAccessFile) -> WarpLayer:
    """Open a committed warp layer (already unwrapped from tar/ZFile) over its target.

    Checks as `open_ro` (§1.6), except that tag-1 data must lie inside the target (upstream checks
    no warp moffsets at all; a bad range then reads zeros or garbage instead of failing here).
    On success the returned layer owns both files; on error the caller still owns them.
    """
    name = layer.name
    header, trailer, raw = read_index_bytes(layer)
    offs, lens, moffs, zeros, tags = _decode_tagged(raw)
    del raw
    tags = _normalize_tags(name, tags, "index")
    own_hi = trailer.index_offset // SECTOR
    target_hi = -(-target.size() // SECTOR)
    prev_end = -1
    for i, (off, n, m, z, t) in enumerate(zip(offs, lens, moffs, zeros, tags, strict=True)):
        if off < prev_end:
            raise BadIndex(name, f"index[{i}].offset", f"sector {off} overlaps or precedes the previous end {prev_end}")
        prev_end = off + n
        if z:
            continue  # zeroed: moffset is only the writer's cursor, never read
        if t == TAG_FSMETA:
            if m < HEADER_SECTORS or m + n > own_hi:
                msg = f"data sectors [{m}, {m + n}) outside the layer's data [{HEADER_SECTORS}, {own_hi})"
                raise BadIndex(name, f"index[{i}].moffset", msg)
        elif m + n > target_hi:
            msg = f"remote sectors [{m}, {m + n}) beyond the target {target.name} ({target_hi} sectors)"
            raise BadIndex(name, f"index[{i}].moffset", msg)
    combined = [
        m + TARGET_BASE_SECTOR if (t == TAG_REMOTE and not z) else m for m, z, t in zip(moffs, zeros, tags, strict=True)
    ]
    index = Columns(offs, lens, combined, zeros)
    return WarpLayer(WarpSources(layer, target), header, trailer, index, tags)


# ---------------------------------------------------------------------------------------------
# writable warp layer (`overlaybd-create -s --turboOCI`, `turboOCI-apply`)


class WarpWritableLayer(WritableLayer):
    """A writable warp layer: index file (LSMT header 0x01 + records) and a plain sparse fsmeta
    file of vsize bytes written at identity offsets. `add_remote` maps ranges to the target.

    Records carry tag rw_tag+0 (fsmeta) or rw_tag+1 (remote) like upstream; the in-memory index
    keeps remote moffsets shifted by TARGET_BASE_SECTOR so reads go through one WarpSources.
    """

    def __init__(
        self,
        sources: WarpSources,
        index: LocalFile,
        index_header: HeaderTrailer,
        readonly: bool,
    ) -> None:
        super().__init__(sources, index, index_header, index_header, readonly)  # type: ignore[arg-type]
        self.sources = sources
        self.fsmeta = sources.own
        self.target = sources.target

    # -- reads ------------------------------------------------------------------------------
    def read_into(self, buf: memoryview, offset: int, gap: GapFiller = zero_fill) -> None:
        with self._lock:
            pieces = self.index.resolve(offset, offset + len(buf))
        read_pieces(buf, offset, pieces, self.sources.pread_into, gap)

    def tagged_mappings(self) -> list[Mapping]:
        """Sorted, trimmed index with real tags (0 fsmeta, 1 remote) and moffsets."""
        out = []
        for m in self.index.dump():
            if m.moffset >= TARGET_BASE_SECTOR and not m.zeroed:
                out.append(m._replace(moffset=m.moffset - TARGET_BASE_SECTOR, tag=TAG_REMOTE))
            else:
                out.append(m)
        return out

    # -- writes -----------------------------------------------------------------------------
    def _check_range(self, what: str, offset: int, length: int) -> None:
        check_aligned(self.name, offset, length)
        self._check_writable(what)
        if offset + length > self.vsize:
            raise FormatError(self.name, what, f"range {offset}+{length} ends beyond vsize {self.vsize}")

    def _append(self, offset: int, length: int, moffset: int, zeroed: bool, tag: int, mem_moffset: int) -> None:
        """Append the record (real moffset and tag) and apply it in memory (caller holds the lock)."""
        assert self.index_file is not None
        rec = Mapping(offset, length, moffset, zeroed, self.rw_tag + tag).pack()
        _pwrite_all(self.index_file.fd, memoryview(rec), self._index_end)
        self._index_end += RECORD_SIZE
        self.index.insert(offset, length, mem_moffset, zeroed)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write filesystem metadata: into the fsmeta file at the same offset, one record per
        MAX_LENGTH sectors (upstream writes one record per call; identical up to 8 MiB)."""
        view = memoryview(data).cast("B")
        n = len(view)
        self._check_range("pwrite", offset, n)
        step_bytes = MAX_LENGTH * SECTOR
        pos = 0
        while pos < n:
            step = min(n - pos, step_bytes)
            _pwrite_all(self.sources.fd, view[pos : pos + step], offset + pos)
            sec = (offset + pos) // SECTOR
            with self._lock:
                self._append(sec, step // SECTOR, sec, False, TAG_FSMETA, sec)
            pos += step
        return n

    def add_remote(self, offset: int, length: int, target_offset: int) -> None:
        """Map virtual bytes [offset, offset+length) to the target at `target_offset` (upstream
        ioctl RemoteData); split at MAX_LENGTH sectors. All three must be 512-aligned."""
        self._check_range("add_remote", offset, length)
        if target_offset < 0 or target_offset % SECTOR:
            raise Unaligned(self.name, "target_offset", f"{target_offset} is not a multiple of {SECTOR}")
        if target_offset + length > TARGET_BASE:
            raise FormatError(self.name, "target_offset", f"{target_offset}+{length} is beyond any file")
        sec, left, rsec = offset // SECTOR, length // SECTOR, target_offset // SECTOR
        while left > 0:
            step = min(left, MAX_LENGTH)
            with self._lock:
                self._append(sec, step, rsec, False, TAG_REMOTE, rsec + TARGET_BASE_SECTOR)
            sec += step
            rsec += step
            left -= step

    def discard(self, offset: int, length: int) -> None:
        """Zeroed mapping (masks lowers) at the fsmeta EOF cursor, like upstream's LSMTFile."""
        self._check_range("discard", offset, length)
        cursor = os.fstat(self.sources.fd).st_size // SECTOR
        sec, left = offset // SECTOR, length // SECTOR
        while left > 0:
            step = min(left, MAX_LENGTH)
            with self._lock:
                self._append(sec, step, cursor, True, TAG_FSMETA, cursor)
            sec += step
            left -= step

    def set_vsize(self, vsize: int) -> None:
        """Rewrite virtual_size in the index header and resize the fsmeta file."""
        self._check_writable("vsize")
        if vsize < 0 or vsize % SECTOR:
            raise ValueError(f"vsize {vsize} is not a non-negative multiple of {SECTOR}")
        assert self.index_file is not None and self.index_header is not None
        self.index_header.virtual_size = vsize
        self.index_file.pwrite(self.index_header.pack(), 0)
        os.ftruncate(self.sources.fd, vsize)
        self.vsize = vsize

    def fsync(self) -> None:
        os.fsync(self.sources.fd)
        if self.index_file is not None:
            os.fsync(self.index_file.fd)

    def __repr__(self) -> str:
        return f"WarpWritableLayer({self.name!r}, vsize={self.vsize}, entries={len(self.index)})"


def create_warp_rw(
    data_path: str | os.PathLike[str],
    index_path: str | os.PathLike[str],
    vsize: int,
    *,
    target: RandomAccessFile | None = None,
    uuid: str | None = None,
    parent_uuid: str | None = None,
) -> WarpWritableLayer:
    """Create a writable warp layer (neither file may exist; upstream `create_warpfile`):
    index file = LSMT header (flags 0x01, index_offset 4096), data = sparse file of vsize bytes."""
    if vsize < 0 or vsize % SECTOR:
        raise ValueError(f"vsize {vsize} is not a non-negative multiple of {SECTOR}")
    header = HeaderTrailer(
        FLAG_HEADER, HT_SPACE, 0, vsize, normalize_uuid(uuid, default=random_uuid()), normalize_uuid(parent_uuid)
    )
    dpath, ipath = os.fspath(data_path), os.fspath(index_path)
    create_layer_files([(dpath, None, vsize), (ipath, header.pack(), None)])  # data: sparse fs-meta file
    return open_warp_rw(dpath, ipath, target=target)


def _load_warp_index_header(index: LocalFile) -> HeaderTrailer:
    if index.size() < HT_SPACE:
        raise Truncated(index.name, "header", f"file has {index.size()} bytes, an index header needs {HT_SPACE}")
    hdr = HeaderTrailer.unpack(read_exact(index, HT_SPACE, 0, "header"), index.name, "header")
    if not hdr.is_header or hdr.is_data or hdr.is_sealed:
        raise BadMagic(index.name, "header.flags", f"0x{hdr.flags:x} is not a RW index-file header (0x01)")
    if hdr.index_offset != HT_SPACE:
        raise BadIndex(index.name, "header.index_offset", f"{hdr.index_offset}, expected {HT_SPACE}")
    return hdr


def open_warp_rw(
    data_path: str | os.PathLike[str],
    index_path: str | os.PathLike[str],
    *,
    target: RandomAccessFile | None = None,
    readonly: bool = False,
) -> WarpWritableLayer:
    """Reopen a writable warp layer: records replayed in file order ("last write wins"), tags
    normalised as upstream (`tag -= min_tag`). The layer owns `target` once this returns."""
    fsmeta = LocalFile(data_path, writable=not readonly)
    index: LocalFile | None = None
    try:
        index = LocalFile(index_path, writable=not readonly)
        if fsmeta.pread(len(MAGIC0), 0) == MAGIC0:
            # A warp data file is a raw fs image (its first KiB is the boot block): an LSMT
            # header there means an append/sparse layer was passed where a warp layer belongs.
            raise BadMagic(fsmeta.name, "data", "this is an append/sparse layer data file, not a TurboOCI fs-meta file")
        header = _load_warp_index_header(index)
        count = (index.size() - HT_SPACE) // RECORD_SIZE
        if count > MAX_RW_INDEX_SIZE:
            raise BadIndex(index.name, "records", f"{count} records exceeds the limit {MAX_RW_INDEX_SIZE}")
        raw = read_exact(index, count * RECORD_SIZE, HT_SPACE, "index records")
        offs, lens, moffs, zeros, tags = _decode_tagged(raw)
        tags = _normalize_tags(index.name, tags, "record")
        layer = WarpWritableLayer(WarpSources(fsmeta, None), index, header, readonly)
        vsize_sectors = header.virtual_size // SECTOR
        for i, (off, n, m, z, t) in enumerate(zip(offs, lens, moffs, zeros, tags, strict=True)):
            if not z and t == TAG_FSMETA and m + n > vsize_sectors:
                msg = f"fsmeta sectors [{m}, {m + n}) beyond vsize {header.virtual_size}"
                raise BadIndex(index.name, f"record[{i}].moffset", msg)
            layer.index.insert(off, n, m + TARGET_BASE_SECTOR if (t == TAG_REMOTE and not z) else m, z)
    except BaseException:
        fsmeta.close()
        if index is not None:
            index.close()
        raise
    layer.sources.target = target
    layer.target = target
    return layer


# ---------------------------------------------------------------------------------------------
# commit (`overlaybd-commit data index out --turboOCI`, upstream LSMTWarpFile::commit)


def _warp_raw_index(mappings: Sequence[Mapping]) -> list[Mapping]:
    """Output records before compress_raw_index: remote verbatim, zeroed at the cursor,
    fsmeta data one record per 32 KiB copy step."""
    out: list[Mapping] = []
    mo = HEADER_SECTORS
    step_sec = PCOPY_STEP // SECTOR
    for m in mappings:
        if m.tag == TAG_REMOTE:
            out.append(m)
        elif m.zeroed:
            out.append(Mapping(m.offset, m.length, mo, True, m.tag))
        else:
            off, left = m.offset, m.length
            while left > 0:
                n = min(left, step_sec)
                out.append(Mapping(off, n, mo, False, m.tag))
                off += n
                mo += n
                left -= n
    return out


def commit_warp(
    source: WarpWritableLayer,
    out: Sink,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
) -> None:
    """Write the committed warp layer to `out`: header 0x07, live fsmeta data in LBA order,
    unpadded index (remote mappings verbatim, tag 1), trailer 0x06. Byte-exact with upstream.

    Upstream takes no metadata from the source except vsize: uuid and parent uuid are NULL unless
    given and the user tag is always empty.
    """
    if source.rw_tag:
        raise FormatError(source.name, "layer", "commit a warp layer on its own, not stacked on lowers")
    mappings = source.tagged_mappings()
    header = HeaderTrailer(
        flags=FLAG_HEADER | FLAG_DATA | FLAG_SEALED,
        virtual_size=source.vsize,
        uuid=normalize_uuid(uuid),
        parent_uuid=normalize_uuid(parent_uuid),
    )
    out.write(header.pack())
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    data_sectors = 0
    read = source.fsmeta.pread_into
    for m in mappings:
        if m.zeroed or m.tag == TAG_REMOTE:
            continue
        src, left = m.moffset * SECTOR, m.length * SECTOR
        while left > 0:
            n = min(left, COPY_CHUNK)
            got = read(view[:n], src)
            if got != n:
                # the fsmeta file is sparse and vsize long: a short read means it was truncated
                raise Truncated(source.fsmeta.name, "data", f"short read of {n} bytes at {src} (got {got}) for {m}")
            out.write(view[:n])
            src += n
            left -= n
        data_sectors += m.length
    index = compress_raw_index(_warp_raw_index(mappings))
    index_offset = HT_SPACE + data_sectors * SECTOR
    out.write(pack_records(index))
    trailer = HeaderTrailer(
        flags=FLAG_DATA | FLAG_SEALED,
        index_offset=index_offset,
        index_size=len(index),
        virtual_size=header.virtual_size,
        uuid=header.uuid,
        parent_uuid=header.parent_uuid,
    )
    out.write(trailer.pack())


__all__ = [
    "TAG_FSMETA",
    "TAG_REMOTE",
    "TARGET_BASE",
    "TARGET_BASE_SECTOR",
    "WarpLayer",
    "WarpSources",
    "WarpWritableLayer",
    "commit_warp",
    "create_warp_rw",
    "open_warp_ro",
    "open_warp_rw",
]
