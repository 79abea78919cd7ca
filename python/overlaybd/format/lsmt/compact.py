"""Commit (compaction) and merge of layers into a committed layer, byte-exact with upstream
`compact()` (format.md §1.8).

Output is produced sequentially through any `.write()` sink (an AtomicOutput, a ZFile writer,
a tar writer). The index is computed exactly as upstream's 32 KiB `pcopy` steps followed by
`compress_raw_index`, which is what fixes the run lengths; the data copy itself is free to use
bigger pieces: consecutive mappings whose source bytes are contiguous are copied as one run,
kernel-side (`copy_file_range`) when the source is a plain local file and the sink a seekable
regular file, else in 4 MiB reads and writes through one reused buffer.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator, Sequence
from typing import Protocol

from ..atomic import AtomicOutput
from ..errors import FormatError, Truncated
from ..fileio import LocalFile
from .header import FLAG_DATA, FLAG_HEADER, FLAG_SEALED, HT_SPACE, HeaderTrailer, normalize_uuid
from .mapping import INVALID_RECORD, MAX_LENGTH, SECTOR, Mapping, merge_columns, pack_records
from .readonly import ReadOnlyLayer
from .segments import Reader
from .writable import WritableLayer

PCOPY_STEP = 32768  # upstream copies (and indexes) in 32 KiB steps
COPY_CHUNK = 4 << 20  # buffer of the read/write copy
KERNEL_COPY_CHUNK = 64 << 20  # bytes per copy_file_range call (bounds one syscall's duration)
INDEX_PAD = 256  # committed index is padded to a multiple of 256 records (4096 bytes)
MAX_STACK_LAYERS = 255


class Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


def _raw_steps(mappings: Sequence[Mapping]) -> Iterator[Mapping]:
    """The uncompressed output index: one record per 32 KiB copy step, zeroed ranges at the cursor."""
    mo = HT_SPACE // SECTOR
    step_sec = PCOPY_STEP // SECTOR
    for m in mappings:
        if m.zeroed:
            yield Mapping(m.offset, m.length, mo, True, m.tag)
            continue
        off, left = m.offset, m.length
        while left > 0:
            n = min(left, step_sec)
            yield Mapping(off, n, mo, False, m.tag)
            off += n
            mo += n
            left -= n


def commit_index(mappings: Sequence[Mapping]) -> list[Mapping]:
    """The committed index: `compress_raw_index(_raw_steps(mappings))` computed on plain ints.

    Same greedy rule (join a step to the previous record when it continues it in LBA and file space,
    has the same zeroed flag and tag, and the sum stays below MAX_LENGTH), without a Mapping object
    per 32 KiB step — that costs a noticeable share of a commit otherwise.
    """
    out: list[Mapping] = []
    step_sec = PCOPY_STEP // SECTOR
    mo = HT_SPACE // SECTOR
    # the record being built: LBA start, length, file start, zeroed, tag (have=False: none yet)
    have = False
    c_off = c_len = c_mo = c_tag = 0
    c_zero = False
    for m in mappings:
        tag = m.tag
        if m.zeroed:
            if (
                have
                and c_zero
                and c_tag == tag
                and c_off + c_len == m.offset
                and c_mo == mo
                and c_len + m.length < MAX_LENGTH
            ):
                c_len += m.length
                continue
            if have:
                out.append(Mapping(c_off, c_len, c_mo, c_zero, c_tag))
            have, c_off, c_len, c_mo, c_zero, c_tag = True, m.offset, m.length, mo, True, tag
            continue
        off, left = m.offset, m.length
        while left > 0:
            n = step_sec if left > step_sec else left
            # a data record's file end is c_mo + c_len, which always equals the cursor `mo` here
            if have and not c_zero and c_tag == tag and c_off + c_len == off and c_len + n < MAX_LENGTH:
                c_len += n
            else:
                if have:
                    out.append(Mapping(c_off, c_len, c_mo, c_zero, c_tag))
                have, c_off, c_len, c_mo, c_zero, c_tag = True, off, n, mo, False, tag
            off += n
            mo += n
            left -= n
    if have:
        out.append(Mapping(c_off, c_len, c_mo, c_zero, c_tag))
    return out


def _data_runs(mappings: Sequence[Mapping]) -> Iterator[tuple[int, int, int, Mapping]]:
    """(tag, source byte offset, byte length, first mapping) of the data to copy, in output order.

    Consecutive non-zeroed mappings of one source whose bytes follow each other in that source
    form one run (zeroed mappings write nothing, so they do not break a run).
    """
    tag = -1
    src = end = 0
    first: Mapping | None = None
    for m in mappings:
        if m.zeroed:
            continue
        m_src = m.moffset * SECTOR
        if m.tag == tag and m_src == end:
            end += m.length * SECTOR
            continue
        if first is not None:
            yield tag, src, end - src, first
        tag, src, end, first = m.tag, m_src, m_src + m.length * SECTOR, m
    if first is not None:
        yield tag, src, end - src, first


def _source_fd(reader: Reader) -> int | None:
    """The fd behind `reader` when it is exactly `LocalFile.pread_into` (subclasses may transform data)."""
    owner = getattr(reader, "__self__", None)
    if type(owner) is LocalFile and getattr(reader, "__func__", None) is LocalFile.pread_into:
        return owner.fd
    return None


def _sink_file(out: Sink) -> io.IOBase | None:
    """The seekable regular file under `out` that copy_file_range may write to, else None."""
    f = out.file if isinstance(out, AtomicOutput) else out
    if not isinstance(f, io.IOBase):
        return None
    try:
        if not f.seekable():
            return None
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
    except (OSError, ValueError):
        return None
    return f


class _Copier:
    """Copies source runs to the sink: kernel-side where possible, else through one reused buffer."""

    def __init__(self, readers: Sequence[Reader], names: Sequence[str], out: Sink) -> None:
        self.readers = readers
        self.names = names
        self.out = out
        self.fds = [_source_fd(rd) for rd in readers]
        self.sink = _sink_file(out) if any(fd is not None for fd in self.fds) else None
        self.view: memoryview | None = None

    def copy(self, tag: int, src: int, length: int, first: Mapping) -> None:
        fd = self.fds[tag]
        if fd is not None and self.sink is not None:
            try:
                self._kernel_copy(fd, tag, src, length, first)
                return
            except OSError:
                self.sink = None  # e.g. a file system without copy_file_range support: fall back for good
        self._buffered_copy(tag, src, length, first)

    def _short(self, tag: int, src: int, n: int, got: int, first: Mapping) -> Truncated:
        return Truncated(
            self.names[tag], "data", f"short read of {n} bytes at {src} (got {got}) in the run starting with {first}"
        )

    def _kernel_copy(self, fd: int, tag: int, src: int, length: int, first: Mapping) -> None:
        sink = self.sink
        assert sink is not None
        sink.flush()
        dst_fd = sink.fileno()
        start = pos = sink.tell()
        done = 0
        try:
            while done < length:
                n = min(length - done, KERNEL_COPY_CHUNK)
                got = os.copy_file_range(fd, dst_fd, n, src + done, pos)
                if got == 0:
                    raise self._short(tag, src + done, n, 0, first)
                done += got
                pos += got
        except OSError:
            if done:  # a later piece failed: rewind so the fallback rewrites the whole run
                os.ftruncate(dst_fd, start)
                done = 0
            raise
        finally:
            sink.seek(start + done)

    def _buffered_copy(self, tag: int, src: int, length: int, first: Mapping) -> None:
        if self.view is None:
            self.view = memoryview(bytearray(COPY_CHUNK))
        view = self.view
        rd = self.readers[tag]
        write = self.out.write
        while length > 0:
            n = min(length, len(view))
            got = rd(view[:n], src)
            if got != n:
                raise self._short(tag, src, n, got, first)
            write(view[:n])
            src += n
            length -= n


def compact(
    mappings: Sequence[Mapping], readers: Sequence[Reader], names: Sequence[str], header: HeaderTrailer, out: Sink
) -> None:
    """Write header, live data in LBA order, padded index and trailer to `out`.

    `readers[tag]` reads the source file a mapping's tag selects; `names[tag]` is for errors.
    The buffer handed to `out.write` is reused afterwards, so sinks must consume it at once.
    """
    out.write(header.pack())
    copier = _Copier(readers, names, out)
    data_bytes = 0
    for tag, src, length, first in _data_runs(mappings):
        copier.copy(tag, src, length, first)
        data_bytes += length
    index = commit_index(mappings)
    index_offset = HT_SPACE + data_bytes
    raw = pack_records(index)
    count = len(index)
    pad = (-count) % INDEX_PAD
    out.write(raw + INVALID_RECORD * pad)
    trailer = HeaderTrailer(
        flags=FLAG_DATA | FLAG_SEALED,
        index_offset=index_offset,
        index_size=count + pad,
        virtual_size=header.virtual_size,
        uuid=header.uuid,
        parent_uuid=header.parent_uuid,
        user_tag=header.user_tag,
        version=header.version,
        sub_version=header.sub_version,
    )
    out.write(trailer.pack())


def _commit_header(
    vsize: int, uuid: str | None, parent_uuid: str | None, default_parent: str, tag: bytes
) -> HeaderTrailer:
    return HeaderTrailer(
        flags=FLAG_HEADER | FLAG_DATA | FLAG_SEALED,
        index_offset=0,
        index_size=0,
        virtual_size=vsize,
        uuid=normalize_uuid(uuid),
        parent_uuid=normalize_uuid(parent_uuid, default=default_parent),
        user_tag=tag,
    )


def commit(
    source: WritableLayer | ReadOnlyLayer,
    out: Sink,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    user_tag: bytes = b"",
) -> None:
    """Compact one layer (RW or sealed/committed) into a committed layer written to `out`.

    Metadata as upstream: vsize and default parent uuid come from the source's header at offset 0,
    the uuid is NULL unless given, the user tag is only what is given.
    """
    if isinstance(source, WritableLayer):
        hdr = source.data_header
        mappings = source.mappings()
        reader = source.data.pread_into
    else:
        hdr = source.header
        mappings = source.mappings
        reader = source.file.pread_into
    header = _commit_header(hdr.virtual_size, uuid, parent_uuid, hdr.parent_uuid, user_tag)
    compact(mappings, [reader], [source.name], header, out)


def merge(
    layers: Sequence[ReadOnlyLayer],
    out: Sink,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    user_tag: bytes = b"",
) -> None:
    """Flatten layers (given bottom..top) into one committed layer (upstream `merge_files_ro`).

    Records keep the source layer's position from the top in `tag` (0 = top), vsize comes from
    the top layer's header, the default parent uuid from the bottom layer's header.
    """
    if not layers:
        raise ValueError("merge needs at least one layer")
    if len(layers) > MAX_STACK_LAYERS:
        raise FormatError(layers[-1].name, "layers", f"{len(layers)} layers, at most {MAX_STACK_LAYERS}")
    top_down = list(reversed(layers))
    mappings = merge_columns([layer.index for layer in top_down]).to_mappings()
    header = _commit_header(top_down[0].header.virtual_size, uuid, parent_uuid, layers[0].header.parent_uuid, user_tag)
    compact(mappings, [la.file.pread_into for la in top_down], [la.name for la in top_down], header, out)
