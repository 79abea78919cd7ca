"""Writable layers, sealing, commit/merge and stacks built in tmp dirs, checked against a
simple byte model of the virtual disk."""

from __future__ import annotations

import io
import os
import random
import subprocess
from pathlib import Path

import pytest
from overlaybd.format import lsmt
from overlaybd.format.errors import FormatError, ReadOnly, Unaligned
from overlaybd.format.fileio import LocalFile

MiB = 1 << 20


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def index_records(index: Path) -> list[lsmt.Mapping]:
    return list(lsmt.unpack_records(index.read_bytes()[4096:]))


def commit_to(path: Path, source, **kw) -> lsmt.ReadOnlyLayer:
    with open(path, "wb") as f:
        lsmt.commit(source, f, **kw)
    return lsmt.open_ro(LocalFile(path))


class Model:
    """The expected virtual disk: a bytearray plus which sectors a layer covers."""

    def __init__(self, vsize: int) -> None:
        self.disk = bytearray(vsize)

    def write(self, data: bytes, off: int) -> None:
        self.disk[off : off + len(data)] = data

    def zero(self, off: int, n: int) -> None:
        self.disk[off : off + n] = bytes(n)


def test_create_headers_and_exclusive(tmp_path: Path) -> None:
    d, i = tmp_path / "d", tmp_path / "i"
    layer = lsmt.create_rw(d, i, 8 * MiB, user_tag=b"hello")
    assert len(layer.uuid) == 36 and layer.uuid == layer.uuid.upper() and layer.uuid[14] == "4"
    assert layer.parent_uuid == lsmt.NULL_UUID
    layer.close()
    dh = lsmt.HeaderTrailer.unpack(d.read_bytes(), str(d))
    ih = lsmt.HeaderTrailer.unpack(i.read_bytes(), str(i))
    assert (dh.flags, dh.index_offset, dh.virtual_size, dh.user_tag) == (0x03, 0, 8 * MiB, b"hello")
    assert (ih.flags, ih.index_offset, ih.virtual_size) == (0x01, 4096, 8 * MiB)
    assert d.stat().st_size == 4096 and i.stat().st_size == 4096
    with pytest.raises(FileExistsError):
        lsmt.create_rw(d, tmp_path / "other", 8 * MiB)
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError):
        lsmt.create_rw(tmp_path / "x", tmp_path / "y", 1000)
    with pytest.raises(ValueError):
        lsmt.create_rw(tmp_path / "x", tmp_path / "y", 4096, uuid="not-a-uuid")
    assert not (tmp_path / "x").exists()


