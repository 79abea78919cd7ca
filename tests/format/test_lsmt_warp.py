"""TurboOCI (warp) layers against the upstream-made vectors turbooci/toci.commit + layer.tar."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
from pathlib import Path

import pytest
from helpers.vectors import logical_sha256
from overlaybd.format import lsmt
from overlaybd.format.atomic import AtomicOutput
from overlaybd.format.errors import BadIndex, BadMagic, FormatError, Truncated, Unaligned
from overlaybd.format.fileio import LocalFile
from overlaybd.format.lsmt.header import HeaderTrailer
from overlaybd.format.lsmt.mapping import RECORD_SIZE, SECTOR, Mapping
from overlaybd.format.opener import unwrap
from overlaybd.format.tarwrap import TarWrapWriter
from overlaybd.format.zfile import compress

TOCI_SHA = "691cb80c6a3450794e6d26442e6033d821ea8eb3443a59064c91c48915cc6c04"
TOCI_FILE_SHA = "a6a876f6a6a8c3708fb7ce6ac4a392311b9ee66ae1d99d5feaa197bebb777203"
GIB = 1 << 30
BLOB_LBA = 5192  # bin/blob (20000 bytes, byte i = (7i+3) & 255) is remote-mapped here
HELLO_LBA = 5240  # etc/hello.txt


@pytest.fixture
def toci(vectors: Path) -> Path:
    return vectors / "turbooci" / "toci.commit"


@pytest.fixture
def tar(vectors: Path) -> Path:
    return vectors / "turbooci" / "layer.tar"


def open_toci(layer: Path, target: Path) -> lsmt.WarpLayer:
    return lsmt.open_warp_ro(unwrap(LocalFile(layer)), LocalFile(target))


def test_vector_reads_both_sources(toci: Path, tar: Path) -> None:
    with open_toci(toci, tar) as layer:
        assert layer.vsize == GIB
        tags = [m.tag for m in layer.tagged_mappings]
        assert len(tags) == 17 and tags.count(0) == 15 and tags.count(1) == 2
        remote = [m for m in layer.tagged_mappings if m.tag == 1]
        assert remote[0] == Mapping(BLOB_LBA, 40, 3, False, 1)
        blob = layer.pread(20480, BLOB_LBA * SECTOR)
        assert blob[:20000] == bytes((7 * i + 3) & 255 for i in range(20000))
        assert layer.pread(512, HELLO_LBA * SECTOR).startswith(b"hello overlaybd\n")
        assert logical_sha256(layer) == TOCI_SHA


def test_vector_in_stack_under_writable_upper(tmp_path: Path, toci: Path, tar: Path) -> None:
    upper = lsmt.create_rw(tmp_path / "u.data", tmp_path / "u.index", 0)
    with lsmt.Stack([open_toci(toci, tar)], upper) as stack:
        assert stack.vsize == GIB  # the upper takes the lowers' vsize
        assert logical_sha256(stack) == TOCI_SHA
        stack.pwrite(b"x" * 512, BLOB_LBA * SECTOR + 512)
        got = stack.pread(2048, BLOB_LBA * SECTOR)
        want = bytes((7 * i + 3) & 255 for i in range(2048))
        assert got == want[:512] + b"x" * 512 + want[1024:]


def test_vector_wrapped_in_zfile_and_tar(tmp_path: Path, toci: Path, tar: Path) -> None:
    zf = tmp_path / "toci.zf"
    with LocalFile(toci) as src, AtomicOutput(zf) as out:
        compress(src, out)
    wrapped = tmp_path / "toci.zf.tar"
    with AtomicOutput(wrapped) as out:
        w = TarWrapWriter(out)
        w.write(zf.read_bytes())
        w.close()
    for path in (zf, wrapped):
        with open_toci(path, tar) as layer:
            assert logical_sha256(layer) == TOCI_SHA


def test_flatten_materialises_remote_data(toci: Path, tar: Path) -> None:
    out = io.BytesIO()
    with open_toci(toci, tar) as layer:
        lsmt.merge([layer], out)
    flat = lsmt.open_ro(_bytes_file(out.getvalue()))
    assert all(m.tag == 0 for m in flat.mappings)
    assert logical_sha256(flat) == TOCI_SHA


def _rebuild(tmp_path: Path, toci: Path, tar: Path, name: str = "w") -> lsmt.WarpWritableLayer:
    """A writable warp layer holding exactly toci.commit's mappings."""
    with open_toci(toci, tar) as src:
        rw = lsmt.create_warp_rw(tmp_path / f"{name}.d", tmp_path / f"{name}.i", src.vsize, target=LocalFile(tar))
        for m in src.tagged_mappings:
            if m.tag == 1:
                rw.add_remote(m.offset * SECTOR, m.length * SECTOR, m.moffset * SECTOR)
            else:
                rw.pwrite(src.pread(m.length * SECTOR, m.offset * SECTOR), m.offset * SECTOR)
    return rw


