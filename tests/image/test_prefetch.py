"""Trace prefetch (spec §8): recording the layer-file reads of an image, replaying a trace.

Images are made from the upstream vector layers zfile/L0.commit.z_lz4 + commit/L1.commit, as
vectors/trace/trace.config.v1.json; trace/trace.bin is upstream's recording of that stack.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
from helpers.vectors import L01_SHA
from helpers.vectors import logical_sha256 as disk_sha
from helpers.wait import wait_for
from overlaybd.config.image_config import device_config_from_dict
from overlaybd.format import opener
from overlaybd.format.fileio import LocalFile
from overlaybd.format.trace import RECORD, TraceRecord, encode_trace, read_trace, write_trace
from overlaybd.image import open_image
from overlaybd.image import prefetch as prefetch_mod
from overlaybd.image.prefetch import MAX_PIECE, PriorityListReplayer, TraceRecorder, TraceReplayer, plan_prefetch

MiB = 1 << 20
LAYERS = ("zfile/L0.commit.z_lz4", "commit/L1.commit")
WAIT = 60.0  # generous upper bound for background work; never a timing assertion


def stack_config(vectors: Path, **extra) -> object:
    doc = {"lowers": [{"file": str(vectors / f)} for f in LAYERS], **extra}
    return device_config_from_dict(doc)


def merge_ranges(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


class CountingFile:
    """Test wrapper over a real layer file: logs every (offset, count) read."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.reads: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def size(self) -> int:
        return self.inner.size()

    def pread_into(self, buf: memoryview, offset: int) -> int:
        with self.lock:
            self.reads.append((offset, len(buf)))
        return self.inner.pread_into(buf, offset)

    def close(self) -> None:
        self.inner.close()


def layer_files(vectors: Path) -> list[CountingFile]:
    return [CountingFile(opener.unwrap(LocalFile(vectors / f))) for f in LAYERS]


# --------------------------------------------------------------------------- mode selection


def test_plan_modes(tmp_path: Path, vectors: Path) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    listing = tmp_path / "list"
    listing.write_text("/usr/bin/\n")
    assert plan_prefetch(stack_config(vectors, recordTracePath=str(empty))).mode == "record"
    assert plan_prefetch(stack_config(vectors, recordTracePath=str(vectors / "trace/trace.bin"))).mode == "replay"
    assert plan_prefetch(stack_config(vectors, recordTracePath=str(listing))).mode == "list"
    assert plan_prefetch(stack_config(vectors, recordTracePath=str(tmp_path / "missing"))) is None
    assert plan_prefetch(stack_config(vectors)) is None


# --------------------------------------------------------------------------- record


def expected_layer_ranges(img) -> dict[int, list[tuple[int, int]]]:
    """Per layer (0 = bottom), the file byte ranges the merged index sends reads to."""
    stack = img._stack
    n = len(stack.lowers)
    out: dict[int, list[tuple[int, int]]] = {}
    for m in stack.mappings():
        if m.zeroed:
            continue
        out.setdefault(n - 1 - m.tag, []).append((m.moffset * 512, (m.moffset + m.length) * 512))
    return {k: merge_ranges(v) for k, v in out.items()}


def test_record_whole_disk_read(tmp_path: Path, vectors: Path) -> None:
    trace = tmp_path / "trace.bin"
    trace.touch()
    img = open_image(stack_config(vectors, recordTracePath=str(trace)))
    try:
        assert isinstance(img.prefetcher, TraceRecorder)
        assert Path(f"{trace}.lock").exists() and not Path(f"{trace}.ok").exists()
        assert disk_sha(img) == L01_SHA
        expected = expected_layer_ranges(img)
    finally:
        img.close()
    assert Path(f"{trace}.ok").exists() and not Path(f"{trace}.lock").exists()
    records = read_trace(trace)  # checks magic, size and checksum of what was dumped
    assert records and all(r.op == "R" and r.layer_index in (0, 1) for r in records)
    got: dict[int, list[tuple[int, int]]] = {}
    for r in records:
        got.setdefault(r.layer_index, []).append((r.offset, r.offset + r.count))
    # layer-file (moffset) address space: exactly the data the index points at, nothing of the headers
    assert {k: merge_ranges(v) for k, v in got.items()} == expected
    assert all(r.offset >= 4096 for r in records)