def test_append_layer_ops_reopen_and_commit(tmp_path: Path) -> None:
    vsize = 16 * MiB
    d, i = tmp_path / "d", tmp_path / "i"
    model = Model(vsize)
    layer = lsmt.create_rw(d, i, vsize, uuid="0f5e3a10-0000-4000-8000-0000000000aa")
    ops = 0
    big = pattern(9 * MiB, 1)
    layer.pwrite(big, 1 * MiB)  # split into 4 MiB pieces: 3 records
    model.write(big, 1 * MiB)
    ops += 3
    rng = random.Random(7)
    for k in range(60):
        off = rng.randrange(0, vsize // 512 - 64) * 512
        if k % 4 == 3:
            n = rng.randrange(1, 64) * 512
            layer.discard(off, n)
            model.zero(off, n)
        else:
            data = pattern(rng.randrange(1, 64) * 512, 100 + k)
            layer.pwrite(memoryview(data), off)
            model.write(data, off)
        ops += 1
    layer.discard(0, 10 * MiB)  # 20480 sectors: split into 16383 + 4097
    model.zero(0, 10 * MiB)
    ops += 2
    after = pattern(8192, 3)
    layer.pwrite(after, 5 * MiB)
    model.write(after, 5 * MiB)
    ops += 1
    assert layer.pread(vsize, 0) == bytes(model.disk)
    before = layer.mappings()
    layer.fsync()
    layer.close()

    recs = index_records(i)
    assert len(recs) == ops  # one record per operation piece, in op order
    assert [(m.length, m.zeroed) for m in recs[:3]] == [(8192, False), (8192, False), (2048, False)]
    assert [(m.offset, m.length, m.zeroed) for m in recs[-3:-1]] == [(0, 16383, True), (16383, 4097, True)]
    assert i.stat().st_size == 4096 + 16 * ops

    layer = lsmt.open_rw(d, i)
    assert layer.mappings() == before  # replaying the records gives the same index
    assert layer.pread(vsize, 0) == bytes(model.disk)
    c = commit_to(tmp_path / "c", layer, uuid="0f5e3a10-0000-4000-8000-0000000000cc", user_tag=b"m")
    assert c.pread(vsize, 0) == bytes(model.disk)
    assert c.uuid == "0F5E3A10-0000-4000-8000-0000000000CC" and c.trailer.user_tag == b"m"
    assert c.header.flags == 0x07 and c.trailer.flags == 0x06
    assert c.trailer.index_offset % 512 == 0 and c.trailer.index_size % 256 == 0
    c.close()
    layer.close()

    lsmt.seal(d, i)
    with lsmt.open_ro(LocalFile(d)) as s:
        assert s.mappings == before
        assert s.trailer.index_size == len(before)
        assert s.uuid == "0F5E3A10-0000-4000-8000-0000000000AA"
        assert s.pread(vsize, 0) == bytes(model.disk)


def test_last_write_wins_and_remainders(tmp_path: Path) -> None:
    layer = lsmt.create_rw(tmp_path / "d", tmp_path / "i", MiB)
    layer.pwrite(pattern(64 * 512, 1), 0)  # [0,64) at moffset 8
    layer.pwrite(pattern(8 * 512, 2), 16 * 512)  # cuts the middle
    layer.discard(40 * 512, 8 * 512)
    want = [
        lsmt.Mapping(0, 16, 8),
        lsmt.Mapping(16, 8, 72),
        lsmt.Mapping(24, 16, 8 + 24),
        lsmt.Mapping(40, 8, 80, True),
        lsmt.Mapping(48, 16, 8 + 48),
    ]
    assert layer.mappings() == want
    layer.close()
    with lsmt.open_rw(tmp_path / "d", tmp_path / "i", readonly=True) as again:
        assert again.mappings() == want
        with pytest.raises(ReadOnly):
            again.pwrite(bytes(512), 0)
        with pytest.raises(ReadOnly):
            again.discard(0, 512)


def test_commit_index_padding_and_run_cap(tmp_path: Path) -> None:
    # 256 separate sectors -> exactly 256 records -> no padding
    layer = lsmt.create_rw(tmp_path / "d", tmp_path / "i", 4 * MiB)
    for k in range(256):
        layer.pwrite(pattern(512, k), k * 2 * 512)
    c = commit_to(tmp_path / "c", layer)
    assert c.trailer.index_size == 256 and len(c.mappings) == 256
    assert os.path.getsize(tmp_path / "c") == 4096 + 256 * 512 + 256 * 16 + 4096
    c.close()
    layer.close()
    # an empty layer: no records, no padding
    parent = "0f5e3a10-0000-4000-8000-0000000000a0"
    empty = lsmt.create_rw(tmp_path / "d0", tmp_path / "i0", 4 * MiB, parent_uuid=parent)
    e = commit_to(tmp_path / "c0", empty)
    assert e.trailer.index_size == 0 and e.trailer.index_offset == 4096 and os.path.getsize(tmp_path / "c0") == 8192
    assert e.uuid == lsmt.NULL_UUID and e.parent_uuid == "0F5E3A10-0000-4000-8000-0000000000A0"  # inherited
    e.close()
    empty.close()
    # a 16 MiB contiguous write becomes runs of 16320 sectors (sum must stay < 16383)
    big = lsmt.create_rw(tmp_path / "d2", tmp_path / "i2", 32 * MiB)
    data = pattern(16 * MiB, 9)
    big.pwrite(data, 0)
    b = commit_to(tmp_path / "c2", big)
    assert [m.length for m in b.mappings] == [16320, 16320, 128]
    assert b.trailer.index_size == 256
    assert b.pread(16 * MiB, 0) == data
    b.close()
    big.close()


def test_sparse_layer(tmp_path: Path) -> None:
    vsize = 64 * MiB
    d, i = tmp_path / "d", tmp_path / "i"
    layer = lsmt.create_rw(d, i, vsize, sparse=True)
    assert d.stat().st_size == vsize + 4096 and d.stat().st_blocks * 512 < MiB  # never materialised
    assert i.stat().st_size == 0
    assert lsmt.HeaderTrailer.unpack(d.read_bytes()[:4096], str(d)).flags == 0x13
    model = Model(vsize)
    a = pattern(3 * MiB, 1)
    layer.pwrite(a, 8 * MiB)
    model.write(a, 8 * MiB)
    tail = pattern(512, 2)
    layer.pwrite(tail, 20 * MiB + 512)
    model.write(tail, 20 * MiB + 512)
    assert os.pread(layer.data.fd, 512, 4096 + 20 * MiB + 512) == tail  # identity mapping at 4096+offset
    layer.discard(9 * MiB, MiB)
    model.zero(9 * MiB, MiB)
    assert layer.pread(vsize, 0) == bytes(model.disk)
    layer.close()
    assert i.stat().st_size == 0
    layer = lsmt.open_rw(d, i)
    maps = layer.mappings()
    # extents from SEEK_DATA: [8M,9M) and [10M,11M) and the 4K FS block holding the 512-byte write
    assert [(m.offset * 512, m.length * 512) for m in maps] == [(8 * MiB, MiB), (10 * MiB, MiB), (20 * MiB, 4096)]
    assert all(m.moffset == m.offset + 8 and not m.zeroed for m in maps)
    assert layer.pread(vsize, 0) == bytes(model.disk)
    layer.close()


def test_sparse_extent_split_at_max_length(tmp_path: Path) -> None:
    layer = lsmt.create_rw(tmp_path / "d", tmp_path / "i", 32 * MiB, sparse=True)
    layer.pwrite(pattern(10 * MiB, 4), 0)
    layer.close()
    with lsmt.open_rw(tmp_path / "d", tmp_path / "i") as layer:
        assert [m.length for m in layer.mappings()] == [16383, 20480 - 16383]


def test_vsize_from_index_header_and_write_growth(tmp_path: Path) -> None:
    d, i = tmp_path / "d", tmp_path / "i"
    lsmt.create_rw(d, i, 4 * MiB).close()
    hdr = lsmt.HeaderTrailer.unpack(d.read_bytes(), str(d))
    hdr.virtual_size = 123 * 512
    with open(d, "r+b") as f:
        f.write(hdr.pack())
    with lsmt.open_rw(d, i) as layer:
        assert layer.vsize == 4 * MiB  # the index header wins for append layers
        layer.pwrite(bytes(512), 5 * MiB)
        assert layer.vsize == 5 * MiB + 512  # grows in memory like upstream
    with lsmt.open_rw(d, i) as layer:
        assert layer.vsize == 4 * MiB


def test_stack_with_upper(tmp_path: Path, vectors: Path) -> None:
    l0 = lsmt.open_ro(LocalFile(vectors / "commit/L0.commit"))
    d, i = tmp_path / "d", tmp_path / "i"
    upper = lsmt.create_rw(d, i, 0, parent_uuid=l0.uuid)
    stack = lsmt.Stack([l0], upper, check_order=True)
    assert stack.vsize == 64 * MiB and not stack.read_only  # vsize 0 upper takes the lowers'
    base = l0.pread(64 * MiB, 0)
    model = bytearray(base)
    w = pattern(8192, 5)
    stack.pwrite(w, 4096)
    model[4096 : 4096 + 8192] = w
    stack.discard(8 * MiB, 64 * 1024)  # append discard masks the lower's data
    model[8 * MiB : 8 * MiB + 65536] = bytes(65536)
    assert stack.pread(64 * MiB, 0) == bytes(model)
    assert stack.mappings()[0].tag == 1 and any(m.tag == 0 for m in stack.mappings())
    stack.fsync()
    stack.close()
    recs = index_records(i)
    assert {m.tag for m in recs} == {1}  # records written while stacked carry tag = #lowers
    with lsmt.open_rw(d, i) as again:
        assert again.vsize == 64 * MiB  # headers were rewritten
        assert all(m.tag == 0 for m in again.mappings())


def test_sparse_upper_discard_falls_through_after_reopen(tmp_path: Path, vectors: Path) -> None:
    d, i = tmp_path / "d", tmp_path / "i"
    lsmt.create_rw(d, i, 64 * MiB, sparse=True).close()
    l0 = lsmt.open_ro(LocalFile(vectors / "commit/L0.commit"))
    base = l0.pread(MiB, 8 * MiB)
    assert base != bytes(MiB)
    with lsmt.Stack([l0], lsmt.open_rw(d, i)) as stack:
        stack.discard(8 * MiB, MiB)
        assert stack.pread(MiB, 8 * MiB) == bytes(MiB)  # in-session zeroed mapping masks
    l0 = lsmt.open_ro(LocalFile(vectors / "commit/L0.commit"))
    with lsmt.Stack([l0], lsmt.open_rw(d, i)) as stack:
        assert stack.pread(MiB, 8 * MiB) == base  # after reopen the hole falls through


def test_merge_three_layers(tmp_path: Path) -> None:
    vsize = 8 * MiB
    layers = []
    parent = None
    rng = random.Random(3)
    for n in range(3):
        rw = lsmt.create_rw(tmp_path / f"d{n}", tmp_path / f"i{n}", vsize, parent_uuid=parent)
        for k in range(30):
            off = rng.randrange(0, vsize // 512 - 128) * 512
            if k % 5 == 4:
                rw.discard(off, 64 * 512)
            else:
                rw.pwrite(pattern(rng.randrange(1, 128) * 512, n * 100 + k), off)
        layers.append(commit_to(tmp_path / f"c{n}", rw, uuid=rw.uuid))
        parent = rw.uuid
        rw.close()
    stack = lsmt.Stack(layers, check_order=True)
    expect = stack.pread(vsize, 0)
    out = tmp_path / "merged"
    with open(out, "wb") as f:
        lsmt.merge(layers, f)
    with lsmt.open_ro(LocalFile(out)) as m:
        assert m.pread(vsize, 0) == expect
        assert m.parent_uuid == layers[0].parent_uuid == lsmt.NULL_UUID and m.uuid == lsmt.NULL_UUID
    raw = out.read_bytes()
    t = lsmt.HeaderTrailer.unpack(raw[-4096:], str(out), "trailer")
    tags = {r.tag for r in lsmt.unpack_records(raw[t.index_offset : -4096]) if r.offset != lsmt.INVALID_OFFSET}
    assert tags <= {0, 1, 2} and len(tags) > 1
    stack.close()


def test_stack_errors(tmp_path: Path, vectors: Path) -> None:
    l0 = lsmt.open_ro(LocalFile(vectors / "commit/L0.commit"))
    l1 = lsmt.open_ro(LocalFile(vectors / "commit/L1.commit"))
    with pytest.raises(FormatError) as e:
        lsmt.Stack([l1, l0], check_order=True)
    assert e.value.field == "parent_uuid" and "L0.commit" in str(e.value)
    s = lsmt.Stack([l1, l0])  # without the check the order is the caller's business
    with pytest.raises(ReadOnly):
        s.pwrite(bytes(512), 0)
    with pytest.raises(ReadOnly):
        s.discard(0, 512)
    with pytest.raises(Unaligned) as ue:
        s.pread(4096, 100)
    assert ue.value.field == "offset" and ue.value.path == s.name
    with pytest.raises(Unaligned):
        s.pread(100, 0)
    assert s.pread(8192, 64 * MiB - 4096) == s.pread(4096, 64 * MiB - 4096)  # short at vsize
    assert s.pread(4096, 64 * MiB) == b""
    with pytest.raises(FormatError):
        lsmt.Stack([l0] * 256)
    with pytest.raises(ValueError):
        lsmt.Stack([])
    s.close()


def test_unaligned_io_on_layers(tmp_path: Path, vectors: Path) -> None:
    with lsmt.open_ro(LocalFile(vectors / "commit/L0.commit")) as ro:
        with pytest.raises(Unaligned) as e:
            ro.pread(512, 1)
        assert e.value.path.endswith("L0.commit")
        with pytest.raises(Unaligned):
            ro.pread(511, 0)
    with lsmt.create_rw(tmp_path / "d", tmp_path / "i", MiB) as rw:
        for call in (
            lambda: rw.pwrite(bytes(100), 0),
            lambda: rw.pwrite(bytes(512), 3),
            lambda: rw.discard(0, 100),
            lambda: rw.pread(512, 256),
        ):
            with pytest.raises(Unaligned) as e:
                call()
            assert e.value.path == str(tmp_path / "d")
    assert (tmp_path / "i").stat().st_size == 4096  # nothing recorded


def test_sparse_copy_of_vector_commit(tmp_path: Path, vectors: Path) -> None:
    """A sparse copy (cp --sparse=always) of the upstream sparse layer still commits identically."""
    d, i = tmp_path / "S0.data", tmp_path / "S0.index"
    subprocess.run(["cp", "--sparse=always", str(vectors / "rw/S0.data"), str(d)], check=True)
    i.touch()
    assert d.stat().st_blocks * 512 < 4 * MiB
    with lsmt.open_rw(d, i, readonly=True) as layer:
        out = io.BytesIO()
        lsmt.commit(layer, out, uuid="0f5e3a10-0000-4000-8000-0000000000d0")
    assert out.getvalue() == (vectors / "commit/S0.commit").read_bytes()


def test_mapping_pack_roundtrip() -> None:
    m = lsmt.Mapping(lsmt.MAX_OFFSET - 5, lsmt.MAX_LENGTH, (1 << 55) - 1, True, 255)
    assert lsmt.Mapping.unpack(m.pack()) == m
    assert lsmt.Mapping(lsmt.INVALID_OFFSET, 0, 0).pack() == bytes.fromhex("FFFFFFFFFFFF0300") + bytes(8)
    with pytest.raises(ValueError):
        lsmt.Mapping(0, lsmt.MAX_LENGTH + 1, 0).pack()


def test_compress_raw_index_rule() -> None:
    steps = [lsmt.Mapping(k * 64, 64, 8 + k * 64) for k in range(300)]
    assert [m.length for m in lsmt.compress_raw_index(steps)] == [16320, 64 * 45]
    # different zeroed flag, tag or a gap prevent merging
    a = lsmt.Mapping(0, 8, 8)
    assert len(lsmt.compress_raw_index([a, lsmt.Mapping(8, 8, 16, tag=1)])) == 2
    assert len(lsmt.compress_raw_index([a, lsmt.Mapping(8, 8, 16, True)])) == 2
    assert len(lsmt.compress_raw_index([a, lsmt.Mapping(8, 8, 17)])) == 2
    assert lsmt.compress_raw_index([lsmt.Mapping(0, 8, 8, True), lsmt.Mapping(8, 8, 8, True)]) == [
        lsmt.Mapping(0, 16, 8, True)
    ]


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    """Threads writing disjoint regions while others read: every record lands, nothing tears."""
    import threading

    vsize = 8 * MiB
    layer = lsmt.create_rw(tmp_path / "d", tmp_path / "i", vsize)
    chunks = {t: pattern(64 * 1024, 50 + t) for t in range(4)}
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for k in range(16):
                layer.pwrite(chunks[t], (t * 16 + k) * 64 * 1024)
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        try:
            for k in range(200):
                layer.pread(64 * 1024, (k % 64) * 64 * 1024)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)] + [threading.Thread(target=reader)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    want = b"".join(chunks[t] * 16 for t in range(4))
    assert layer.pread(4 * MiB, 0) == want
    layer.close()
    assert (tmp_path / "i").stat().st_size == 4096 + 16 * 64
    with lsmt.open_rw(tmp_path / "d", tmp_path / "i") as again:
        assert again.pread(4 * MiB, 0) == want
