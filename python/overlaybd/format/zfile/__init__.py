"""ZFile: overlaybd's block-compressed container (spec §2).

A ZFile is a header, independently compressed fixed-size blocks (LZ4 or zstd,
optional CRC each), a jump table of stored block lengths and a trailer. Readers
see the original bytes through the RandomAccessFile protocol.
"""

from .codec import DecodeError
from .header import ZFileHeader
from .reader import ZFileReader, decompress, is_zfile, open_zfile, verify_blocks
from .writer import ZFileBuilder, compress

__all__ = [
    "DecodeError",
    "ZFileBuilder",
    "ZFileHeader",
    "ZFileReader",
    "compress",
    "decompress",
    "is_zfile",
    "open_zfile",
    "verify_blocks",
]
