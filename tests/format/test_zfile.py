"""ZFile reader/writer against upstream-made vectors, plus round trips and bad input."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from overlaybd.format.atomic import AtomicOutput
from overlaybd.format.crc32c import BLOCK_CRC_SEED, crc32c_raw
from overlaybd.format.errors import (
    BadChecksum,
    BadIndex,
    BadMagic,
    FormatError,
    Truncated,
)
from overlaybd.format.fileio import LocalFile
from overlaybd.format.opener import unwrap
from overlaybd.format.zfile import (
    ZFileBuilder,
    ZFileReader,
    compress,
    decompress,
    is_zfile,
    open_zfile,
    verify_blocks,
)
from overlaybd.format.zfile import header as hdr

L0_COMMIT_SHA = "2b91215a37bfa969fa9376e925814dbe29e9778681d69eda56885b500e43285b"

# README "Files and hashes": sha256 of the ZFile bytes themselves
VECTOR_FILE_SHA = {
    "zfile/L0.commit.lz4.zf": "18a634e3d63a5e44c06bd960cbdc2534f288a970bf75b5dfd20255f58a96c77c",
    "zfile/L0.commit.zstd.zf": "29d711bbc913cfb3ae8678c478f9f68229893decc1398c1ba9f29cbd67048606",
    "zfile/L0.commit.lz4bs64.zf": "fd0cb4af6b38b652e70ba7e0da3de7a80f44ecf7ad1ffbb3d2d887abe2156fc0",
    "zfile/L0.commit.lz4.nocrc.zf": "8d5c6405665f004313d370c9f8f2a328c348b7ca62e89bab9eaaa65609e8a418",
    "zfile/L0.commit.zstd.nocrc.zf": "a32359ed4ed14d442064e8360e7a5de4184d14aa15c02334737f5dd1e4da37cb",
    "zfile/L0.commit.z_lz4": "e20ca1752d9179c896be93ee6cd3abcec80d5c2e67fdc633762eae92b02b41a5",
    "zfile/L0.commit.z_zstd64": "05ed8383d894895dea3a576b292d48d00316366355e7ccbe87051132af31be50",
    "zfile/L1.commit.z_lz4.tar": "4dddc591af73b934d5021680f58424d920d5a7e3964b778d3c2feb4dd218e489",
    "commit/L0.commit": L0_COMMIT_SHA,
    "commit/L1.commit": "f0ee82eef8ab18b1704b9c7b09e38cac57f7c1fa6d188f00a17ac30e4de4d34c",
    "merge/L01.obdmerge": "1d835d2cdc3e2947c7468fa65b8efd2ec5cac41400f3bfb3851ef016d75b880b",
    "ext4/ap.commit": "359415170bcdb7fef6fdd4fff5912e2baa1d9643f64fefbf36d1bc100abb0565",
}

# every ZFile vector -> the file its contents must equal
ZFILE_VECTORS = {
    "zfile/L0.commit.lz4.zf": "commit/L0.commit",
    "zfile/L0.commit.zstd.zf": "commit/L0.commit",
    "zfile/L0.commit.lz4bs64.zf": "commit/L0.commit",
    "zfile/L0.commit.lz4.nocrc.zf": "commit/L0.commit",
    "zfile/L0.commit.zstd.nocrc.zf": "commit/L0.commit",
    "zfile/L0.commit.z_lz4": "commit/L0.commit",
    "zfile/L0.commit.z_zstd64": "commit/L0.commit",
    "zfile/L1.commit.z_lz4.tar": "commit/L1.commit",
    "merge/L01.obdmerge.zf": "merge/L01.obdmerge",
    "ext4/ap.commit.zf": "ext4/ap.commit",
}

# zstd vectors made from commit/L0.commit and the writer options that reproduce them byte for byte
ZSTD_VECTORS = {
    "zfile/L0.commit.zstd.zf": dict(algorithm="zstd", block_size=4096, verify=True),
    "zfile/L0.commit.zstd.nocrc.zf": dict(algorithm="zstd", block_size=4096, verify=False),
    "zfile/L0.commit.z_zstd64": dict(algorithm="zstd", block_size=65536, verify=True, overwrite_header=True),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decompressed(path: Path) -> bytes:
    out = bytearray()

    class Sink:
        def write(self, data: memoryview) -> None:
            out.extend(data)

    with unwrap(LocalFile(path)) as f:
        decompress(f, Sink())
    return bytes(out)


def compress_to_file(src: Path, dst: Path, **options: object) -> bytes:
    with AtomicOutput(dst) as out:
        compress(LocalFile(src), out, **options)
    return dst.read_bytes()


def incompressible(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


# ---- vectors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VECTOR_FILE_SHA))
def test_vector_file_hashes(vectors: Path, name: str) -> None:
    assert sha256((vectors / name).read_bytes()) == VECTOR_FILE_SHA[name]


@pytest.mark.parametrize("name", sorted(ZFILE_VECTORS))
def test_vector_decompresses_to_reference(vectors: Path, name: str) -> None:
    reference = (vectors / ZFILE_VECTORS[name]).read_bytes()
    data = decompressed(vectors / name)
    assert sha256(data) == sha256(reference)
    if ZFILE_VECTORS[name] in VECTOR_FILE_SHA:
        assert sha256(data) == VECTOR_FILE_SHA[ZFILE_VECTORS[name]]


@pytest.mark.parametrize("name", [n for n in sorted(ZFILE_VECTORS) if not n.endswith(".tar")])
def test_vector_metadata_and_block_check(vectors: Path, name: str) -> None:
    with open_zfile(LocalFile(vectors / name)) as z:
        assert is_zfile(LocalFile(vectors / name))
        expect_alg = "zstd" if "zstd" in name else "lz4"
        assert z.algorithm == expect_alg
        assert z.block_size == (65536 if "64" in name else 4096)
        assert z.verify == ("nocrc" not in name)
        assert z.header.overwritten == (".z_" in name or name == "ext4/ap.commit.zf")
        assert z.block_count == -(-z.size() // z.block_size)
        verify_blocks(z)


@pytest.mark.parametrize("name", sorted(ZSTD_VECTORS))
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_zstd_writer_byte_identical(vectors: Path, tmp_path: Path, name: str, threads: int) -> None:
    out = compress_to_file(vectors / "commit/L0.commit", tmp_path / "out.zf", threads=threads, **ZSTD_VECTORS[name])
    assert out == (vectors / name).read_bytes()


def test_lz4_header_layout_matches_upstream(vectors: Path, tmp_path: Path) -> None:
    """python-lz4 emits different (mutually decodable) block bytes than upstream's LZ4 1.8.3;
    everything else — header, option fields, flags — must be identical."""
    out = compress_to_file(vectors / "commit/L0.commit", tmp_path / "out.zf", algorithm="lz4")
    ref = (vectors / "zfile/L0.commit.lz4.zf").read_bytes()
    assert out[:512] == ref[:512]
    mine = hdr.parse(out[-512:], "out", "trailer")
    theirs = hdr.parse(ref[-512:], "ref", "trailer")
    same = ("flags", "index_size", "original_file_size", "block_size", "algo", "level", "verify", "dict_size")
    assert all(getattr(mine, f) == getattr(theirs, f) for f in same)
    assert decompressed(tmp_path / "out.zf") == (vectors / "commit/L0.commit").read_bytes()


# ---- round trips --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("block_size", [4096, 65536])
@pytest.mark.parametrize("verify", [True, False])
def test_round_trip_commit(vectors: Path, tmp_path: Path, algorithm: str, block_size: int, verify: bool) -> None:
    src = vectors / "commit/L0.commit"
    out = tmp_path / "out.zf"
    compress_to_file(src, out, algorithm=algorithm, block_size=block_size, verify=verify, overwrite_header=True)
    with open_zfile(LocalFile(out)) as z:
        assert z.header.flags == hdr.FLAGS_HEADER_OVERWRITE
        assert (z.algorithm, z.block_size, z.verify) == (algorithm, block_size, verify)
    assert decompressed(out) == src.read_bytes()


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_incompressible_64k_blocks(tmp_path: Path, algorithm: str) -> None:
    """Stored blocks over 65535 bytes (a 64 KiB block expands when incompressible) round-trip."""
    data = incompressible(3 * 65536 + 1234)
    out = tmp_path / "big.zf"
    with AtomicOutput(out) as f, ZFileBuilder(f, algorithm=algorithm, block_size=65536) as b:
        b.write(data)
    with open_zfile(LocalFile(out)) as z:
        lengths = [z.block_span(i)[1] for i in range(z.block_count)]
        assert max(lengths) > 65535
        assert z.pread(len(data), 0) == data
        assert z.pread(70000, 60000) == data[60000:130000]
        verify_blocks(z)


def upstream_jump_table_overflows(lengths: list[int], block_size: int) -> bool:
    """Upstream's in-memory table: u16 running sums within groups of 65536/block_size blocks (spec §2.4)."""
    group = 65536 // block_size
    for start in range(0, len(lengths), group):
        if sum(lengths[start : start + group - 1]) >= 65535:
            return True
    return False


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_small_blocks_beyond_upstream_jump_table(tmp_path: Path, algorithm: str) -> None:
    """512-byte incompressible blocks overflow upstream's u16 jump-table sums; our u64 offsets read them."""
    data = incompressible(300 * 512 + 77, seed=5)
    out = tmp_path / "small.zf"
    with AtomicOutput(out) as f, ZFileBuilder(f, algorithm=algorithm, block_size=512) as b:
        b.write(data)
    with open_zfile(LocalFile(out)) as z:
        lengths = [z.block_span(i)[1] for i in range(z.block_count)]
        assert upstream_jump_table_overflows(lengths, 512)
        assert z.pread(len(data), 0) == data
        assert z.pread(3000, 65000) == data[65000:68000]
        verify_blocks(z)