def test_record_stops_when_lock_removed(tmp_path: Path, vectors: Path, monkeypatch) -> None:
    monkeypatch.setattr(prefetch_mod, "LOCK_POLL_SECONDS", 0.02)
    trace = tmp_path / "trace.bin"
    trace.touch()
    with open_image(stack_config(vectors, recordTracePath=str(trace))) as img:
        img.pread(4096, 0)
        img.pread(8192, 1 * MiB)
        os.unlink(f"{trace}.lock")
        wait_for(lambda: Path(f"{trace}.ok").exists(), WAIT, "the .ok file")
        dumped = read_trace(trace)
        assert dumped
        disk_sha(img)  # reads after the stop are not recorded
    assert read_trace(trace) == dumped
    assert not Path(f"{trace}.lock").exists()


def test_record_trace_missing_is_ignored(tmp_path: Path, vectors: Path, caplog) -> None:
    trace = tmp_path / "nope.bin"
    with caplog.at_level(logging.WARNING), open_image(stack_config(vectors, recordTracePath=str(trace))) as img:
        assert img.prefetcher is None
        assert disk_sha(img) == L01_SHA
    assert "recordTracePath" in caplog.text and str(trace) in caplog.text
    assert not trace.exists() and not Path(f"{trace}.lock").exists()


# --------------------------------------------------------------------------- replay


def expected_pieces(records, files) -> set[tuple[int, int, int]]:
    out = set()
    for r in records:
        end = min(r.offset + r.count, files[r.layer_index].size())
        for off in range(r.offset, end, MAX_PIECE):
            out.add((r.layer_index, off, min(MAX_PIECE, end - off)))
    return out


def replay(trace: Path, files, concurrency: int = 4) -> TraceReplayer:
    rp = TraceReplayer(str(trace), files, concurrency, "test-image")
    rp.start()
    assert rp.wait(WAIT)
    return rp


def reads_of(files) -> list[tuple[int, int, int]]:
    return [(i, off, n) for i, f in enumerate(files) for off, n in f.reads]


def test_replay_upstream_vector_trace(vectors: Path) -> None:
    records = read_trace(vectors / "trace/trace.bin")
    files = layer_files(vectors)
    try:
        before = reads_of(files)  # nothing yet
        rp = replay(vectors / "trace/trace.bin", files)
        got = reads_of(files)[len(before) :]
        # every distinct recorded range read exactly once, nothing else (54 records, 8 repeats)
        want = {(r.layer_index, r.offset, r.count) for r in records}
        assert len(got) == len(set(got)) == len(want) == 46
        assert set(got) == want
        assert rp.errors == 0 and rp.pieces_read == 46
    finally:
        for f in files:
            f.close()


def test_record_then_replay_reads_exact_ranges(tmp_path: Path, vectors: Path) -> None:
    trace = tmp_path / "trace.bin"
    trace.touch()
    with open_image(stack_config(vectors, recordTracePath=str(trace))) as img:
        img.pread(64 * 1024, 0)
        img.pread(3 * MiB, 5 * MiB)  # spans more than MAX_PIECE of virtual space
        img.pread(4096, 40 * MiB)
    records = read_trace(trace)
    # plus one hand-made record bigger than a piece, so the 1 MiB split is exercised
    big = TraceRecord("R", 0, 2 * MiB + 4096, 4096)
    write_trace(trace, [*records, big])
    files = layer_files(vectors)
    try:
        replay(trace, files)
        got = reads_of(files)
        assert len(got) == len(set(got))
        assert set(got) == expected_pieces([*records, big], files)
        assert max(n for _, _, n in got) <= MAX_PIECE
    finally:
        for f in files:
            f.close()


