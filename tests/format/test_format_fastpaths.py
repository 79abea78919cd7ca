"""The fast paths of commit and the ZFile reader give the same bytes and errors as the plain ones.

commit: runs of contiguous source data are copied kernel-side (copy_file_range) when source and
sink are plain local files, else through a buffer; the index is computed on ints. ZFile reader:
single-block requests skip the span machinery, partial-block requests go through a small cache
of decoded blocks, multi-block requests decode straight into the caller's buffer.
"""

from __future__ import annotations

import errno
import io
import os
import random
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from overlaybd.format import lsmt
from overlaybd.format.atomic import AtomicOutput
from overlaybd.format.errors import BadChecksum, FormatError, Truncated
from overlaybd.format.fileio import LocalFile
from overlaybd.format.lsmt.compact import _raw_steps, commit_index
from overlaybd.format.lsmt.mapping import MAX_LENGTH, Mapping, compress_raw_index
from overlaybd.format.zfile import ZFileBuilder, ZFileReader, decompress, open_zfile
from overlaybd.format.zfile import header as hdr

MiB = 1 << 20


# ---- commit ------------------------------------------------------------------------------------------------------
@st.composite
def mapping_lists(draw: st.DrawFn) -> list[Mapping]:
    """Sorted, non-overlapping mappings with gaps, zeroed runs, several tags and lengths near the run cap."""
    out: list[Mapping] = []
    off = 0
    moff = {0: 8, 1: 8, 2: 8}
    for _ in range(draw(st.integers(0, 12))):
        off += draw(st.sampled_from([0, 0, 0, 1, 64, 100]))
        length = draw(st.sampled_from([1, 7, 63, 64, 65, 128, 16319, 16320, 16321, MAX_LENGTH]))
        zeroed = draw(st.booleans())
        tag = draw(st.sampled_from([0, 0, 1, 2]))
        gap = draw(st.sampled_from([0, 0, 8]))  # a hole in the source file breaks a data run
        moff[tag] += gap
        out.append(Mapping(off, length, moff[tag], zeroed, tag))
        if not zeroed:
            moff[tag] += length
        off += length
    return out


@settings(max_examples=300, deadline=None)
@given(mappings=mapping_lists())
def test_commit_index_equals_step_by_step_rule(mappings: list[Mapping]) -> None:
    assert commit_index(mappings) == compress_raw_index(_raw_steps(mappings))


def _rw_layer(tmp_path: Path, name: str, seed: int) -> tuple[Path, Path, bytearray]:
    """An RW layer with scattered, overlapping writes and discards; returns its files and the expected disk."""
    rng = random.Random(seed)
    vsize = 16 * MiB
    data, index = tmp_path / f"{name}.data", tmp_path / f"{name}.index"
    disk = bytearray(vsize)
    with lsmt.create_rw(data, index, vsize) as rw:
        for _ in range(60):
            length = rng.choice([512, 4096, 65536, 300 * 1024, 2 * MiB + 4096])
            off = rng.randrange(0, vsize - length, 512)
            if rng.random() < 0.15:
                rw.discard(off, length)
                disk[off : off + length] = bytes(length)
            else:
                chunk = rng.randbytes(length)
                rw.pwrite(chunk, off)
                disk[off : off + length] = chunk
    return data, index, disk


def _read_all(path: Path) -> bytes:
    with lsmt.open_ro(LocalFile(path)) as layer:
        return layer.pread(layer.size(), 0)


def test_commit_kernel_copy_buffered_copy_and_atomic_agree(tmp_path: Path) -> None:
    data, index, disk = _rw_layer(tmp_path, "a", 1)
    outs = {}
    with lsmt.open_rw(data, index, readonly=True) as rw:
        with open(tmp_path / "plain.commit", "wb") as f:  # seekable regular file: copy_file_range
            lsmt.commit(rw, f, uuid="0f5e3a10-0000-4000-8000-0000000000c0")
        outs["plain"] = (tmp_path / "plain.commit").read_bytes()
        with AtomicOutput(tmp_path / "atomic.commit") as f:
            lsmt.commit(rw, f, uuid="0f5e3a10-0000-4000-8000-0000000000c0")
        outs["atomic"] = (tmp_path / "atomic.commit").read_bytes()
        buf = io.BytesIO()  # no file descriptor: buffered copy
        lsmt.commit(rw, buf, uuid="0f5e3a10-0000-4000-8000-0000000000c0")
        outs["bytesio"] = buf.getvalue()
    assert outs["plain"] == outs["atomic"] == outs["bytesio"]
    assert _read_all(tmp_path / "plain.commit") == disk


