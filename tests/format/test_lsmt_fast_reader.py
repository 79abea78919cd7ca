"""The read-only LSMT fast path (`SegmentTable.fast_reader`: the C `SegReader` when the helper is built,
else a Python closure) gives the same bytes and errors as the general path for every request shape:
inside one mapping, across mappings, holes, zeroed ranges, the vsize edge, unaligned and negative
offsets, short source reads, several layers and ZFile layers."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from overlaybd.format import lsmt, opener
from overlaybd.format.errors import FormatError
from overlaybd.format.fileio import LocalFile
from overlaybd.format.lsmt import segments
from overlaybd.format.lsmt.mapping import Columns
from overlaybd.format.lsmt.segments import SegmentTable
from overlaybd.format.zfile import compress

MiB = 1 << 20
VSIZE = 8 * MiB

VARIANTS = ["c", "python"] if segments._C_READER is not None else ["python"]


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(segments, "_C_READER", None)
    return str(request.param)


def _layers(tmp_path: Path, zfile: bool) -> tuple[list[Path], bytearray]:
    """Three committed layers (bottom..top) with writes, overwrites and discards; the expected disk."""
    rng = random.Random(5)
    disk = bytearray(VSIZE)
    paths: list[Path] = []
    parent: str | None = None
    for i in range(3):
        data, index, out = tmp_path / f"L{i}.data", tmp_path / f"L{i}.index", tmp_path / f"L{i}.commit"
        with lsmt.create_rw(data, index, VSIZE, parent_uuid=parent) as rw:
            for _ in range(40):
                length = rng.choice([512, 4096, 8192, 65536, 300 * 1024])
                off = rng.randrange(0, VSIZE - length, 512)
                if i and rng.random() < 0.2:
                    rw.discard(off, length)
                    disk[off : off + length] = bytes(length)
                else:
                    chunk = rng.randbytes(length)
                    rw.pwrite(chunk, off)
                    disk[off : off + length] = chunk
            with open(out, "wb") as f:
                lsmt.commit(rw, f, uuid=rw.uuid)
            parent = rw.uuid
        if zfile:
            zf = out.with_suffix(".zf")
            with LocalFile(out) as src, open(zf, "wb") as dst:
                compress(src, dst, algorithm="lz4", block_size=4096, verify=True, threads=1)
            out = zf
        paths.append(out)
    return paths, disk


def _requests(rng: random.Random) -> list[tuple[int, int]]:
    reqs = [(0, 4096), (VSIZE - 4096, 4096), (VSIZE - 512, 512), (VSIZE - 4096, 8192), (VSIZE, 4096), (0, 0)]
    for _ in range(600):
        length = rng.choice([512, 4096, 4096, 8192, 65536, 131072])
        reqs.append((rng.randrange(0, VSIZE // 512) * 512, length))
    return reqs


@pytest.mark.parametrize("zfile", [False, True], ids=["plain", "zfile"])
def test_stack_fast_reads_equal_the_disk(tmp_path: Path, variant: str, zfile: bool) -> None:
    paths, disk = _layers(tmp_path, zfile)
    with lsmt.Stack([opener.open_layer(LocalFile(p)) for p in paths], check_order=True) as stack:
        if variant == "c":
            assert type(stack.pread_into).__name__ == "SegReader"
        buf = memoryview(bytearray(131072))
        for off, length in _requests(random.Random(9)):
            want = disk[off : off + length]
            got = stack.pread_into(buf[:length], off)
            assert got == len(want), (off, length)
            assert buf[:got] == want, (off, length)


def test_single_layer_fast_reads_equal_the_disk(tmp_path: Path, variant: str) -> None:
    paths, _ = _layers(tmp_path, False)
    with lsmt.open_ro(LocalFile(paths[0])) as layer:
        general = lsmt.ReadOnlyLayer.pread_into.__get__(layer)
        a, b = memoryview(bytearray(65536)), memoryview(bytearray(65536))
        for off, length in _requests(random.Random(3)):
            assert layer.pread_into(a[:length], off) == general(b[:length], off)
            assert a[:length] == b[:length]


def test_unaligned_and_negative_requests_raise_as_before(tmp_path: Path, variant: str) -> None:
    paths, _ = _layers(tmp_path, False)
    with lsmt.Stack([opener.open_layer(LocalFile(p)) for p in paths]) as stack:
        buf = memoryview(bytearray(4096))
        with pytest.raises(FormatError):
            stack.pread_into(buf, 100)
        with pytest.raises(FormatError):
            stack.pread_into(buf[:1000], 0)
        general = lsmt.Stack.pread_into.__get__(stack)
        for off in (-4096, -512):
            outcome = []
            for read in (stack.pread_into, general):
                try:
                    outcome.append(read(buf, off))
                except Exception as e:
                    outcome.append(type(e))
            assert outcome[0] == outcome[1]


def _table(readers: list[Callable[[memoryview, int], int]]) -> SegmentTable:
    # sectors: [0, 8) data at 100 (tag 0), [8, 16) zeroed, hole [16, 24), [24, 32) data at 2 (tag 1)
    return SegmentTable(Columns([0, 8, 24], [8, 8, 8], [100, 0, 2], [0, 1, 0], [0, 0, 1]), readers)


def test_short_source_read_falls_back_to_general(variant: str) -> None:
    calls: list[tuple[str, int, int]] = []

    def short(buf: memoryview, off: int) -> int:
        calls.append(("short", off, len(buf)))
        return len(buf) // 2

    def full(buf: memoryview, off: int) -> int:
        calls.append(("full", off, len(buf)))
        buf[:] = b"\x07" * len(buf)
        return len(buf)

    def general(buf: memoryview, off: int) -> int:
        calls.append(("general", off, len(buf)))
        return -1

    read = _table([short, full]).fast_reader(32 * 512, general)
    buf = memoryview(bytearray(8192))[:4096]
    assert read(buf, 0) == -1  # short source read -> general
    assert calls == [("short", 100 * 512, 4096), ("general", 0, 4096)]
    calls.clear()
    assert read(buf, 24 * 512) == 4096  # tag 1, moffset shift
    assert calls == [("full", 2 * 512, 4096)] and buf == b"\x07" * 4096
    calls.clear()
    for off, n in ((8 * 512, 4096), (16 * 512, 4096), (4 * 512, 4096), (24 * 512, 8192), (0, 0)):
        read(memoryview(bytearray(n)), off)  # zeroed, hole, across mappings, past vsize, empty
        assert calls[-1] == ("general", off, n)
        assert all(c[0] == "general" for c in calls)
    calls.clear()
    read(bytearray(4096), 0)  # not a memoryview
    assert calls[-1][0] in ("general", "short")


def test_reader_exceptions_propagate(variant: str) -> None:
    def boom(buf: memoryview, off: int) -> int:
        raise OSError(5, "EIO")

    read = _table([boom, boom]).fast_reader(32 * 512, lambda b, o: 0)
    with pytest.raises(OSError):
        read(memoryview(bytearray(4096)), 0)


def test_huge_source_offsets_go_to_general(variant: str) -> None:
    """Warp layers shift moffsets to 2^54 sectors (2^63 bytes): the C side must not overflow."""
    seen: list[int] = []

    def rec(buf: memoryview, off: int) -> int:
        seen.append(off)
        return len(buf)

    table = SegmentTable(Columns([0], [8], [1 << 54], [0]), [rec])
    read = table.fast_reader(8 * 512, lambda b, o: -1)
    got = read(memoryview(bytearray(4096)), 0)
    assert got == 4096 and seen == [(1 << 63)]