def test_replay_through_open_image(tmp_path: Path, vectors: Path) -> None:
    trace = tmp_path / "trace.bin"
    shutil.copy(vectors / "trace/trace.bin", trace)
    svc = _service(tmp_path, concurrency=3)
    with open_image(stack_config(vectors, recordTracePath=str(trace)), svc) as img:
        rp = img.prefetcher
        assert isinstance(rp, TraceReplayer) and rp.concurrency == 3
        assert disk_sha(img) == L01_SHA  # reads race with the replay; both are right
        assert rp.wait(WAIT) and rp.errors == 0 and rp.pieces_read == 46
    assert not Path(f"{trace}.lock").exists() and not Path(f"{trace}.ok").exists()


def test_acceleration_layer_trace_replayed(tmp_path: Path, vectors: Path) -> None:
    accel = tmp_path / "accel"
    accel.mkdir()
    shutil.copy(vectors / "trace/trace.bin", accel / "trace")
    doc = {
        "lowers": [*({"file": str(vectors / f)} for f in LAYERS), {"dir": str(accel)}],
        "accelerationLayer": True,
    }
    with open_image(device_config_from_dict(doc)) as img:
        assert disk_sha(img) == L01_SHA
        rp = img.prefetcher
        assert isinstance(rp, TraceReplayer)
        assert rp.wait(WAIT) and rp.records == 54 and rp.pieces_read == 46 and rp.errors == 0


def test_replay_stops_on_close(vectors: Path) -> None:
    """close() lets the reads in flight finish and starts no more."""
    gate = threading.Event()

    class GatedFile(CountingFile):
        def pread_into(self, buf: memoryview, offset: int) -> int:
            n = super().pread_into(buf, offset)
            gate.wait(WAIT)
            return n

    files = [GatedFile(opener.unwrap(LocalFile(vectors / f))) for f in LAYERS]
    try:
        rp = TraceReplayer(str(vectors / "trace/trace.bin"), files, 2, "test-image")
        rp.start()
        wait_for(lambda: len(reads_of(files)) == 2, WAIT, "two reads in flight")
        closer = threading.Thread(target=rp.close)
        closer.start()
        wait_for(rp._stop.is_set, WAIT, "close() to ask the workers to stop")
        gate.set()
        closer.join(WAIT)
        assert not closer.is_alive() and rp.wait(0)
        assert len(reads_of(files)) == 2 and rp.pieces_read == 2
    finally:
        gate.set()
        for f in files:
            f.close()


# --------------------------------------------------------------------------- bad traces


def _service(tmp_path: Path, concurrency: int = 16):
    from overlaybd.config.service import service_config_from_dict

    return service_config_from_dict({"prefetchConfig": {"concurrency": concurrency}}, str(tmp_path / "obd.json"))


def _good_bytes(vectors: Path) -> bytes:
    return (vectors / "trace/trace.bin").read_bytes()


def _bad_size(data: bytes) -> bytes:
    return data[: -RECORD.size]


def _bad_checksum(data: bytes) -> bytes:
    b = bytearray(data)
    b[-1] ^= 0xFF  # last record's offset
    return bytes(b)


def _bad_header(data: bytes) -> bytes:
    return data[:10]


@pytest.mark.parametrize(
    "corrupt, field",
    [(_bad_size, "trace data_size"), (_bad_checksum, "trace checksum"), (_bad_header, "trace header")],
)
def test_bad_trace_warns_and_image_works(tmp_path: Path, vectors: Path, caplog, corrupt, field) -> None:
    trace = tmp_path / "trace.bin"
    trace.write_bytes(corrupt(_good_bytes(vectors)))
    with caplog.at_level(logging.WARNING), open_image(stack_config(vectors, recordTracePath=str(trace))) as img:
        rp = img.prefetcher
        assert isinstance(rp, TraceReplayer)
        assert rp.wait(WAIT) and rp.pieces_read == 0
        assert disk_sha(img) == L01_SHA
    assert f"{trace}: {field}:" in caplog.text


