"""Commit (compaction) and merge of layers into a committed layer, byte-exact with upstream
`compact()` (format.md §1.8).

Output is produced sequentially through any `.write()` sink (an AtomicOutput, a ZFile writer,
a tar writer). Data is copied in 1 MiB reads; the index is computed exactly as upstream's
32 KiB `pcopy` steps followed by `compress_raw_index`, which is what fixes the run lengths.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from ..errors import FormatError, Truncated
from .header import FLAG_DATA, FLAG_HEADER, FLAG_SEALED, HT_SPACE, HeaderTrailer, normalize_uuid
from .mapping import INVALID_RECORD, SECTOR, Mapping, compress_raw_index, merge_columns, pack_records
from .readonly import ReadOnlyLayer
from .segments import Reader
from .writable import WritableLayer

PCOPY_STEP = 32768  # upstream copies (and indexes) in 32 KiB steps
COPY_CHUNK = 1 << 20
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


def compact(
    mappings: Sequence[Mapping], readers: Sequence[Reader], names: Sequence[str], header: HeaderTrailer, out: Sink
) -> None:
    """Write header, live data in LBA order, padded index and trailer to `out`.

    `readers[tag]` reads the source file a mapping's tag selects; `names[tag]` is for errors.
    The buffer handed to `out.write` is reused afterwards, so sinks must consume it at once.
    """
    out.write(header.pack())
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    data_sectors = 0
    for m in mappings:
        if m.zeroed:
            continue
        src = m.moffset * SECTOR
        left = m.length * SECTOR
        rd = readers[m.tag]
        while left > 0:
            n = min(left, COPY_CHUNK)
            got = rd(view[:n], src)
            if got != n:
                raise Truncated(names[m.tag], "data", f"short read of {n} bytes at {src} (got {got}) for {m}")
            out.write(view[:n])
            src += n
            left -= n
        data_sectors += m.length
    index = compress_raw_index(_raw_steps(mappings))
    index_offset = HT_SPACE + data_sectors * SECTOR
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


def _commit_header(vsize: int, uuid: str | None, parent_uuid: str | None, default_parent: str, tag: bytes):
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
