"""Prefetch trace files (spec §8): upstream's recorded trace read, verified and rewritten byte for byte."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from overlaybd.format.errors import BadChecksum, BadMagic, FormatError, Truncated
from overlaybd.format.fileio import LocalFile
from overlaybd.format.opener import unwrap
from overlaybd.format.trace import (
    TRACE_MAGIC,
    TraceRecord,
    encode_trace,
    is_trace,
    read_trace,
    trace_checksum,
    write_trace,
)

TRACE = "trace/trace.bin"
# layer_index -> the layer file the trace was recorded against (trace.config.v1.json lowers)
TRACE_LAYERS = {0: "zfile/L0.commit.z_lz4", 1: "commit/L1.commit"}


def test_read_upstream_trace(vectors: Path) -> None:
    recs = read_trace(vectors / TRACE)
    assert len(recs) == 54
    assert {r.op for r in recs} == {"R"}
    assert {r.layer_index for r in recs} <= {0, 1}
    assert all(r.count > 0 and r.offset >= 0 for r in recs)
    assert len(recs.header_padding) == 8
    assert any(r.pad != bytes(3) for r in recs), "upstream padding is uninitialised (garbage) in this vector"


def test_trace_extents_lie_inside_their_layers(vectors: Path) -> None:
    recs = read_trace(vectors / TRACE)
    sizes = {}
    for idx, name in TRACE_LAYERS.items():
        with unwrap(LocalFile(vectors / name)) as f:
            sizes[idx] = f.size()
    for r in recs:
        assert r.offset + r.count <= sizes[r.layer_index]


def test_rewrite_byte_identical(vectors: Path, tmp_path: Path) -> None:
    original = (vectors / TRACE).read_bytes()
    recs = read_trace(vectors / TRACE)
    assert encode_trace(recs) == original
    write_trace(tmp_path / "t.bin", recs)
    assert (tmp_path / "t.bin").read_bytes() == original
    buf = io.BytesIO()
    write_trace(buf, recs)
    assert buf.getvalue() == original


def test_new_records_round_trip(tmp_path: Path) -> None:
    recs = [TraceRecord("R", 0, 4096, 0), TraceRecord("W", 3, 1 << 20, 123 * 512), TraceRecord("R", 1, 512, -1)]
    write_trace(tmp_path / "n.bin", recs)
    data = (tmp_path / "n.bin").read_bytes()
    assert len(data) == 24 * 4 and is_trace(data)
    assert struct.unpack_from("<IxxxxQ", data) == (TRACE_MAGIC, 72)
    back = read_trace(tmp_path / "n.bin")
    assert list(back) == recs and back.header_padding == bytes(8)


def test_empty_trace(tmp_path: Path) -> None:
    write_trace(tmp_path / "e.bin", [])
    assert len((tmp_path / "e.bin").read_bytes()) == 24
    assert read_trace(tmp_path / "e.bin") == []


def _bad(tmp_path: Path, data: bytes, exc: type[FormatError], field: str) -> None:
    p = tmp_path / "bad.bin"
    p.write_bytes(data)
    with pytest.raises(exc) as e:
        read_trace(p)
    assert e.value.path == str(p) and e.value.field == field


def test_wrong_magic(vectors: Path, tmp_path: Path) -> None:
    data = bytearray((vectors / TRACE).read_bytes())
    data[0] ^= 1
    _bad(tmp_path, bytes(data), BadMagic, "trace magic")
    assert not is_trace(bytes(data))
    _bad(tmp_path, b"/usr/bin/\n/etc/*\n" * 3, BadMagic, "trace magic")  # a priority list is not a trace


def test_size_mismatch(vectors: Path, tmp_path: Path) -> None:
    data = (vectors / TRACE).read_bytes()
    _bad(tmp_path, data[:-24], Truncated, "trace data_size")
    _bad(tmp_path, data + bytes(24), Truncated, "trace data_size")
    _bad(tmp_path, data[:10], Truncated, "trace header")


def test_partial_record(tmp_path: Path) -> None:
    data = bytearray(encode_trace([TraceRecord("R", 0, 1, 0)]) + b"abc")
    struct.pack_into("<Q", data, 8, 27)
    _bad(tmp_path, bytes(data), FormatError, "trace data_size")


def test_checksum_covers_padding(vectors: Path, tmp_path: Path) -> None:
    data = bytearray((vectors / TRACE).read_bytes())
    data[24 + 1] ^= 0xFF  # a padding byte of record 0
    _bad(tmp_path, bytes(data), BadChecksum, "trace checksum")


def test_bad_op(tmp_path: Path) -> None:
    data = bytearray(encode_trace([TraceRecord("R", 0, 1, 0), TraceRecord("R", 0, 1, 0)]))
    data[48] = ord("X")
    struct.pack_into("<I", data, 16, trace_checksum(bytes(data[24:])))  # valid checksum: reach the op check
    _bad(tmp_path, bytes(data), FormatError, "trace record 1 op")