def test_vectors_fit_upstream_jump_table(vectors: Path) -> None:
    for name in ZFILE_VECTORS:
        with unwrap(LocalFile(vectors / name)) as z:
            lengths = [z.block_span(i)[1] for i in range(z.block_count)]
            assert not upstream_jump_table_overflows(lengths, z.block_size)


def test_streaming_writes_equal_one_shot(vectors: Path, tmp_path: Path) -> None:
    src = (vectors / "commit/L0.commit").read_bytes()
    one = compress_to_file(vectors / "commit/L0.commit", tmp_path / "one.zf", algorithm="zstd", threads=2)
    rng = random.Random(3)
    with AtomicOutput(tmp_path / "many.zf") as f, ZFileBuilder(f, algorithm="zstd", threads=3) as b:
        pos = 0
        while pos < len(src):
            n = rng.choice([1, 7, 511, 4096, 4097, 100_000, 300_000])
            b.write(memoryview(src)[pos : pos + n])
            pos += n
        assert b.bytes_in == len(src)
    assert (tmp_path / "many.zf").read_bytes() == one


def _build(data: bytes, **options: object) -> bytes:
    out = bytearray()

    class Sink:
        def write(self, b: bytes | memoryview) -> None:
            out.extend(b)

    with ZFileBuilder(Sink(), **options) as b:  # type: ignore[arg-type]
        b.write(data)
    return bytes(out)


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("block_size", [512, 4096, 65536])
@pytest.mark.parametrize("verify", [True, False])
def test_thread_count_and_accelerator_do_not_change_bytes(
    vectors: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str, block_size: int, verify: bool
) -> None:
    """1, 2 and 5 threads, with and without the C batch compressor, write the same file."""
    from overlaybd.format.zfile import writer

    # several batches, a text part, an incompressible part and a partial last block
    data = (vectors / "commit/L0.commit").read_bytes()[: 3 << 20] + incompressible(700_000) + b"tail" * 99
    want = _build(data, algorithm=algorithm, block_size=block_size, verify=verify, threads=1)
    for threads in (2, 5):
        assert _build(data, algorithm=algorithm, block_size=block_size, verify=verify, threads=threads) == want
    monkeypatch.setattr(writer, "_accel", None)
    for threads in (1, 3):
        assert _build(data, algorithm=algorithm, block_size=block_size, verify=verify, threads=threads) == want


