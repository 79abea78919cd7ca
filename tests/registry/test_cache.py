"""The block cache on its own: the source is a local file read with pread (a real byte source,
standing in for the registry so these run in the fast tier), the cache files are real files."""

from __future__ import annotations

import hashlib
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


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(cache: BlockCache, name: str | None, data: bytes) -> tuple[CachedBlob, Source]:
    """name None: the data's real digest (a blob read in full is checked against it)."""
    src = Source(data)
    name = name or digest(data)
    return CachedBlob(name, cache.open_blob(name, len(data)), src.fetch), src


def test_refill_alignment_and_readahead(tmp_path):
    data = os.urandom(3 << 20)
    cache = BlockCache(str(tmp_path), 1 << 30, 65536)
    f, src = _blob(cache, None, data)
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
    datas = [os.urandom(256 * 1024) for _ in range(3)]
    for i, data in enumerate(datas):
        f, _ = _blob(cache, None, data)
        assert f.pread(len(data), 0) == data
        f.flush()
        os.utime(cache.data_path(digest(data)) + ".meta", (1000 + i, 1000 + i))  # age order 0 < 1 < 2
        blobs.append((f, data))
    names = {e.digest for e in cache.entries() if e.present_bytes}
    assert digest(datas[0]) not in names and digest(datas[2]) in names
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
    name = digest(data)
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
    name = digest(data)
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
    name = digest(data)
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
    datas = [os.urandom(200_000) for _ in range(2)]
    for data in datas:
        f, _ = _blob(cache, None, data)
        f.pread(200_000, 0)
        f.close()
    args = ["--cache-dir", str(tmp_path / "c")]
    assert cache_main(args + ["ls"]) == 0
    out = capsys.readouterr().out
    assert digest(datas[0]) in out and "total 2 blobs" in out
    assert cache_main(args + ["prune", "--max-size", "250KiB"]) == 0
    assert len(cache.entries()) == 1
    assert cache_main(args + ["clear"]) == 0
    capsys.readouterr()
    assert cache_main(args + ["ls", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert cache_main(args + ["prune", "--max-size", "lots"]) == 1


def test_readahead_fills_whole_pages(tmp_path):
    """Reads of odd sizes grow readahead by raw byte counts; every fetch must still start on a refill block
    and end on a page (or at the blob's end), or page records would describe the wrong bytes."""
    data = os.urandom((5 << 20) + 1234)
    cache = BlockCache(str(tmp_path), 1 << 30, 8192)
    f, src = _blob(cache, None, data)
    off = 0
    while off < len(data):
        n = 10007 if off % 3 else 5003
        assert f.pread(n, off) == data[off : off + n]
        off += n
    f.close()
    assert src.calls and all(o % 8192 == 0 and ((o + n) % PAGE == 0 or o + n == len(data)) for o, n in src.calls)
    (e,) = cache.entries()
    assert e.complete and e.present_bytes == len(data)


def test_store_records_whole_pages_only(tmp_path):
    data = os.urandom(5 * PAGE + 100)
    cache = BlockCache(str(tmp_path), 1 << 30, PAGE)
    st = cache.open_blob(digest(data), len(data))
    st.store(100, memoryview(data)[100 : 3 * PAGE + 50])  # neither end on a page: only pages 1, 2 are whole
    marks = st.records(0, st.npages)[1::2]
    assert [m != 0 for m in marks] == [False, True, True, False, False, False]
    st.store(4 * PAGE, memoryview(data)[4 * PAGE :])  # the short tail page is the blob's end: recorded
    assert [m != 0 for m in st.records(0, st.npages)[1::2]] == [False, True, True, False, True, True]
    assert st.present == 4 and not st.complete
    cache.release(st)


def test_records_not_matching_the_data_file_are_dropped_at_open(tmp_path):
    from overlaybd.registry.metrics import METRICS

    data = os.urandom(64 * PAGE)
    name = digest(data)
    cache = BlockCache(str(tmp_path), 1 << 30, 65536)
    f, _ = _blob(cache, name, data)
    assert f.pread(32 * PAGE, 0) == data[: 32 * PAGE]
    f.close()
    os.truncate(cache.data_path(name), 20 * PAGE + 5)  # pages 20.. are gone; their records stay
    with open(cache.data_path(name) + ".meta", "r+b") as m:  # and one record with a garbage mark
        m.seek(128 + 3 * 8 + 4)
        m.write(b"JUNK")
    before = METRICS.cache_corrupt_blocks
    f, src = _blob(cache, name, data)
    assert METRICS.cache_corrupt_blocks - before == 13  # pages 20..31 and page 3
    assert f.store.present == 19
    assert f.pread(len(data), 0) == data
    f.close()


def test_digest_mismatch_fails_the_full_read(tmp_path, caplog):
    """The source serves one wrong byte in a page no checksum can catch (uncompressed): reading the whole blob
    must not end in success, the blob is emptied, and the mismatch is counted."""
    from overlaybd.registry.metrics import METRICS

    good = os.urandom(300_000)
    bad = bytearray(good)
    bad[123_456] ^= 1
    cache = BlockCache(str(tmp_path), 1 << 30, 65536)
    src = Source(bytes(bad))
    f = CachedBlob("blob", cache.open_blob(digest(good), len(good)), src.fetch)
    before = METRICS.errors.get("digest_mismatch", 0)
    with pytest.raises(OSError, match="hashes to sha256:" + hashlib.sha256(bad).hexdigest()) as ei:
        off = 0
        while off < len(good):
            f.pread(65536, off)
            off += 65536
    assert ei.value.errno == 5
    assert METRICS.errors.get("digest_mismatch", 0) == before + 1
    with pytest.raises(OSError):
        f.pread(10, 0)  # and nothing of it is served any more by this open
    f.close()
    (e,) = cache.entries()
    assert e.present_bytes == 0 and not e.complete
    assert "as served by the registry hashes to" in caplog.text


def test_digest_mismatch_blamed_on_a_mirror_refetches_from_the_next_source(tmp_path):
    """When the source of a mismatching blob can be blamed (a mirror, now dropped for the blob), the read that
    found it fails, the blob is not marked failed, and the next full read refetches it and succeeds."""
    good = os.urandom(300_000)
    bad = bytearray(good)
    bad[200_000] ^= 1
    src = Source(bytes(bad))
    blamed: list[str] = []

    def drop_mirror(d: str) -> str:
        blamed.append(d)
        src.data = good  # what the next source (the origin) serves
        return "mirror http://mirror.example"

    cache = BlockCache(str(tmp_path), 1 << 30, 65536)
    st = cache.open_blob(digest(good), len(good))
    st.on_mismatch = drop_mirror
    f = CachedBlob("blob", st, src.fetch)
    with pytest.raises(OSError, match="served by mirror http://mirror.example, not used for this blob again") as ei:
        f.pread(len(good), 0)
    assert ei.value.errno == 5 and not st.failed and blamed == [digest(good)]
    assert f.pread(len(good), 0) == good
    f.flush()
    assert st.complete
    f.close()


def test_blamed_mismatch_during_sequential_readahead_settles_on_the_right_bytes(tmp_path):
    """The same with a sequential reader whose readahead has pieces from the liar in flight when the verdict
    comes: reads may fail (EIO) until the liar's pieces are gone (or none does, when the verdict falls
    between two reads and the reader has not reached the wrong byte yet), but a full read that succeeds
    returns the right bytes, and once every page has been fetched again the blob is complete and verified
    (pages read before the verdict were emptied with the rest: a second pass refetches them)."""
    good = os.urandom(6 << 20)
    bad = bytearray(good)
    bad[5_000_000] ^= 1
    src = Source(bytes(bad))
    cache = BlockCache(str(tmp_path), 1 << 30, 65536)
    st = cache.open_blob(digest(good), len(good))

    def drop_mirror(d: str) -> str:
        src.data = good
        return "mirror http://mirror.example"

    st.on_mismatch = drop_mirror
    f = CachedBlob("blob", st, src.fetch)

    def read_all() -> bytes:
        out = bytearray()
        for off in range(0, len(good), 65536):
            out += f.pread(65536, off)
        return bytes(out)

    failures = 0
    for _ in range(4):
        try:
            got = read_all()
        except OSError as e:
            assert e.errno == 5
            failures += 1
            continue
        assert got == good
        break
    else:
        raise AssertionError("no full read succeeded")
    assert failures <= 2 and not st.failed
    assert read_all() == good
    f.flush()
    assert st.complete
    f.close()


@pytest.mark.parametrize("seed", range(6))
def test_whole_blob_check_whatever_order_pieces_are_stored(tmp_path, seed):
    """The running sha256 is extended from memory for pieces stored at its front and from the data file for
    pieces stored ahead of it (out of order, or while the hasher thread runs): in any order the verdict is
    the blob's, and one wrong byte anywhere fails it."""
    rng = random.Random(seed)
    good = os.urandom(rng.randrange(40, 80) * PAGE + rng.randrange(1, PAGE))
    for wrong in (False, True):
        data = bytearray(good)
        if wrong:
            data[rng.randrange(len(data))] ^= 0x40
        cache = BlockCache(str(tmp_path / f"{seed}-{wrong}"), 1 << 30, 65536)
        st = cache.open_blob(digest(good), len(good))
        cuts = sorted(rng.sample(range(1, st.npages), 6))
        spans = list(zip([0, *cuts], [*cuts, st.npages], strict=True))
        if seed % 2:
            rng.shuffle(spans)
        for a, b in spans:
            st.store(a * PAGE, memoryview(data)[a * PAGE : min(b * PAGE, len(data))])
            if rng.random() < 0.3:
                st._kick_hash()  # the hasher thread racing the writer
        assert (st.complete, bool(st.failed)) == ((False, True) if wrong else (True, False))
        cache.release(st)


def test_cache_touches_only_its_own_files(tmp_path, capsys):
    d = tmp_path / "c"
    cache = BlockCache(str(d), 1 << 30, 65536)
    data = os.urandom(100_000)
    f, _ = _blob(cache, None, data)
    f.pread(len(data), 0)
    f.close()
    foreign = ["notes.txt", "sha256:abc.tmp", ".keep", "sha256:" + "0" * 64 + ".meta.bak", "lost+found"]
    for n in foreign[:-1]:
        (d / n).write_text("not the cache's")
    (d / "lost+found").mkdir()
    (d / ("sha256:" + "1" * 64 + ".meta")).write_bytes(b"")  # an orphan meta file is the cache's own
    assert {e.digest for e in cache.entries()} == {digest(data), "sha256:" + "1" * 64}
    assert cache_main(["--cache-dir", str(d), "clear"]) == 0
    out = capsys.readouterr().out
    assert f"left 5 files the cache did not create: {' '.join(sorted(foreign))}" in out
    assert sorted(os.listdir(d)) == sorted(foreign)
