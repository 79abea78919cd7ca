"""LSMT ("overlaybd layer") format: writable append/sparse layers, sealing, commit/merge
compaction, read-only layers and the merged stack view, byte-compatible with upstream
overlaybd (see shared/spec/format.md §1)."""

from .compact import commit, compact, merge
from .header import (
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    FLAG_SPARSE_RW,
    HT_SPACE,
    NULL_UUID,
    HeaderTrailer,
    normalize_uuid,
    random_uuid,
)
from .mapping import (
    INVALID_OFFSET,
    MAX_LENGTH,
    MAX_OFFSET,
    SECTOR,
    Columns,
    Mapping,
    compress_raw_index,
    merge_columns,
    merge_indexes,
    pack_records,
    unpack_records,
)
from .readonly import MAX_RO_INDEX_SIZE, ReadOnlyLayer, open_ro
from .seal import seal
from .stack import MAX_STACK_LAYERS, Stack
from .warp import WarpLayer, WarpWritableLayer, commit_warp, create_warp_rw, open_warp_ro, open_warp_rw
from .writable import MAX_IO_SIZE, WritableLayer, create_rw, open_rw

__all__ = [
    "FLAG_DATA",
    "FLAG_HEADER",
    "FLAG_SEALED",
    "FLAG_SPARSE_RW",
    "HT_SPACE",
    "INVALID_OFFSET",
    "MAX_IO_SIZE",
    "MAX_LENGTH",
    "MAX_OFFSET",
    "MAX_RO_INDEX_SIZE",
    "MAX_STACK_LAYERS",
    "NULL_UUID",
    "SECTOR",
    "Columns",
    "HeaderTrailer",
    "Mapping",
    "ReadOnlyLayer",
    "Stack",
    "WarpLayer",
    "WarpWritableLayer",
    "WritableLayer",
    "commit",
    "commit_warp",
    "compact",
    "compress_raw_index",
    "create_rw",
    "create_warp_rw",
    "merge",
    "merge_columns",
    "merge_indexes",
    "open_ro",
    "open_rw",
    "open_warp_ro",
    "open_warp_rw",
    "pack_records",
    "random_uuid",
    "normalize_uuid",
    "seal",
    "unpack_records",
]