def test_accelerator_crc_is_the_raw_crc() -> None:
    from overlaybd.format.zfile import writer

    if writer._accel is None:
        pytest.skip("C batch compressor not built")
    for n in (0, 1, 7, 8, 9, 4095, 4100):
        data = incompressible(n, seed=n)
        for seed in (0, BLOCK_CRC_SEED, 0xFFFFFFFF):
            assert writer._accel.crc32c_raw(data, seed) == crc32c_raw(data, seed)


def test_default_threads_follow_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default is the CPUs this process may run on (taskset, cgroup cpusets), not the machine's."""
    from overlaybd.format.zfile import writer

    monkeypatch.setattr(writer.os, "sched_getaffinity", lambda pid: {0, 5, 7})
    assert writer.default_threads() == 3
    assert ZFileBuilder(io.BytesIO(), threads=None).threads == 3
    with pytest.raises(ValueError, match="threads"):
        ZFileBuilder(io.BytesIO(), threads=0)


def test_write_batch_mixed_with_write() -> None:
    """Owned batches, odd-sized writes and short batches give the same file as one write."""
    data = incompressible(3 * 512 * 1024 + 5000, seed=4)
    want = _build(data, algorithm="lz4", threads=2)
    out = bytearray()

    class Sink:
        def write(self, b: bytes | memoryview) -> None:
            out.extend(b)

    with ZFileBuilder(Sink(), algorithm="lz4", threads=2) as b:
        step = b.batch_bytes
        b.write_batch(bytearray(data[:step]))
        b.write_batch(bytearray(data[step : step + 8192]))  # whole blocks, short batch
        b.write(data[step + 8192 : step + 9000])  # leaves a partial block pending
        b.write_batch(bytearray(data[step + 9000 : 2 * step + 9000]))  # goes through write()
        b.write_batch(bytearray(data[2 * step + 9000 :]))
    assert bytes(out) == want