def test_wrong_magic_is_a_priority_list(tmp_path: Path, vectors: Path, caplog) -> None:
    trace = tmp_path / "trace.bin"
    data = bytearray(_good_bytes(vectors))
    data[0] ^= 0xFF
    trace.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING), open_image(stack_config(vectors, recordTracePath=str(trace))) as img:
        rp = img.prefetcher
        assert isinstance(rp, PriorityListReplayer)
        assert rp.wait(WAIT) and rp.pieces_read == 0
        assert disk_sha(img) == L01_SHA
    # the vector stack holds no file system: the list cannot be resolved
    assert f"priority list {trace} not replayed" in caplog.text and "ext4 superblock.s_magic" in caplog.text


def test_out_of_range_records_skipped(tmp_path: Path, vectors: Path, caplog) -> None:
    trace = tmp_path / "trace.bin"
    good = [TraceRecord("R", 1, 4096, 8192), TraceRecord("R", 0, 512, 4096)]
    bad = [
        TraceRecord("R", 7, 4096, 0),  # no such layer
        TraceRecord("R", 0, 4096, -4096),  # negative offset
        TraceRecord("R", 0, 1 << 62, 1 << 40),  # far past the end: must not allocate or loop
        TraceRecord("W", 0, 4096, 0),  # writes are not replayed
    ]
    trace.write_bytes(encode_trace([bad[0], good[0], *bad[1:], good[1]]))
    files = layer_files(vectors)
    try:
        with caplog.at_level(logging.WARNING):
            rp = replay(trace, files)
        assert sorted(reads_of(files)) == [(0, 4096, 512), (1, 8192, 4096)]
        assert rp.errors == 0
        assert f"{trace}: trace record 0 layer_index" in caplog.text
    finally:
        for f in files:
            f.close()


def test_read_errors_are_counted_not_raised(tmp_path: Path, vectors: Path, caplog) -> None:
    class Failing(CountingFile):
        def pread_into(self, buf: memoryview, offset: int) -> int:
            raise OSError(5, "Input/output error")

    files = [Failing(opener.unwrap(LocalFile(vectors / f))) for f in LAYERS]
    try:
        with caplog.at_level(logging.WARNING):
            rp = replay(vectors / "trace/trace.bin", files)
        assert rp.errors == 46 and rp.pieces_read == 0
        assert "prefetch read of source" in caplog.text
    finally:
        for f in files:
            f.close()


# --------------------------------------------------------------------------- real registry


@pytest.mark.registry
def test_replay_fills_registry_cache(tmp_path: Path, vectors: Path) -> None:
    """Layers only in a real docker-registry (behind the counting test proxy): a trace recorded on one
    cache, replayed at the open of an image on a fresh cache, leaves every traced range in the cache,
    so the traced reads then cost no registry traffic while an untraced one still does."""
    from helpers.registry import FaultProxy, Registry, build_layout, device, make_service, need_tools

    need_tools()
    reg = Registry(tmp_path / "registry")
    proxy = FaultProxy(reg.port)
    try:
        blobs = [vectors / "zfile/L0.commit.z_lz4", vectors / "zfile/L1.commit.z_lz4.tar"]
        layers = build_layout(tmp_path / "oci", "v1", blobs)
        reg.push(tmp_path / "oci", "v1", "vec/trace")
        url = f"http://{proxy.host}/v2/vec/trace/blobs"
        # disk ranges backed by data of L0 (0, 8 MiB) and of L1 (9 MiB - 8 KiB); the untraced one is L0 data
        traced = [(4096, 0), (65536, 8 * MiB), (4096, (9 << 20) - 8192)]
        untraced = (4096, 8 * MiB + 900 * 1024)

        def config(**extra):
            return dataclasses.replace(device(url, layers), **extra)

        trace = tmp_path / "trace.bin"
        trace.touch()
        rec_dir = tmp_path / "rec"
        rec_dir.mkdir()
        with open_image(config(record_trace_path=str(trace)), make_service(rec_dir, refill=4096)) as img:
            want = [img.pread(n, off) for n, off in traced]
        assert read_trace(trace)

        cold = tmp_path / "cold"  # control: without the replay the traced reads go to the registry
        cold.mkdir()
        with open_image(config(), make_service(cold, refill=4096)) as img:
            before = proxy.bytes_relayed
            assert [img.pread(n, off) for n, off in traced] == want
            assert proxy.bytes_relayed > before
            untraced_data = img.pread(*untraced)

        fresh = tmp_path / "fresh"
        fresh.mkdir()
        svc = make_service(fresh, refill=4096)
        with open_image(config(record_trace_path=str(trace)), svc) as img:
            rp = img.prefetcher
            assert isinstance(rp, TraceReplayer)
            assert rp.wait(WAIT) and rp.errors == 0 and rp.pieces_read > 0
        before = proxy.bytes_relayed
        with open_image(config(), svc) as img:  # same cache, no trace
            assert [img.pread(n, off) for n, off in traced] == want
            assert proxy.bytes_relayed == before  # open + traced reads: all from the cache
            assert img.pread(*untraced) == untraced_data
            assert proxy.bytes_relayed > before  # the cache was not simply full
    finally:
        proxy.close()
        reg.close()


