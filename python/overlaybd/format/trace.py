"""Prefetch trace files (spec §8): which layer extents a container read at startup.

Layout: a 24-byte header (u32 magic 0xC2EF1820, 4 pad, u64 data_size, u32
checksum, 4 pad) followed by 24-byte records (char op 'R'/'W', 3 pad, u32
layer_index, u64 count, i64 offset). `checksum` is the raw CRC-32C chained over
every record's 24 bytes, padding included.

Upstream never initialises the padding, so its files carry garbage there that the
checksum covers. To rewrite an upstream file byte-for-byte (and keep its checksum)
each record keeps its raw 3 padding bytes and the list returned by read_trace keeps
the header's 8 padding bytes; records we create get zero padding.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from .atomic import AtomicOutput
from .crc32c import crc32c_raw
from .errors import BadChecksum, BadMagic, FormatError, Truncated

TRACE_MAGIC = 0xC2EF1820
HEADER = struct.Struct("<I4sQI4s")
RECORD = struct.Struct("<c3sIQq")
assert HEADER.size == 24 and RECORD.size == 24
OPS = (b"R", b"W")
#: refuse to load absurd trace files (10 M records); real traces are a few thousand records
MAX_TRACE_SIZE = 240 * 1024 * 1024


@dataclass(frozen=True)
class TraceRecord:
    """One traced I/O: `count` bytes at `offset` of layer `layer_index` (0 = bottom lower)."""

    op: str
    layer_index: int
    count: int
    offset: int
    pad: bytes = b"\x00\x00\x00"

    def pack(self) -> bytes:
        return RECORD.pack(self.op.encode("ascii"), self.pad, self.layer_index, self.count, self.offset)


class TraceRecords(list[TraceRecord]):
    """The records of a trace file plus the header's padding bytes (8), kept for byte-exact rewrites."""

    header_padding: bytes = bytes(8)


def is_trace(data: bytes) -> bool:
    """True if `data` (the file's first bytes) starts with the trace magic.

    Upstream treats a non-empty file without the magic as a priority list of paths instead.
    """
    return len(data) >= 4 and struct.unpack_from("<I", data)[0] == TRACE_MAGIC


def trace_checksum(records_bytes: bytes | memoryview) -> int:
    return crc32c_raw(records_bytes, 0)


def parse_trace(data: bytes, path: str = "<trace>") -> TraceRecords:
    """Decode a whole trace file's bytes, checking magic, size and checksum."""
    if len(data) < HEADER.size:
        raise Truncated(path, "trace header", f"file is {len(data)} bytes, the header needs {HEADER.size}")
    magic, pad1, data_size, checksum, pad2 = HEADER.unpack_from(data, 0)
    if magic != TRACE_MAGIC:
        raise BadMagic(path, "trace magic", f"expected 0x{TRACE_MAGIC:08X}, found 0x{magic:08X}")
    body = memoryview(data)[HEADER.size :]
    if data_size != len(body):
        raise Truncated(path, "trace data_size", f"header says {data_size} bytes of records, file has {len(body)}")
    if data_size % RECORD.size:
        raise FormatError(path, "trace data_size", f"{data_size} is not a multiple of {RECORD.size}")
    computed = trace_checksum(body)
    if computed != checksum:
        raise BadChecksum(path, "trace checksum", f"stored 0x{checksum:08x}, computed 0x{computed:08x}")
    out = TraceRecords()
    out.header_padding = pad1 + pad2
    for i, (op, pad, layer, count, offset) in enumerate(RECORD.iter_unpack(body)):
        if op not in OPS:
            raise FormatError(path, f"trace record {i} op", f"expected 'R' or 'W', found {op!r}")
        out.append(TraceRecord(op.decode("ascii"), layer, count, offset, pad))
    return out


def read_trace(path: str | os.PathLike[str]) -> TraceRecords:
    """Read and verify a trace file."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_TRACE_SIZE:
                raise FormatError(name, "trace size", f"{size} bytes exceeds the limit {MAX_TRACE_SIZE}")
            data = f.read()
    except OSError as e:
        raise FormatError(name, "file", f"cannot read: {e.strerror}") from e
    return parse_trace(data, name)


def encode_trace(records: list[TraceRecord], header_padding: bytes | None = None) -> bytes:
    """The file bytes for `records` (header padding: given, else the list's own, else zeros)."""
    if header_padding is None:
        header_padding = getattr(records, "header_padding", bytes(8))
    if len(header_padding) != 8:
        raise ValueError("header_padding must be 8 bytes")
    body = b"".join(r.pack() for r in records)
    head = HEADER.pack(TRACE_MAGIC, header_padding[:4], len(body), trace_checksum(body), header_padding[4:])
    return head + body


def write_trace(
    dest: str | os.PathLike[str] | BinaryIO, records: list[TraceRecord], header_padding: bytes | None = None
) -> None:
    """Write a trace file: atomically when `dest` is a path, else to the given binary stream."""
    data = encode_trace(records, header_padding)
    if isinstance(dest, str | os.PathLike):
        with AtomicOutput(dest) as out:
            out.write(data)
    else:
        dest.write(data)
