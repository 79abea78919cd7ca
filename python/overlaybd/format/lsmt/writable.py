"""Writable LSMT layers (format.md §1.3, §1.4).

Append layer: data file (header + appended data) and index file (header + one 16-byte record
per operation, in operation order). Records go to disk at once, so a crash loses at most the
operation in flight; reopening replays them ("last write wins").

Sparse layer: data lives at 4096 + virtual offset of a sparse data file; the index is rebuilt
from the file's allocated extents (SEEK_DATA/SEEK_HOLE) on open and the index file stays empty.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Sequence

from ..errors import BadIndex, BadMagic, FormatError, ReadOnly, Truncated
from ..fileio import LocalFile, read_exact
from .header import (
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SPARSE_RW,
    HT_SPACE,
    HeaderTrailer,
    normalize_uuid,
    random_uuid,
)
from .index0 import Index0, read_pieces
from .mapping import INVALID_OFFSET, MAX_LENGTH, RECORD_SIZE, SECTOR, Mapping, unpack_records
from .segments import GapFiller, check_aligned, zero_fill

MAX_IO_SIZE = 4 << 20  # writes are split into 4 MiB pieces (one mapping each)
MAX_RW_INDEX_SIZE = 128_000_000  # upstream MAX_LSMT_INDEX_SIZE
HEADER_SECTORS = HT_SPACE // SECTOR
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_INDEX_READ_CHUNK = 65536 * RECORD_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int, path: str) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE): free the blocks, keep the file size."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise FormatError(path, "discard", f"punch hole at {offset}+{length} failed: {os.strerror(err)}")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class WritableLayer:
    """An append-only or sparse writable layer (created by `create_rw`, reopened by `open_rw`)."""

    def __init__(
        self,
        data: LocalFile,
        index: LocalFile | None,
        data_header: HeaderTrailer,
        index_header: HeaderTrailer | None,
        readonly: bool,
    ) -> None:
        self.data = data
        self.index_file = index
        self.name = data.name
        self.data_header = data_header
        self.index_header = index_header
        self.sparse = data_header.is_sparse
        self.read_only = readonly
        # upstream reads an append layer's vsize from the index header, a sparse one's from the data header
        self.vsize = index_header.virtual_size if index_header is not None else data_header.virtual_size
        self.uuid = data_header.uuid
        self.parent_uuid = data_header.parent_uuid
        self.rw_tag = 0  # tag byte of appended records; a Stack sets it to its number of lowers
        self.index = Index0()
        # serialises appends and index updates against lookups; data reads happen outside it
        # (append layers never overwrite data, so a resolved position stays valid)
        self._lock = threading.Lock()
        size = os.fstat(data.fd).st_size
        self._data_end = -(-size // SECTOR) * SECTOR
        self._index_end = os.fstat(index.fd).st_size if index is not None else 0

    # -- metadata -------------------------------------------------------------------------
    def size(self) -> int:
        return self.vsize

    def mappings(self) -> list[Mapping]:
        """The sorted, trimmed index (upstream `Index0::dump`), tags 0."""
        return self.index.dump()

    def set_vsize(self, vsize: int) -> None:
        """Rewrite virtual_size in the headers (upstream `update_vsize`); sparse also resizes the file."""
        self._check_writable("vsize")
        if vsize < 0 or vsize % SECTOR:
            raise ValueError(f"vsize {vsize} is not a non-negative multiple of {SECTOR}")
        self.data_header.virtual_size = vsize
        self.data.pwrite(self.data_header.pack(), 0)
        if self.index_header is not None and self.index_file is not None:
            self.index_header.virtual_size = vsize
            self.index_file.pwrite(self.index_header.pack(), 0)
        if self.sparse:
            os.ftruncate(self.data.fd, vsize + HT_SPACE)
        self.vsize = vsize

    # -- reads ----------------------------------------------------------------------------
    def read_into(self, buf: memoryview, offset: int, gap: GapFiller = zero_fill) -> None:
        """Fill `buf` from this layer only; unmapped ranges go to `gap` (a Stack passes the lowers)."""
        with self._lock:
            pieces = self.index.resolve(offset, offset + len(buf))
        read_pieces(buf, offset, pieces, self.data.pread_into, gap)

    def pread_into(self, buf: memoryview, offset: int) -> int:
        n = len(buf)
        check_aligned(self.name, offset, n)
        if offset + n > self.vsize:
            n = max(0, self.vsize - offset)
            buf = buf[:n]
        if n:
            self.read_into(buf, offset, zero_fill)
        return n

    def pread(self, size: int, offset: int) -> bytes:
        buf = bytearray(size)
        n = self.pread_into(memoryview(buf), offset)
        return bytes(buf[:n])

    # -- writes ---------------------------------------------------------------------------
    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnly(self.name, what, "layer was opened read-only")

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write 512-aligned data at a virtual offset; returns the byte count."""
        view = memoryview(data).cast("B")
        n = len(view)
        check_aligned(self.name, offset, n)
        self._check_writable("pwrite")
        pos = 0
        while pos < n:
            step = min(n - pos, MAX_IO_SIZE)
            piece = view[pos : pos + step]
            sec = (offset + pos) // SECTOR
            if self.sparse:
                moff = HT_SPACE + offset + pos
                _pwrite_all(self.data.fd, piece, moff)
                with self._lock:
                    self.index.insert(sec, step // SECTOR, moff // SECTOR, False)
            else:
                with self._lock:  # reserves the data position, keeps records in operation order
                    moff = self._data_end
                    _pwrite_all(self.data.fd, piece, moff)
                    self._data_end += step
                    self._record(sec, step // SECTOR, moff // SECTOR, False)
            pos += step
        self.vsize = max(self.vsize, offset + n)  # in memory only, like upstream
        return n

    def discard(self, offset: int, length: int) -> None:
        """Discard a range: append layers record a zeroed mapping (masks lowers); sparse layers punch
        a hole (after reopen the range falls through to lowers, upstream behaviour)."""
        check_aligned(self.name, offset, length)
        self._check_writable("discard")
        sec = offset // SECTOR
        left = length // SECTOR
        while left > 0:
            step = min(left, MAX_LENGTH)
            with self._lock:
                if self.sparse:
                    self.index.insert(sec, step, sec + HEADER_SECTORS, True)
                else:
                    self._record(sec, step, self._data_end // SECTOR, True)
            sec += step
            left -= step
        if self.sparse and length:
            punch_hole(self.data.fd, HT_SPACE + offset, length, self.name)

    def _record(self, offset: int, length: int, moffset: int, zeroed: bool) -> None:
        """Append the record to the index file, then apply it in memory (caller holds the lock)."""
        assert self.index_file is not None
        rec = Mapping(offset, length, moffset, zeroed, self.rw_tag).pack()
        _pwrite_all(self.index_file.fd, memoryview(rec), self._index_end)
        self._index_end += RECORD_SIZE
        self.index.insert(offset, length, moffset, zeroed)

    def fsync(self) -> None:
        os.fsync(self.data.fd)
        if self.index_file is not None:
            os.fsync(self.index_file.fd)

    def close(self) -> None:
        self.data.close()
        if self.index_file is not None:
            self.index_file.close()

    def __enter__(self) -> WritableLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "sparse" if self.sparse else "append"
        return f"WritableLayer({self.name!r}, {kind}, vsize={self.vsize}, entries={len(self.index)})"


def create_layer_files(files: Sequence[tuple[str, bytes | None, int | None]]) -> None:
    """Create each `(path, header block or None, size to truncate to or None)` exclusively and durably.

    Upstream creates layer files with O_EXCL; if any of them fails, the ones already made are
    removed again so a half-created layer never stays behind.
    """
    created: list[str] = []
    try:
        for path, block, size in files:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            created.append(path)
            try:
                if block is not None:
                    _pwrite_all(fd, memoryview(block), 0)
                if size is not None:
                    os.ftruncate(fd, size)  # sparse: the size is not materialised
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        for path in created:
            os.unlink(path)
        raise


def create_rw(
    data_path: str | os.PathLike[str],
    index_path: str | os.PathLike[str],
    vsize: int,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    sparse: bool = False,
    user_tag: bytes = b"",
) -> WritableLayer:
    """Create a new writable layer (both files must not exist; upstream `create_file_rw`)."""
    if vsize < 0 or vsize % SECTOR:
        raise ValueError(f"vsize {vsize} is not a non-negative multiple of {SECTOR}")
    layer_uuid = normalize_uuid(uuid, default=random_uuid())
    parent = normalize_uuid(parent_uuid)
    data_flags = FLAG_HEADER | FLAG_DATA | (FLAG_SPARSE_RW if sparse else 0)
    data_header = HeaderTrailer(data_flags, 0, 0, vsize, layer_uuid, parent, user_tag)
    index_header = HeaderTrailer(FLAG_HEADER, HT_SPACE, 0, vsize, layer_uuid, parent, user_tag)
    data_block = data_header.pack()
    index_block = index_header.pack()  # also validates user_tag before anything is created
    dpath, ipath = os.fspath(data_path), os.fspath(index_path)
    create_layer_files(
        [
            (dpath, data_block, vsize + HT_SPACE if sparse else None),  # sparse: nothing of vsize is materialised
            (ipath, None if sparse else index_block, None),
        ]
    )
    return open_rw(dpath, ipath)


def _load_data_header(data: LocalFile) -> HeaderTrailer:
    if data.size() < HT_SPACE:
        raise Truncated(data.name, "header", f"file has {data.size()} bytes, a layer header needs {HT_SPACE}")
    hdr = HeaderTrailer.unpack(read_exact(data, HT_SPACE, 0, "header"), data.name, "header")
    if not hdr.is_header or not hdr.is_data:
        raise BadMagic(data.name, "header.flags", f"0x{hdr.flags:x} is not a writable data-file header (0x03/0x13)")
    if hdr.is_sealed:
        raise BadMagic(data.name, "header.flags", f"0x{hdr.flags:x}: sealed/committed layer, not writable")
    return hdr


def _load_index_header(index: LocalFile) -> HeaderTrailer:
    if index.size() < HT_SPACE:
        raise Truncated(index.name, "header", f"file has {index.size()} bytes, an index header needs {HT_SPACE}")
    hdr = HeaderTrailer.unpack(read_exact(index, HT_SPACE, 0, "header"), index.name, "header")
    if not hdr.is_header or hdr.is_data or hdr.is_sealed:
        raise BadMagic(index.name, "header.flags", f"0x{hdr.flags:x} is not a RW index-file header (0x01)")
    if hdr.index_offset != HT_SPACE:
        raise BadIndex(index.name, "header.index_offset", f"{hdr.index_offset}, expected {HT_SPACE}")
    return hdr


def _replay_index(layer: WritableLayer, index: LocalFile) -> None:
    """Insert every record in file order; invalid (padding) records are skipped, tags reset."""
    fsize = index.size()
    count = (fsize - HT_SPACE) // RECORD_SIZE
    if count > MAX_RW_INDEX_SIZE:
        raise BadIndex(index.name, "records", f"{count} records exceeds the limit {MAX_RW_INDEX_SIZE}")
    data_sectors = layer._data_end // SECTOR
    pos = HT_SPACE
    end = HT_SPACE + count * RECORD_SIZE
    nr = 0
    while pos < end:
        step = min(_INDEX_READ_CHUNK, end - pos)
        raw = read_exact(index, step, pos, "index records")
        for m in unpack_records(raw):
            if m.offset != INVALID_OFFSET and m.length:
                if m.zeroed:
                    bad = m.moffset > data_sectors
                else:
                    bad = m.moffset < HEADER_SECTORS or m.moffset + m.length > data_sectors
                if bad:
                    raise BadIndex(
                        index.name,
                        f"record[{nr}].moffset",
                        f"{m} points outside the data file's sectors [{HEADER_SECTORS}, {data_sectors}]",
                    )
                layer.index.insert(m.offset, m.length, m.moffset, m.zeroed)
            nr += 1
        pos += step


def _scan_sparse(layer: WritableLayer) -> None:
    """Rebuild a sparse layer's index from the allocated extents of the data file."""
    fd = layer.data.fd
    fsize = os.fstat(fd).st_size
    pos = HT_SPACE
    while pos < fsize:
        try:
            begin = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, begin, os.SEEK_HOLE)
        sec = begin // SECTOR
        left = -(-end // SECTOR) - sec
        while left > 0:
            step = min(left, MAX_LENGTH)
            layer.index.insert(sec - HEADER_SECTORS, step, sec, False)
            sec += step
            left -= step
        pos = end


def open_rw(
    data_path: str | os.PathLike[str], index_path: str | os.PathLike[str], *, readonly: bool = False
) -> WritableLayer:
    """Reopen a writable layer; append or sparse is decided by the data header's flags."""
    data = LocalFile(data_path, writable=not readonly)
    index: LocalFile | None = None
    try:
        data_header = _load_data_header(data)
        if data_header.is_sparse:
            layer = WritableLayer(data, None, data_header, None, readonly)
            _scan_sparse(layer)
        else:
            index = LocalFile(index_path, writable=not readonly)
            index_header = _load_index_header(index)
            layer = WritableLayer(data, index, data_header, index_header, readonly)
            _replay_index(layer, index)
    except BaseException:
        data.close()
        if index is not None:
            index.close()
        raise
    return layer