def test_create_commit_byte_exact(tmp_path: Path, toci: Path, tar: Path) -> None:
    rw = _rebuild(tmp_path, toci, tar)
    data = tmp_path / "w.d"
    assert data.stat().st_size == GIB and data.stat().st_blocks * 512 < 4 << 20  # sparse
    idx = (tmp_path / "w.i").read_bytes()
    hdr = HeaderTrailer.unpack(idx[:4096], "w.i")
    assert (hdr.flags, hdr.index_offset, hdr.virtual_size) == (0x01, 4096, GIB)
    assert len(idx) == 4096 + 17 * RECORD_SIZE
    assert logical_sha256(rw) == TOCI_SHA
    out_path = tmp_path / "toci.commit"
    with AtomicOutput(out_path) as out:
        lsmt.commit_warp(rw, out)
    rw.close()
    assert hashlib.sha256(out_path.read_bytes()).hexdigest() == TOCI_FILE_SHA
    # reopened from its files, the layer commits to the same bytes
    with lsmt.open_warp_rw(tmp_path / "w.d", tmp_path / "w.i", target=LocalFile(tar), readonly=True) as again:
        out = io.BytesIO()
        lsmt.commit_warp(again, out)
        assert out.getvalue() == toci.read_bytes()
        assert logical_sha256(again) == TOCI_SHA


def test_commit_metadata_and_unpadded_index(tmp_path: Path, toci: Path, tar: Path) -> None:
    rw = _rebuild(tmp_path, toci, tar)
    uid, parent = "0f5e3a10-0000-4000-8000-0000000000f0", "0f5e3a10-0000-4000-8000-0000000000f1"
    out = io.BytesIO()
    lsmt.commit_warp(rw, out, uuid=uid, parent_uuid=parent)
    rw.close()
    raw = out.getvalue()
    trailer = HeaderTrailer.unpack(raw[-4096:], "out")
    assert (trailer.flags, trailer.index_size) == (0x06, 17)
    assert (trailer.uuid, trailer.parent_uuid) == (uid.upper(), parent.upper())
    assert trailer.index_offset + 17 * RECORD_SIZE == len(raw) - 4096  # no 4K padding
    assert raw[4096:-4096] == toci.read_bytes()[4096:-4096]


def test_writable_reads_discard_and_reopen(tmp_path: Path, tar: Path) -> None:
    vsize = 8 << 20
    with lsmt.create_warp_rw(tmp_path / "d", tmp_path / "i", vsize, target=LocalFile(tar)) as rw:
        rw.pwrite(b"m" * 8192, 0)
        rw.add_remote(1 << 20, 20480, 1536)
        rw.discard(4096, 512)
        rw.add_remote(16384, 512, 0)
        rw.fsync()
        assert rw.pread(8192, 0) == b"m" * 4096 + bytes(512) + b"m" * 3584
        assert rw.pread(20480, 1 << 20)[:20000] == bytes((7 * i + 3) & 255 for i in range(20000))
        first = rw.pread(vsize, 0)
    with lsmt.open_warp_rw(tmp_path / "d", tmp_path / "i", target=LocalFile(tar), readonly=True) as again:
        assert again.pread(vsize, 0) == first
        kinds = [(m.offset, m.zeroed, m.tag) for m in again.tagged_mappings()]
        assert kinds == [(0, False, 0), (8, True, 0), (9, False, 0), (32, False, 1), (2048, False, 1)]


def test_stacked_writable_tags_are_normalised(tmp_path: Path, toci: Path, tar: Path, vectors: Path) -> None:
    """Stacked on a lower, records carry tags n and n+1 (upstream m_rw_tag); reopen subtracts n."""
    lower = lsmt.open_ro(LocalFile(vectors / "commit" / "L0.commit"))
    rw = lsmt.create_warp_rw(tmp_path / "d", tmp_path / "i", 64 << 20, target=LocalFile(tar))
    with lsmt.Stack([lower], rw) as stack:
        stack.pwrite(b"a" * 4096, 0)
        rw.add_remote(8192, 4096, 1536)
        with pytest.raises(FormatError, match="stacked"):
            lsmt.commit_warp(rw, io.BytesIO())
        assert stack.pread(512, 1 << 20) == lower.pread(512, 1 << 20)  # falls through to L0
    recs = (tmp_path / "i").read_bytes()[4096:]
    assert [r[15] for r in (recs[:16], recs[16:32])] == [1, 2]
    with lsmt.open_warp_rw(tmp_path / "d", tmp_path / "i", target=LocalFile(tar), readonly=True) as again:
        assert [m.tag for m in again.tagged_mappings()] == [0, 1]
        assert again.pread(4096, 8192)[:16] == bytes((7 * i + 3) & 255 for i in range(16))


# -- bad input -------------------------------------------------------------------------------


