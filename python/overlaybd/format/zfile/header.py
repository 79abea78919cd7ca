"""The 512-byte ZFile header/trailer block (spec §2.2).

One struct serves three roles, told apart by `flags`: the initial header (0x13),
the trailer at end of file (0x16), and a header rewritten with the full trailer
information once the file is complete (0x1B, "header overwrite"). The struct is
96 bytes of a zero-filled 512-byte block; `digest` is the raw CRC-32C of the whole
block with the digest field zeroed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from ..crc32c import crc32c_raw
from ..errors import BadChecksum, BadMagic, FormatError

HT_SIZE = 512
STRUCT_SIZE = 96
MAGIC0 = b"ZFile\x00\x01\x00"
MAGIC1 = b"tuji.yyf@Alibaba"

FLAG_HEADER = 1 << 0  # set: header; clear: trailer
FLAG_TYPE_DATA = 1 << 1
FLAG_SEALED = 1 << 2
FLAG_HEADER_OVERWRITE = 1 << 3  # header carries the index fields (no trailer read needed)
FLAG_DIGEST = 1 << 4  # digest and index_crc are valid
FLAG_INDEX_COMPRESSED = 1 << 5  # defined upstream, never written, unsupported

FLAGS_HEADER = FLAG_HEADER | FLAG_TYPE_DATA | FLAG_DIGEST  # 0x13
FLAGS_TRAILER = FLAG_TYPE_DATA | FLAG_SEALED | FLAG_DIGEST  # 0x16
FLAGS_HEADER_OVERWRITE = FLAG_HEADER | FLAG_TYPE_DATA | FLAG_HEADER_OVERWRITE | FLAG_DIGEST  # 0x1B

ALGO_LZ4 = 1
ALGO_ZSTD = 2
ALGORITHMS = {"lz4": ALGO_LZ4, "zstd": ALGO_ZSTD}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}

# magic0 magic1 size digest flags index_offset index_size original_file_size index_crc reserved_0
# block_size algo level use_dict pad reserved dict_size verify
_FMT = struct.Struct("<8s16sIIQQQQII IBBBxII B7x".replace(" ", ""))
assert _FMT.size == STRUCT_SIZE
_DIGEST_OFFSET = 28


@dataclass(frozen=True)
class ZFileHeader:
    """Decoded header/trailer fields (the magic is implied; reserved fields are zero on write)."""

    flags: int
    index_offset: int = 0
    index_size: int = 0
    original_file_size: int = 0
    index_crc: int = 0
    block_size: int = 4096
    algo: int = ALGO_LZ4
    level: int = 0
    use_dict: int = 0
    dict_size: int = 0
    verify: int = 1
    digest: int = 0

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def overwritten(self) -> bool:
        return bool(self.flags & FLAG_HEADER_OVERWRITE)

    @property
    def has_digest(self) -> bool:
        return bool(self.flags & FLAG_DIGEST)

    def with_flags(self, flags: int) -> "ZFileHeader":
        return replace(self, flags=flags)

    def pack(self) -> bytes:
        """The 512-byte block with a freshly computed digest."""
        block = bytearray(HT_SIZE)
        _FMT.pack_into(
            block,
            0,
            MAGIC0,
            MAGIC1,
            STRUCT_SIZE,
            0,
            self.flags,
            self.index_offset,
            self.index_size,
            self.original_file_size,
            self.index_crc,
            0,
            self.block_size,
            self.algo,
            self.level,
            self.use_dict,
            0,
            self.dict_size,
            self.verify,
        )
        struct.pack_into("<I", block, _DIGEST_OFFSET, crc32c_raw(block))
        return bytes(block)


def block_digest(block: bytes | bytearray | memoryview) -> int:
    """Raw CRC-32C of a 512-byte block with its digest field taken as zero."""
    b = bytearray(block)
    b[_DIGEST_OFFSET : _DIGEST_OFFSET + 4] = bytes(4)
    return crc32c_raw(b)


def has_magic(block: bytes | bytearray | memoryview) -> bool:
    return len(block) >= 24 and bytes(block[:8]) == MAGIC0 and bytes(block[8:24]) == MAGIC1


def parse(block: bytes | bytearray | memoryview, path: str, what: str, check_digest: bool = True) -> ZFileHeader:
    """Decode and sanity-check one 512-byte block; `what` is "header" or "trailer" (used in errors)."""
    if len(block) != HT_SIZE:
        raise FormatError(path, what, f"need {HT_SIZE} bytes, got {len(block)}")
    if bytes(block[:8]) != MAGIC0:
        raise BadMagic(path, f"{what}.magic0", f"expected {MAGIC0!r}, found {bytes(block[:8])!r}")
    if bytes(block[8:24]) != MAGIC1:
        raise BadMagic(path, f"{what}.magic1", f"expected {MAGIC1!r}, found {bytes(block[8:24])!r}")
    (
        _m0,
        _m1,
        size,
        digest,
        flags,
        index_offset,
        index_size,
        original_size,
        index_crc,
        _r0,
        block_size,
        algo,
        level,
        use_dict,
        _reserved,
        dict_size,
        verify,
    ) = _FMT.unpack_from(block, 0)
    if size != STRUCT_SIZE:
        raise BadMagic(path, f"{what}.size", f"expected {STRUCT_SIZE}, found {size}")
    if check_digest and flags & FLAG_DIGEST:
        want = block_digest(block)
        if digest != want:
            raise BadChecksum(path, f"{what}.digest", f"stored 0x{digest:08x}, computed 0x{want:08x}")
    return ZFileHeader(
        flags=flags,
        index_offset=index_offset,
        index_size=index_size,
        original_file_size=original_size,
        index_crc=index_crc,
        block_size=block_size,
        algo=algo,
        level=level,
        use_dict=use_dict,
        dict_size=dict_size,
        verify=verify,
        digest=digest,
    )