# --------------------------------------------------------------------------- priority list (ext4)


def _build_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/hello.txt").write_text("hello overlaybd\n")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/big").write_bytes(bytes((7 * i + 3) & 255 for i in range(300_000)))
    lib = root / "usr/lib/many"
    lib.mkdir(parents=True)
    for i in range(300):  # a multi-block (hashed) directory
        (lib / f"entry-with-a-long-name-{i:04d}").write_bytes(bytes([i & 255]) * (100 + i))
    (root / "usr/lib/sub").mkdir()
    with open(root / "usr/lib/sub/sparse", "wb") as f:  # 12 extents: an extent tree of depth 1
        for i in range(12):
            f.seek(i * 5 * 4096)
            f.write(bytes([i + 1]) * 4096)
    (root / "var").mkdir()
    (root / "var/unlisted").write_bytes(b"x" * 50_000)


@pytest.fixture(params=[4096, 1024], ids=["bs4096", "bs1024"])
def ext4_image(request, tmp_path: Path):
    """(committed overlaybd layer holding an ext4 fs made by mkfs.ext4 -d, raw fs image, source tree)."""
    if not shutil.which("mkfs.ext4") or not shutil.which("debugfs"):
        pytest.skip("e2fsprogs (mkfs.ext4, debugfs) needed")
    import subprocess

    src = tmp_path / "tree"
    _build_tree(src)
    raw = tmp_path / "fs.img"
    with open(raw, "wb") as f:
        f.truncate(16 * MiB)  # sparse
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", str(request.param), "-d", str(src), str(raw)], check=True)
    return layer_from_raw(raw), raw, src


def layer_from_raw(raw: Path) -> Path:
    """A committed overlaybd layer (`<raw>.commit`) with the non-zero 64 KiB chunks of a raw disk image."""
    from overlaybd.format import lsmt

    size = raw.stat().st_size
    layer = lsmt.create_rw(f"{raw}.data", f"{raw}.index", size)
    try:
        with open(raw, "rb") as f:
            for off in range(0, size, 64 * 1024):
                chunk = f.read(64 * 1024)
                if chunk.strip(b"\0"):
                    layer.pwrite(chunk, off)
        out = Path(f"{raw}.commit")
        with open(out, "wb") as f:
            lsmt.commit(layer, f)
    finally:
        layer.close()
    return out


def debugfs_ranges(raw: Path, paths: list[str]) -> list[tuple[int, int]]:
    """The data extents (leaf level, no tree blocks) of `paths` as e2fsprogs' debugfs reports them."""
    import re
    import subprocess

    bs = int(
        subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True, check=True)
        .stdout.split("Block size:")[1]
        .split()[0]
    )
    out = []
    for p in paths:
        r = subprocess.run(
            ["debugfs", "-R", f"dump_extents -l {p}", str(raw)], capture_output=True, text=True, check=True
        )
        for m in re.finditer(r"\d+ -\s+\d+\s+(\d+) -\s+(\d+)\s+\d+", r.stdout):
            out.append((int(m[1]) * bs, (int(m[2]) + 1) * bs))
    assert out
    return merge_ranges(out)


