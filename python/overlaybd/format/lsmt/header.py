"""The LSMT HeaderTrailer block (4096 bytes; 390-byte packed struct, rest zero; format.md §1.1).

The same struct is the header at offset 0 of data/index files and the trailer in the last
4096 bytes of sealed/committed layers; `flags` tells which.
"""

from __future__ import annotations

import re
import struct
import uuid as _uuid
from dataclasses import dataclass

from ..errors import BadMagic, FormatError, Truncated

HT_SPACE = 4096
HT_STRUCT_SIZE = 390
TAG_SIZE = 256
MAGIC0 = b"LSMT\x00\x01\x02\x00"
MAGIC1 = bytes.fromhex("657E63D29444084CA2D2C8EC4FCFAE8A")
LSMT_V1 = 1
LSMT_SUB_V1 = 1

FLAG_HEADER = 0x01  # header (0 = trailer)
FLAG_DATA = 0x02  # data file (0 = index file)
FLAG_SEALED = 0x04
FLAG_SPARSE_RW = 0x10

NULL_UUID = "00000000-0000-0000-0000-000000000000"

# Largest virtual disk: offsets are 50-bit sector numbers (format.md §1.2), so 2^59 bytes. A
# larger claim is damage, and believing it makes a full read of the disk run practically forever.
MAX_VIRTUAL_SIZE = 1 << 59

_STRUCT = struct.Struct("<8s16sIIQQQ37s37sHBB256s")
assert _STRUCT.size == HT_STRUCT_SIZE
_UUID_RE = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")


def normalize_uuid(value: str | None, default: str = NULL_UUID) -> str:
    """Upstream parses uuids case-insensitively (exactly 36 chars) and renders them uppercase."""
    if value is None or value == "":
        return default
    if not _UUID_RE.match(value):
        raise ValueError(f"invalid uuid {value!r} (need 36 chars like {NULL_UUID})")
    return value.upper()


def random_uuid() -> str:
    """A random v4 uuid in upstream's rendering (uppercase)."""
    return str(_uuid.uuid4()).upper()


@dataclass
class HeaderTrailer:
    """Decoded header/trailer; uuids are 36-char strings, sizes as on disk (index_size = #records)."""

    flags: int
    index_offset: int = 0
    index_size: int = 0
    virtual_size: int = 0
    uuid: str = NULL_UUID
    parent_uuid: str = NULL_UUID
    user_tag: bytes = b""
    version: int = LSMT_V1
    sub_version: int = LSMT_SUB_V1

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_data(self) -> bool:
        return bool(self.flags & FLAG_DATA)

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)

    @property
    def is_sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE_RW)

    def pack(self) -> bytes:
        """The full 4096-byte block."""
        if len(self.user_tag) > TAG_SIZE:
            raise ValueError(f"user_tag is {len(self.user_tag)} bytes, at most {TAG_SIZE} fit")
        raw = _STRUCT.pack(
            MAGIC0,
            MAGIC1,
            HT_STRUCT_SIZE,
            self.flags,
            self.index_offset,
            self.index_size,
            self.virtual_size,
            _uuid_field(self.uuid),
            _uuid_field(self.parent_uuid),
            0,
            self.version,
            self.sub_version,
            self.user_tag,
        )
        return raw + bytes(HT_SPACE - HT_STRUCT_SIZE)

    @classmethod
    def unpack(cls, buf: bytes | memoryview, path: str, what: str = "header") -> HeaderTrailer:
        """Decode and check both magics; `what` ("header"/"trailer") names the block in errors."""
        if len(buf) < HT_STRUCT_SIZE:
            raise Truncated(path, what, f"need {HT_STRUCT_SIZE} bytes, got {len(buf)}")
        (m0, m1, _size, flags, ioff, isize, vsize, u, pu, _res, ver, sub, tag) = _STRUCT.unpack_from(buf, 0)
        if m0 != MAGIC0:
            raise BadMagic(path, f"{what}.magic0", f"expected {MAGIC0.hex()}, found {m0.hex()} (not an LSMT layer)")
        if m1 != MAGIC1:
            raise BadMagic(path, f"{what}.magic1", f"expected {MAGIC1.hex()}, found {m1.hex()}")
        if vsize > MAX_VIRTUAL_SIZE:
            msg = f"{vsize} bytes exceeds the LSMT maximum of {MAX_VIRTUAL_SIZE} (2^59)"
            raise FormatError(path, f"{what}.virtual_size", msg)
        return cls(flags, ioff, isize, vsize, _uuid_str(u), _uuid_str(pu), tag.rstrip(b"\0"), ver, sub)


def _uuid_field(value: str) -> bytes:
    raw = normalize_uuid(value).encode("ascii")
    return raw + b"\0"


def _uuid_str(raw: bytes) -> str:
    text = raw.split(b"\0", 1)[0].decode("ascii", errors="replace")
    return text or NULL_UUID