def _bytes_file(data: bytes, name: str = "<mem>"):
    class Mem:
        def __init__(self) -> None:
            self.name = name

        def size(self) -> int:
            return len(data)

        def pread_into(self, buf: memoryview, offset: int) -> int:
            chunk = data[offset : offset + len(buf)]
            buf[: len(chunk)] = chunk
            return len(chunk)

        def pread(self, size: int, offset: int) -> bytes:
            return data[offset : offset + size]

        def close(self) -> None:
            pass

    return Mem()


def _patched(toci: Path, record: int, mapping: Mapping) -> bytes:
    raw = bytearray(toci.read_bytes())
    trailer = HeaderTrailer.unpack(raw[-4096:], "t")
    pos = trailer.index_offset + record * RECORD_SIZE
    raw[pos : pos + RECORD_SIZE] = mapping.pack()
    return bytes(raw)


def test_remote_range_beyond_target(toci: Path, tar: Path) -> None:
    short = _bytes_file(tar.read_bytes()[: 20 * SECTOR], "short.tar")
    with pytest.raises(BadIndex) as e:
        lsmt.open_warp_ro(LocalFile(toci), short)
    assert e.value.field == "index[3].moffset" and "short.tar" in e.value.message


def test_fsmeta_range_beyond_index(toci: Path, tar: Path) -> None:
    bad = _patched(toci, 0, Mapping(2, 2, 5000, False, 0))
    with pytest.raises(BadIndex) as e:
        lsmt.open_warp_ro(_bytes_file(bad, "bad.commit"), LocalFile(tar))
    assert (e.value.path, e.value.field) == ("bad.commit", "index[0].moffset")


def test_unknown_tag(toci: Path, tar: Path) -> None:
    bad = _patched(toci, 0, Mapping(2, 2, 8, False, 2))
    with pytest.raises(BadIndex) as e:
        lsmt.open_warp_ro(_bytes_file(bad), LocalFile(tar))
    assert e.value.field == "index[0].tag"


def test_overlapping_mappings(toci: Path, tar: Path) -> None:
    bad = _patched(toci, 1, Mapping(3, 1048, 10, False, 0))
    with pytest.raises(BadIndex) as e:
        lsmt.open_warp_ro(_bytes_file(bad), LocalFile(tar))
    assert e.value.field == "index[1].offset"


def test_index_size_beyond_file(toci: Path, tar: Path) -> None:
    raw = bytearray(toci.read_bytes())
    struct.pack_into("<Q", raw, len(raw) - 4096 + 40, 10_000)
    with pytest.raises(Truncated) as e:
        lsmt.open_warp_ro(_bytes_file(bytes(raw)), LocalFile(tar))
    assert e.value.field == "trailer.index_size"


def test_not_committed(vectors: Path, tar: Path) -> None:
    with pytest.raises(BadMagic):
        lsmt.open_warp_ro(LocalFile(vectors / "rw" / "L0.index"), LocalFile(tar))
    with pytest.raises(BadMagic) as e:
        lsmt.open_warp_ro(LocalFile(vectors / "rw" / "L0.data"), LocalFile(tar))
    assert e.value.field.startswith("trailer")


def test_writable_bad_calls(tmp_path: Path) -> None:
    with lsmt.create_warp_rw(tmp_path / "d", tmp_path / "i", 1 << 20) as rw:
        with pytest.raises(Unaligned):
            rw.add_remote(0, 512, 100)
        with pytest.raises(Unaligned):
            rw.pwrite(b"x" * 100, 0)
        with pytest.raises(FormatError, match="beyond vsize"):
            rw.pwrite(b"x" * 512, 1 << 20)
        rw.add_remote(0, 512, 0)
        with pytest.raises(FormatError) as e:
            rw.pread(512, 0)
        assert e.value.field == "target"
    with pytest.raises(FileExistsError):
        lsmt.create_warp_rw(tmp_path / "d", tmp_path / "other", 1 << 20)
    assert not (tmp_path / "other").exists()


def test_writable_bad_index_header(tmp_path: Path, vectors: Path) -> None:
    shutil.copy(vectors / "rw" / "L0.data", tmp_path / "i")  # a data header (0x03), not an index header
    (tmp_path / "i").chmod(0o644)  # the vectors are read-only; opened for writing, as root or not
    (tmp_path / "d").write_bytes(bytes(4096))
    with pytest.raises(BadMagic) as e:
        lsmt.open_warp_rw(tmp_path / "d", tmp_path / "i")
    assert (e.value.path, e.value.field) == (os.fspath(tmp_path / "i"), "header.flags")


def test_writable_fsmeta_record_beyond_vsize(tmp_path: Path) -> None:
    lsmt.create_warp_rw(tmp_path / "d", tmp_path / "i", 1 << 20).close()
    with open(tmp_path / "i", "ab") as f:
        f.write(Mapping(0, 8, 4096, False, 0).pack())
    with pytest.raises(BadIndex) as e:
        lsmt.open_warp_rw(tmp_path / "d", tmp_path / "i")
    assert e.value.field == "record[0].moffset"
