"""Sealing a writable append layer in place (upstream `close_seal`, format.md §1.5).

The sorted index and a sealed trailer are appended to the data file, which then opens with
`open_ro` (the data region keeps overwritten bytes; mappings point at the original positions).
"""

from __future__ import annotations

import os

from ..errors import FormatError
from .header import FLAG_DATA, FLAG_SEALED, HeaderTrailer
from .mapping import RECORD_SIZE, SECTOR, pack_records
from .writable import open_rw


def seal(data_path: str | os.PathLike[str], index_path: str | os.PathLike[str]) -> None:
    """Append index + trailer to the data file of an append layer.

    Upstream pads the index to a 512-byte boundary with uninitialised memory (garbage); this
    writes zeros there instead, so sealed files equal upstream's everywhere except that padding.
    The index and trailer go out in one write followed by fsync; a crash before it completes
    leaves trailing bytes that no mapping references, so the file still reopens as a RW layer.
    """
    layer = open_rw(data_path, index_path, readonly=False)
    try:
        if layer.sparse:
            raise FormatError(layer.name, "header.flags", "sparse writable layers cannot be sealed")
        mappings = layer.mappings()
        index_offset = os.fstat(layer.data.fd).st_size
        raw = pack_records(mappings)
        padded = -(-len(raw) // SECTOR) * SECTOR
        hdr = layer.data_header
        trailer = HeaderTrailer(
            flags=FLAG_DATA | FLAG_SEALED,
            index_offset=index_offset,
            index_size=len(raw) // RECORD_SIZE,
            virtual_size=hdr.virtual_size,
            uuid=hdr.uuid,
            parent_uuid=hdr.parent_uuid,
            user_tag=hdr.user_tag,
            version=hdr.version,
            sub_version=hdr.sub_version,
        )
        layer.data.pwrite(raw + bytes(padded - len(raw)) + trailer.pack(), index_offset)
        os.fsync(layer.data.fd)
    finally:
        layer.close()