class CountingImage(CountingFile):
    def pread(self, size: int, offset: int) -> bytes:
        return self.inner.pread(size, offset)  # metadata lookups, not logged


def test_priority_list_reads_listed_files(tmp_path: Path, ext4_image) -> None:
    layer, raw, src = ext4_image
    listing = tmp_path / "prio.list"
    listing.write_text("/etc/hello.txt\n/usr/lib/*\n\nrelative/ignored\n/no/such/file\n/usr/bin/big\n")
    with open_image(device_config_from_dict({"lowers": [{"file": str(layer)}]})) as img:
        counting = CountingImage(img)
        rp = PriorityListReplayer(str(listing), counting, 3, "test-image")
        rp.start()
        assert rp.wait(WAIT) and rp.errors == 0
        got = merge_ranges((off, off + n) for off, n in counting.reads)
        assert max(n for _, n in counting.reads) <= MAX_PIECE
    under_lib = [f"/{p.relative_to(src)}" for p in (src / "usr/lib").rglob("*")]
    assert got == debugfs_ranges(raw, ["/etc/hello.txt", "/usr/bin/big", "/usr/lib", *under_lib])
    assert rp.missing == ["/no/such/file"]


def test_priority_list_through_open_image(tmp_path: Path, ext4_image) -> None:
    layer, raw, _src = ext4_image
    listing = tmp_path / "prio.list"
    listing.write_text("/usr/\n")
    cfg = device_config_from_dict({"lowers": [{"file": str(layer)}], "recordTracePath": str(listing)})
    with open_image(cfg) as img:
        rp = img.prefetcher
        assert isinstance(rp, PriorityListReplayer)
        assert rp.wait(WAIT) and rp.errors == 0 and rp.pieces_read > 0 and not rp.missing
        assert img.pread(4096, 0) == raw.read_bytes()[:4096]


def test_priority_list_too_big(tmp_path: Path, vectors: Path, caplog) -> None:
    listing = tmp_path / "prio.list"
    listing.write_text("/usr/bin/x\n" * 7000)  # 70 000 bytes > 64 KiB
    with caplog.at_level(logging.WARNING), open_image(stack_config(vectors, recordTracePath=str(listing))) as img:
        assert img.prefetcher.wait(WAIT) and img.prefetcher.pieces_read == 0
        assert disk_sha(img) == L01_SHA
    assert f"{listing}: priority list size:" in caplog.text


def test_priority_list_damaged_fs(tmp_path: Path, ext4_image, caplog) -> None:
    """An inode whose extent header is garbage: a warning naming it, the files listed before it still read."""
    from overlaybd.image.ext4map import Ext4

    _layer, raw, _src = ext4_image
    bad = tmp_path / "bad.img"
    shutil.copy(raw, bad)
    f = LocalFile(bad, writable=True)
    try:
        fs = Ext4(f.pread, str(bad), f.size())
        ino = fs.lookup("/usr/bin/big")
        f.pwrite(b"\xde\xad", fs.inode_offset(ino) + 40)  # i_block starts with the extent header magic
    finally:
        f.close()
    listing = tmp_path / "prio.list"
    listing.write_text("/etc/hello.txt\n/usr/bin/big\n/var/unlisted\n")
    cfg = device_config_from_dict({"lowers": [{"file": str(layer_from_raw(bad))}], "recordTracePath": str(listing)})
    with caplog.at_level(logging.WARNING), open_image(cfg) as img:
        rp = img.prefetcher
        assert rp.wait(WAIT) and rp.pieces_read == 1  # /etc/hello.txt
        assert img.pread(4096, 0) == raw.read_bytes()[:4096]
    assert f"ext4 inode {ino} extent header: expected 0xF30A, found 0xADDE" in caplog.text