def test_commit_copies_kernel_side_and_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """copy_file_range is used for plain files; if it fails (first call, or in the middle of a run, which
    is then rewound) the buffered copy takes over and the output is the same."""
    data, index, _ = _rw_layer(tmp_path, "k", 4)
    real = os.copy_file_range
    calls: list[int] = []
    fail_after: list[int | None] = [None]

    def counting(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        calls.append(count)
        if fail_after[0] is not None and len(calls) > fail_after[0]:
            raise OSError(errno.EXDEV, "cross-device")
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", counting)
    monkeypatch.setattr(sys.modules[commit_index.__module__], "KERNEL_COPY_CHUNK", 64 * 1024)  # several calls per run
    outs = []
    for fail in (None, 0, 5):
        fail_after[0] = fail
        calls.clear()
        with lsmt.open_rw(data, index, readonly=True) as rw, open(tmp_path / "k.commit", "wb") as f:
            lsmt.commit(rw, f)
        assert len(calls) == (fail + 1 if fail is not None else len(calls)) and len(calls) >= 1
        outs.append((tmp_path / "k.commit").read_bytes())
    buf = io.BytesIO()
    with lsmt.open_rw(data, index, readonly=True) as rw:
        lsmt.commit(rw, buf)
    assert outs[0] == outs[1] == outs[2] == buf.getvalue()
    assert len(calls) == 6  # the last round failed in the middle of the copy, after 5 pieces


def test_merge_of_local_and_zfile_layers_matches_buffered(tmp_path: Path) -> None:
    """Merge mixes sources: plain committed files (kernel copy) and a ZFile (buffered copy)."""
    layers = []
    for i in range(3):
        data, index, _ = _rw_layer(tmp_path, f"m{i}", 10 + i)
        with lsmt.open_rw(data, index, readonly=True) as rw, open(tmp_path / f"m{i}.commit", "wb") as f:
            lsmt.commit(rw, f)
    with LocalFile(tmp_path / "m1.commit") as src, open(tmp_path / "m1.zf", "wb") as f:
        with ZFileBuilder(f, algorithm="lz4", threads=1) as b:
            b.write(src.pread(src.size(), 0))
    layers = [
        lsmt.open_ro(LocalFile(tmp_path / "m0.commit")),
        lsmt.open_ro(ZFileReader(LocalFile(tmp_path / "m1.zf"))),
        lsmt.open_ro(LocalFile(tmp_path / "m2.commit")),
    ]
    try:
        with open(tmp_path / "merged", "wb") as f:
            lsmt.merge(layers, f)
        buf = io.BytesIO()
        lsmt.merge(layers, buf)
    finally:
        for la in layers:
            la.close()
    assert (tmp_path / "merged").read_bytes() == buf.getvalue()


@pytest.mark.parametrize("sink", ["file", "bytesio"])
def test_commit_of_truncated_rw_data_is_reported(tmp_path: Path, sink: str) -> None:
    """The data file shrinks after open (open_rw itself rejects records past the end): a clear error."""
    data, index, _ = _rw_layer(tmp_path, "t", 2)
    with lsmt.open_rw(data, index, readonly=True) as rw:
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size - 5000)
        with pytest.raises(Truncated) as e:
            if sink == "file":
                with open(tmp_path / "out", "wb") as f:
                    lsmt.commit(rw, f)
            else:
                lsmt.commit(rw, io.BytesIO())
    assert e.value.path == str(data) and e.value.field == "data"


