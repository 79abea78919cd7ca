"""The block cache on its own: the source is a local file read with pread (a real byte source,
standing in for the registry so these run in the fast tier), the cache files are real files."""

from __future__ import annotations

import os
import random
import threading

import pytest
from overlaybd.cli.cache import main as cache_main
from overlaybd.registry.cache import PAGE, BlockCache
from overlaybd.registry.cached_blob import CachedBlob


class Source:
    """Counts what the cache asks the source for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def fetch(self, off: int, view: memoryview) -> int:
        n = min(len(view), len(self.data) - off)
        view[:n] = self.data[off : off + n]
        with self.lock:
            self.calls.append((off, n))
        return n


def _blob(cache: BlockCache, name: str, data: bytes) -> tuple[CachedBlob, Source]:
    src = Source(data)
    return CachedBlob(name, cache.open_blob(name, len(data)), src.fetch), src


def test_refill_alignment_and_readahead(tmp_path):
    data = os.urandom(3 << 20)
    cache = BlockCache(str(tmp_path), 1 << 30, 65536)
    f, src = _blob(cache, "sha256:" + "a" * 64, data)
    assert f.pread(10, 70000) == data[70000:70010]
    assert src.calls == [(65536, 65536)]
    # sequential reads grow the fetch window (readahead) and stay correct
    src.calls.clear()
    off = 0
    while off < len(data):
        assert f.pread(65536, off) == data[off : off + 65536]
        off += 65536
    assert len(src.calls) < len(data) // 65536 // 2
    f.close()


def test_rejects_bad_refill_size(tmp_path):
    with pytest.raises(ValueError, match="refillSize"):
        BlockCache(str(tmp_path), 1 << 30, 5000)


def test_lru_eviction_keeps_recent(tmp_path):
    from overlaybd.registry.audit import AuditLog

    audit = tmp_path / "audit.log"
    cache = BlockCache(str(tmp_path / "c"), 600 * 1024, 65536, AuditLog(str(audit)))  # water 540 KiB
    blobs = []
    for i in range(3):
        data = os.urandom(256 * 1024)
        f, _ = _blob(cache, f"sha256:{i:064x}", data)
        assert f.pread(len(data), 0) == data
        f.flush()
        os.utime(cache.data_path(f"sha256:{i:064x}") + ".meta", (1000 + i, 1000 + i))  # age order 0 < 1 < 2
        blobs.append((f, data))
    names = {e.digest for e in cache.entries() if e.present_bytes}
    assert f"sha256:{0:064x}" not in names and f"sha256:{2:064x}" in names
    assert cache.used <= 600 * 1024
    # the evicted blob still reads correctly (refetched)
    f0, d0 = blobs[0]
    assert f0.pread(1000, 5) == d0[5:1005]
    for f, _ in blobs:
        f.close()
    lines = [x for x in audit.read_text().splitlines() if "|eviction[" in x]
    assert lines and "|AUDIT|th=" in lines[0] and "[actualEvict=" in lines[0] and "[totalUsed_=" in lines[0]


def test_concurrent_readers_and_second_cache_instance(tmp_path):
    data = os.urandom(2 << 20)
    name = "sha256:" + "c" * 64
    c1 = BlockCache(str(tmp_path), 1 << 30, 16384)
    c2 = BlockCache(str(tmp_path), 1 << 30, 16384)  # as another process on the same directory
    f1, _ = _blob(c1, name, data)
    f2, _ = _blob(c2, name, data)
    errors = []

    def worker(f: CachedBlob, seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(200):
            off = rnd.randrange(len(data))
            n = rnd.randrange(1, 40000)
            if f.pread(n, off) != data[off : off + n]:
                errors.append((off, n))

    ts = [threading.Thread(target=worker, args=(f1 if i % 2 else f2, i)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    f1.close()
    f2.close()


def test_corrupt_page_dropped_and_refetched(tmp_path):
    data = os.urandom(256 * 1024)
    name = "sha256:" + "d" * 64
    cache = BlockCache(str(tmp_path), 1 << 30, 65536)
    f, src = _blob(cache, name, data)
    assert f.pread(len(data), 0) == data
    f.close()
    with open(cache.data_path(name), "r+b") as raw:  # bit rot / torn write found at the next open
        raw.seek(PAGE * 3 + 7)
        raw.write(b"\xff\xfe")
    f, src = _blob(cache, name, data)
    assert f.pread(100, PAGE * 3) == data[PAGE * 3 : PAGE * 3 + 100]
    assert src.calls == [(0, 65536)]
    assert f.pread(len(data), 0) == data
    f.close()


def test_eviction_by_another_instance_while_open(tmp_path):
    """Another process (here: a second BlockCache on the same dir) evicts a blob we hold open and verified:
    the generation bump makes us re-check, so the emptied file is never served as data."""
    data = os.urandom(512 * 1024)
    name = "sha256:" + "e" * 64
    mine = BlockCache(str(tmp_path), 1 << 30, 65536)
    other = BlockCache(str(tmp_path), 1 << 30, 65536)
    f, src = _blob(mine, name, data)
    assert f.pread(len(data), 0) == data
    f.flush()
    other.remove(name)  # truncate + unlink, as `overlaybd-cache clear` in another process
    g, _ = _blob(other, name, data)  # ... and someone refills only the tail of the new files
    assert g.pread(4096, len(data) - 4096) == data[-4096:]
    g.close()
    src.calls.clear()
    assert f.pread(8192, 4096) == data[4096:12288]
    assert src.calls  # refetched, not read from the evicted file
    f.close()


def test_cli_ls_prune_clear(tmp_path, capsys):
    cache = BlockCache(str(tmp_path / "c"), 1 << 30, 65536)
    for i in range(2):
        f, _ = _blob(cache, f"sha256:{i:064x}", os.urandom(200_000))
        f.pread(200_000, 0)
        f.close()
    args = ["--cache-dir", str(tmp_path / "c")]
    assert cache_main(args + ["ls"]) == 0
    out = capsys.readouterr().out
    assert f"sha256:{0:064x}" in out and "total 2 blobs" in out
    assert cache_main(args + ["prune", "--max-size", "250KiB"]) == 0
    assert len(cache.entries()) == 1
    assert cache_main(args + ["clear"]) == 0
    capsys.readouterr()
    assert cache_main(args + ["ls", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert cache_main(args + ["prune", "--max-size", "lots"]) == 1