def test_writer_memory_is_bounded() -> None:
    """Streaming 24 MiB keeps only a window of batches in memory, not the input or the output."""
    import tracemalloc

    class Null:
        def write(self, data: bytes) -> None:
            pass

    chunk = incompressible(1 << 20, seed=9)
    tracemalloc.start()
    try:
        with ZFileBuilder(Null(), algorithm="lz4", threads=2) as b:
            for _ in range(24):
                b.write(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_write_copies_caller_buffer(tmp_path: Path) -> None:
    """The builder must not keep references to a buffer the caller reuses."""
    data = incompressible(600_000, seed=1)
    buf = bytearray(300_000)
    with AtomicOutput(tmp_path / "o.zf") as f, ZFileBuilder(f, algorithm="lz4", threads=2) as b:
        for pos in (0, 300_000):
            buf[:] = data[pos : pos + 300_000]
            b.write(buf)
            buf[:] = bytes(300_000)
    assert decompressed(tmp_path / "o.zf") == data


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097])
def test_small_and_empty_inputs(tmp_path: Path, size: int) -> None:
    data = incompressible(size)
    out = tmp_path / "s.zf"
    with AtomicOutput(out) as f, ZFileBuilder(f, algorithm="lz4") as b:
        b.write(data)
    with open_zfile(LocalFile(out)) as z:
        assert z.size() == size
        assert z.block_count == -(-size // 4096)
        assert z.pread(size + 10, 0) == data


def test_builder_rejects_bad_options(tmp_path: Path) -> None:
    class WriteOnly:
        def write(self, data: bytes) -> None:
            pass

    with pytest.raises(ValueError):
        ZFileBuilder(WriteOnly(), algorithm="lzo")
    with pytest.raises(ValueError):
        ZFileBuilder(WriteOnly(), block_size=3000)
    with pytest.raises(ValueError):
        ZFileBuilder(WriteOnly(), block_size=131072)
    with pytest.raises(ValueError):
        ZFileBuilder(WriteOnly(), overwrite_header=True)


# ---- random access ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zfile/L0.commit.lz4.zf", "zfile/L0.commit.z_zstd64", "zfile/L0.commit.lz4.nocrc.zf"])
def test_random_access_unaligned(vectors: Path, name: str) -> None:
    ref = (vectors / "commit/L0.commit").read_bytes()
    rng = random.Random(name)
    with open_zfile(LocalFile(vectors / name)) as z:
        assert z.size() == len(ref)
        for _ in range(150):
            off = rng.randrange(0, len(ref) + 100)
            n = rng.choice([1, 3, 511, 4095, 4097, 9000, 70_000, 300_000, 1_300_000])
            buf = bytearray(n + 8)
            got = z.pread_into(memoryview(buf)[4 : 4 + n], off)
            assert got == max(0, min(n, len(ref) - off))
            assert buf[4 : 4 + got] == ref[off : off + got]
            assert buf[:4] == bytes(4) and buf[4 + n :] == bytes(4)
        assert z.pread(0, 100) == b""
        assert z.pread(10, len(ref)) == b""


def test_concurrent_readers_share_one_file(vectors: Path) -> None:
    ref = (vectors / "commit/L0.commit").read_bytes()
    errors: list[BaseException] = []
    with open_zfile(LocalFile(vectors / "zfile/L0.commit.zstd.zf")) as z:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(60):
                    off = rng.randrange(len(ref))
                    n = rng.randrange(1, 50_000)
                    assert z.pread(n, off) == ref[off : off + n]
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


# ---- bad input ----------------------------------------------------------------------------------------------------
def corrupt_copy(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def rewrite_ht(data: bytearray, offset: int, what: str, **changes: int) -> None:
    """Change fields of the header/trailer at `offset`, with a correct digest (so later checks are reached)."""
    h = hdr.parse(bytes(data[offset : offset + 512]), "x", what)
    data[offset : offset + 512] = replace(h, **changes).pack()


def open_bad(path: Path) -> ZFileReader:
    return open_zfile(LocalFile(path))


@pytest.fixture
def lz4zf(vectors: Path) -> Path:
    return vectors / "zfile/L0.commit.lz4.zf"


def expect(exc: type[FormatError], path: Path, field: str, fn=None) -> FormatError:
    with pytest.raises(exc) as info:
        (fn or (lambda: open_bad(path)))()
    assert info.value.path == str(path)
    assert info.value.field == field
    assert str(path) in str(info.value) and field in str(info.value)
    return info.value


def test_truncated_to_partial_header(tmp_path: Path, lz4zf: Path) -> None:
    p = tmp_path / "t.zf"
    p.write_bytes(lz4zf.read_bytes()[:300])
    expect(Truncated, p, "header")
    assert not is_zfile(LocalFile(p))


def test_truncated_tail_loses_trailer(tmp_path: Path, lz4zf: Path) -> None:
    p = tmp_path / "t.zf"
    p.write_bytes(lz4zf.read_bytes()[:-700])
    expect(BadMagic, p, "trailer.magic0")


def test_truncated_overwritten_header_file(tmp_path: Path, vectors: Path) -> None:
    p = tmp_path / "t.zf"
    p.write_bytes((vectors / "zfile/L0.commit.z_lz4").read_bytes()[:-700])
    expect(Truncated, p, "jump table")


def test_wrong_magic(tmp_path: Path, lz4zf: Path) -> None:
    p = corrupt_copy(lz4zf, tmp_path / "m.zf", lambda d: d.__setitem__(0, ord("z")))
    expect(BadMagic, p, "header.magic0")
    assert not is_zfile(LocalFile(p))
    p2 = corrupt_copy(lz4zf, tmp_path / "m1.zf", lambda d: d.__setitem__(10, 0))
    expect(BadMagic, p2, "header.magic1")


def test_bad_header_digest(tmp_path: Path, lz4zf: Path) -> None:
    p = corrupt_copy(lz4zf, tmp_path / "d.zf", lambda d: d.__setitem__(200, 1))
    err = expect(BadChecksum, p, "header.digest")
    assert "stored" in err.message
    assert not is_zfile(LocalFile(p))


def test_bad_trailer_digest(tmp_path: Path, lz4zf: Path) -> None:
    def edit(d: bytearray) -> None:
        d[len(d) - 100] ^= 0xFF

    expect(BadChecksum, corrupt_copy(lz4zf, tmp_path / "td.zf", edit), "trailer.digest")


def test_bad_index_crc(tmp_path: Path, lz4zf: Path) -> None:
    def edit(d: bytearray) -> None:
        t = hdr.parse(bytes(d[-512:]), "x", "trailer")
        d[t.index_offset + 5] ^= 0x01

    expect(BadChecksum, corrupt_copy(lz4zf, tmp_path / "ic.zf", edit), "index_crc")


def test_absurd_index_size(tmp_path: Path, lz4zf: Path) -> None:
    def edit(d: bytearray) -> None:
        rewrite_ht(d, len(d) - 512, "trailer", index_size=1 << 40)

    expect(BadIndex, corrupt_copy(lz4zf, tmp_path / "is.zf", edit), "index_size")


def test_index_size_not_matching_original_size(tmp_path: Path, lz4zf: Path) -> None:
    def edit(d: bytearray) -> None:
        t = hdr.parse(bytes(d[-512:]), "x", "trailer")
        rewrite_ht(d, len(d) - 512, "trailer", original_file_size=t.original_file_size * 2)

    expect(BadIndex, corrupt_copy(lz4zf, tmp_path / "os.zf", edit), "index_size")


def _set_jump_entry(d: bytearray, i: int, value: int) -> None:
    t = hdr.parse(bytes(d[-512:]), "x", "trailer")
    struct.pack_into("<I", d, t.index_offset + 4 * i, value)
    table = bytes(d[t.index_offset : t.index_offset + 4 * t.index_size])
    rewrite_ht(d, len(d) - 512, "trailer", index_crc=crc32c_raw(table))


def test_jump_table_points_past_eof(tmp_path: Path, lz4zf: Path) -> None:
    p = corrupt_copy(lz4zf, tmp_path / "jt.zf", lambda d: _set_jump_entry(d, 7, 5000))
    err = expect(BadIndex, p, "jump_table")
    assert "past the jump table" in err.message


def test_jump_entry_beyond_any_block_bound(tmp_path: Path, lz4zf: Path) -> None:
    p = corrupt_copy(lz4zf, tmp_path / "jb.zf", lambda d: _set_jump_entry(d, 3, 0x7FFFFFFF))
    expect(BadIndex, p, "jump_table[3]")


def test_jump_entry_too_small(tmp_path: Path, lz4zf: Path) -> None:
    p = corrupt_copy(lz4zf, tmp_path / "js.zf", lambda d: _set_jump_entry(d, 2, 4))
    expect(BadIndex, p, "jump_table[2]")


def test_unsupported_algorithm(tmp_path: Path, lz4zf: Path) -> None:
    def edit(d: bytearray) -> None:
        rewrite_ht(d, len(d) - 512, "trailer", algo=0)

    expect(FormatError, corrupt_copy(lz4zf, tmp_path / "a.zf", edit), "opt.algo")


def test_bad_block_size(tmp_path: Path, lz4zf: Path) -> None:
    def edit(d: bytearray) -> None:
        rewrite_ht(d, len(d) - 512, "trailer", block_size=3000)

    expect(FormatError, corrupt_copy(lz4zf, tmp_path / "bs.zf", edit), "opt.block_size")


def _flip_in_block(path: Path, dst: Path, k: int, at: int = 10) -> Path:
    with open_zfile(LocalFile(path)) as z:
        off, _ = z.block_span(k)
    return corrupt_copy(path, dst, lambda d: d.__setitem__(off + at, d[off + at] ^ 0x55))


def test_bad_block_crc(tmp_path: Path, lz4zf: Path) -> None:
    p = _flip_in_block(lz4zf, tmp_path / "bc.zf", 5)
    with open_zfile(LocalFile(p)) as z:
        off, _ = z.block_span(5)
        assert z.pread(4096, 0) == (lz4zf.parent.parent / "commit/L0.commit").read_bytes()[:4096]
        err = expect(BadChecksum, p, "block 5 crc", lambda: z.pread(100, 5 * 4096 + 7))
        assert f"offset {off}" in err.message
        expect(BadChecksum, p, "block 5 crc", lambda: verify_blocks(z))
    expect(BadChecksum, p, "block 5 crc", lambda: verify_blocks(LocalFile(p)))


@pytest.mark.parametrize("name", ["zfile/L0.commit.lz4.zf", "zfile/L0.commit.lz4.nocrc.zf", "zfile/L0.commit.z_lz4"])
def test_whole_block_reads_match_general_path(vectors: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The C whole-block reader (when built) returns what the Python path returns, for every block."""
    from overlaybd.format.zfile import reader as reader_mod

    ref = (vectors / "commit/L0.commit").read_bytes()
    with open_zfile(LocalFile(vectors / name)) as z:
        bs = z.block_size
        buf = memoryview(bytearray(bs))
        for k in range(z.block_count):
            n = z.pread_into(buf, k * bs)
            assert bytes(buf[:n]) == ref[k * bs : k * bs + n]
    monkeypatch.setattr(reader_mod, "ACCEL", None)
    with open_zfile(LocalFile(vectors / name)) as z:
        assert "pread_into" not in vars(z)
        assert z.pread(z.size(), 0) == ref


def test_whole_block_read_of_bad_block_reports_it(tmp_path: Path, lz4zf: Path) -> None:
    """A CRC fault found by the C whole-block reader is reported (and retried) by the checked path."""
    p = _flip_in_block(lz4zf, tmp_path / "bc.zf", 5)
    with open_zfile(LocalFile(p)) as z:
        buf = memoryview(bytearray(4096))
        assert z.pread_into(buf, 4 * 4096) == 4096
        err = expect(BadChecksum, p, "block 5 crc", lambda: z.pread_into(buf, 5 * 4096))
        assert f"offset {z.block_span(5)[0]}" in err.message


def test_corrupt_block_without_crc(tmp_path: Path, vectors: Path) -> None:
    """No CRC in the file: a broken zstd frame is still reported as a bad block, not garbage data."""
    src = vectors / "zfile/L0.commit.zstd.nocrc.zf"
    p = _flip_in_block(src, tmp_path / "nc.zf", 3, at=0)
    with open_zfile(LocalFile(p)) as z:
        err = expect(FormatError, p, "block 3", lambda: z.pread(10, 3 * 4096))
        assert "zstd" in err.message


class EvictingFile(LocalFile):
    """Test double for a cache below the ZFile: serves corrupt bytes for a block until evict() is called.

    Wraps a real file; stands in for the registry cache (which is another helper's module).
    """

    def __init__(self, path: Path, good: bytes, bad_range: tuple[int, int], heal_after: int) -> None:
        super().__init__(path)
        self.good = good
        self.bad_range = bad_range
        self.heal_after = heal_after
        self.evictions: list[tuple[int, int]] = []

    def pread_into(self, buf: memoryview, offset: int) -> int:
        n = super().pread_into(buf, offset)
        if len(self.evictions) >= self.heal_after:
            lo, hi = self.bad_range
            s, e = max(lo, offset), min(hi, offset + n)
            if s < e:
                buf[s - offset : e - offset] = self.good[s:e]
        return n

    def evict(self, offset: int, length: int) -> None:
        self.evictions.append((offset, length))


@pytest.mark.parametrize("heal_after,ok", [(1, True), (3, True), (4, False)])
def test_evict_and_retry(tmp_path: Path, lz4zf: Path, vectors: Path, heal_after: int, ok: bool) -> None:
    good = lz4zf.read_bytes()
    p = _flip_in_block(lz4zf, tmp_path / "r.zf", 9)
    f = EvictingFile(p, good, (0, len(good)), heal_after)
    with open_zfile(f, verify=True) as z:
        span = z.block_span(9)
        if ok:
            assert z.pread(4096, 9 * 4096) == (vectors / "commit/L0.commit").read_bytes()[9 * 4096 : 10 * 4096]
            assert f.evictions == [span] * heal_after
        else:
            expect(BadChecksum, p, "block 9 crc", lambda: z.pread(4096, 9 * 4096))
            assert f.evictions == [span] * 3


def test_no_retry_when_verify_off(tmp_path: Path, lz4zf: Path) -> None:
    good = lz4zf.read_bytes()
    p = _flip_in_block(lz4zf, tmp_path / "r.zf", 9)
    f = EvictingFile(p, good, (0, len(good)), 1)
    with open_zfile(f, verify=False) as z:
        expect(BadChecksum, p, "block 9 crc", lambda: z.pread(4096, 9 * 4096))
    assert f.evictions == []


def test_block_crc_uses_raw_seed_100007(vectors: Path) -> None:
    with open_zfile(LocalFile(vectors / "zfile/L0.commit.zstd.zf")) as z:
        off, n = z.block_span(0)
    stored = (vectors / "zfile/L0.commit.zstd.zf").read_bytes()[off : off + n]
    assert crc32c_raw(stored[:-4], BLOCK_CRC_SEED) == struct.unpack("<I", stored[-4:])[0]


def _table_crc(data: bytes, seed: int) -> int:
    """Spec §2.3's reference loop (reflected poly 0x82F63B78, no inversion)."""
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    crc = seed
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


@pytest.mark.parametrize("seed", [0, BLOCK_CRC_SEED, 0xFFFFFFFF, 0x12345678])
def test_crc32c_raw_matches_reference_loop(seed: int) -> None:
    data = incompressible(3000, seed=seed & 0xFF)
    assert crc32c_raw(data, seed) == _table_crc(data, seed)
    assert crc32c_raw(memoryview(data)[5:900], seed) == _table_crc(data[5:900], seed)
    assert crc32c_raw(b"", seed) == seed


def test_crc32c_relation_to_standard() -> None:
    assert crc32c_raw(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(max_size=20_000)
    | st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 20_000), st.integers(0, 255)),
    algorithm=st.sampled_from(["lz4", "zstd"]),
    block_size=st.sampled_from([512, 1024, 4096]),
    verify=st.booleans(),
    cuts=st.lists(st.integers(0, 20_000), max_size=5),
    reads=st.lists(st.tuples(st.integers(0, 21_000), st.integers(0, 9_000)), max_size=8),
)
def test_property_round_trip(
    data: bytes, algorithm: str, block_size: int, verify: bool, cuts: list[int], reads: list[tuple[int, int]]
) -> None:
    import io

    class Out(io.BytesIO):
        def pwrite(self, b: bytes, off: int) -> None:
            self.getbuffer()[off : off + len(b)] = b

    out = Out()
    with ZFileBuilder(out, algorithm=algorithm, block_size=block_size, verify=verify, overwrite_header=True) as b:
        prev = 0
        for c in sorted(min(c, len(data)) for c in cuts) + [len(data)]:
            b.write(data[prev:c])
            prev = c
    z = ZFileReader(MemFile(out.getvalue()))
    assert z.size() == len(data)
    for off, n in reads:
        assert z.pread(n, off) == data[off : off + n]


class MemFile:
    """In-memory RandomAccessFile for property tests (on-disk behaviour is covered by the tests above)."""

    name = "<memory>"

    def __init__(self, data: bytes) -> None:
        self.data = data

    def size(self) -> int:
        return len(self.data)

    def pread_into(self, buf: memoryview, offset: int) -> int:
        chunk = self.data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        return len(chunk)

    def pread(self, size: int, offset: int) -> bytes:
        return self.data[offset : offset + size]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("accel", [True, False])
def test_workers_pread_pwrite_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str, accel: bool
) -> None:
    """compress() from a LocalFile into a file: the workers read and write the file themselves
    (AtomicOutput, a plain file, a file not at offset 0); the bytes equal the streaming builder's."""
    from overlaybd.format.zfile import writer

    if not accel:
        monkeypatch.setattr(writer, "_accel", None)
    data = incompressible(700_000) + bytes(5 << 20) + incompressible(3 << 20, seed=2) + b"tail" * 99
    src = tmp_path / "src"
    src.write_bytes(data)
    want = _build(data, algorithm=algorithm, threads=1)
    calls: list[int] = []
    run = writer._ParallelFds.run
    monkeypatch.setattr(writer._ParallelFds, "run", lambda self: (calls.append(1), run(self))[1])
    for threads in (1, 2, 5):
        assert compress_to_file(src, tmp_path / "a.zf", algorithm=algorithm, threads=threads) == want
        with LocalFile(src) as f, open(tmp_path / "p.zf", "wb") as out:
            out.write(b"prefix")
            compress(f, out, algorithm=algorithm, threads=threads)
            out.write(b"suffix")
        assert (tmp_path / "p.zf").read_bytes() == b"prefix" + want + b"suffix"
    assert len(calls) == 6
    assert decompressed(tmp_path / "a.zf") == data


def test_workers_fall_back_for_append_and_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """O_APPEND files (pwrite would append) and outputs without a descriptor use the caller's writes."""
    from overlaybd.format.zfile import writer

    data = incompressible(1 << 20) + bytes(1 << 20)
    src = tmp_path / "src"
    src.write_bytes(data)
    want = _build(data, algorithm="lz4", threads=1)
    monkeypatch.setattr(writer, "_ParallelFds", None)  # any use would fail
    (tmp_path / "app.zf").write_bytes(b"x")
    with LocalFile(src) as f, open(tmp_path / "app.zf", "ab") as out:
        compress(f, out, algorithm="lz4", threads=2)
    assert (tmp_path / "app.zf").read_bytes() == b"x" + want
    buf = io.BytesIO()
    with LocalFile(src) as f:
        compress(f, buf, algorithm="lz4", threads=2)
    assert buf.getvalue() == want


@pytest.mark.parametrize("threads", [1, 3])
def test_worker_error_stops_all_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """A failing batch (here a source that reads short) raises in the caller; no worker is left behind."""
    src = tmp_path / "src"
    src.write_bytes(incompressible(4 << 20))
    real = LocalFile.pread_into

    def short(self: LocalFile, buf: memoryview, offset: int) -> int:
        return real(self, buf[: len(buf) - 1] if offset >= 2 << 20 else buf, offset)

    monkeypatch.setattr(LocalFile, "pread_into", short)
    before = threading.active_count()
    with pytest.raises(Truncated):
        compress_to_file(src, tmp_path / "e.zf", algorithm="lz4", threads=threads)
    assert threading.active_count() == before
    assert not (tmp_path / "e.zf").exists()


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_streaming_tasks_pwrite_into_atomic_output(tmp_path: Path, algorithm: str) -> None:
    """With an AtomicOutput sink the pool tasks write the batches themselves; same bytes, and a failing
    task (here: bad input type) raises in the caller without leaving threads or the output behind."""
    data = incompressible(900_000) + bytes(2 << 20) + b"x" * 777
    want = _build(data, algorithm=algorithm, threads=1)
    for threads in (2, 5):
        with AtomicOutput(tmp_path / "s.zf") as f, ZFileBuilder(f, algorithm=algorithm, threads=threads) as b:
            assert b._direct is not None
            for pos in range(0, len(data), 300_001):
                b.write(data[pos : pos + 300_001])
        assert (tmp_path / "s.zf").read_bytes() == want
    before = threading.active_count()
    with pytest.raises(TypeError):
        with AtomicOutput(tmp_path / "e.zf") as f, ZFileBuilder(f, algorithm=algorithm, threads=2) as b:
            b.write(data)
            b._submit("not bytes")  # type: ignore[arg-type]
            b.write(data)
            b.close()
    assert threading.active_count() == before
    assert not (tmp_path / "e.zf").exists()