# ---- ZFile reader ------------------------------------------------------------------------------------------------
def _zfile(tmp_path: Path, data: bytes, algorithm: str, block_size: int, verify: bool = True) -> Path:
    p = tmp_path / f"z-{algorithm}-{block_size}-{verify}.zf"
    with open(p, "wb") as f, ZFileBuilder(f, algorithm=algorithm, block_size=block_size, verify=verify) as b:
        b.write(data)
    return p


def _payload(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    parts = []
    while sum(map(len, parts)) < n:
        parts.append(rng.randbytes(700) if rng.random() < 0.5 else b"overlaybd zfile line\n" * 40)
    return b"".join(parts)[:n]


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("block_size", [512, 4096, 65536])
def test_reads_of_every_shape(tmp_path: Path, algorithm: str, block_size: int) -> None:
    data = _payload(3 * 65536 + 1234, block_size)  # last block is short
    p = _zfile(tmp_path, data, algorithm, block_size)
    rng = random.Random(5)
    with open_zfile(LocalFile(p)) as z:
        shapes = [(0, block_size), (block_size, block_size), (len(data) - 1234, 1234), (len(data) - 10, 100)]
        shapes += [(rng.randrange(len(data)), rng.choice([1, 511, 4096, 5000, 70000])) for _ in range(200)]
        for off, n in shapes:
            assert z.pread(n, off) == data[off : off + n], (off, n)
        out = io.BytesIO()
        decompress(z, out)
        assert out.getvalue() == data


def test_partial_reads_of_a_corrupt_block_never_come_from_the_cache(tmp_path: Path) -> None:
    data = _payload(64 * 1024, 3)
    p = _zfile(tmp_path, data, "lz4", 4096)
    with open_zfile(LocalFile(p)) as z:
        off, _ = z.block_span(3)
    raw = bytearray(p.read_bytes())
    raw[off + 5] ^= 0x40
    p.write_bytes(bytes(raw))
    with open_zfile(LocalFile(p), verify=False) as z:
        assert z.pread(100, 2 * 4096 + 50) == data[2 * 4096 + 50 : 2 * 4096 + 150]
        for _ in range(2):
            with pytest.raises(BadChecksum) as e:
                z.pread(100, 3 * 4096 + 50)
            assert e.value.field == "block 3 crc"
        with pytest.raises(BadChecksum):
            z.pread(4096, 3 * 4096)


def test_concurrent_readers_get_their_own_bytes(tmp_path: Path) -> None:
    """Worker threads (as the TCMU/FUSE frontends use) share one reader: cache and scratch stay consistent."""
    data = _payload(2 * MiB, 9)
    p = _zfile(tmp_path, data, "lz4", 4096)
    errors: list[str] = []
    with open_zfile(LocalFile(p)) as z:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            buf = bytearray(70000)
            for _ in range(1500):
                off = rng.randrange(len(data))
                n = rng.choice([512, 1000, 4096, 9000, 70000])
                view = memoryview(buf)[:n]
                got = z.pread_into(view, off)
                if bytes(view[:got]) != data[off : off + got]:
                    errors.append(f"{off}+{n}")

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_last_block_longer_than_the_file_claims(tmp_path: Path, algorithm: str) -> None:
    """original_file_size cut by 100 bytes (trailer re-signed): the last block decodes to too much -> error."""
    data = _payload(5 * 4096, 4)
    p = _zfile(tmp_path, data, algorithm, 4096)
    raw = bytearray(p.read_bytes())
    info = hdr.parse(bytes(raw[-512:]), str(p), "trailer")
    raw[-512:] = replace(info, original_file_size=len(data) - 100).pack()
    p.write_bytes(bytes(raw))
    with open_zfile(LocalFile(p), verify=False) as z:
        assert z.pread(4096, 0) == data[:4096]
        for off, n in [(4 * 4096, 3996), (4 * 4096 + 10, 50), (0, len(data) - 100)]:
            with pytest.raises(FormatError) as e:
                z.pread(n, off)
            assert e.value.field == "block 4" and "expected 3996" in e.value.message
