"""Reading a registry blob through the block cache: refill-size fills, in-flight tracking, readahead.

`CachedBlob` is the RandomAccessFile the remote layer hands to the tar/ZFile/LSMT readers. A warm
read is one `preadv` into the caller's buffer (pages already verified by this open). A miss
fetches the refill-size blocks it touches, one request per run of missing blocks; fetched bytes
serve the reader (and any reader waiting for the same blocks) straight from memory while a
writer thread stores them, so cache-disk latency is off the read path. Sequential streams get
asynchronous readahead in large requests from a small worker pool.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .audit import AuditLog
from .cache import MARK, PAGE, TOUCH_INTERVAL, BlobStore
from .memcopy import copy_into
from .metrics import METRICS

log = logging.getLogger(__name__)

_preadv = os.preadv
READAHEAD_MAX = 32 << 20
# Readahead is fetched in pieces of at most this size: a reader waits only for the piece it needs, not the
# whole window, and the two workers download consecutive pieces over two connections.
READAHEAD_PIECE = 16 << 20
Fetch = Callable[[int, memoryview], int]  # (offset, buffer) -> bytes read, from the source
Buffer = bytearray | mmap.mmap  # a pooled fetch buffer
POOL_CLASS_MIN = 1 << 20  # fetch buffers from this size on come in power-of-two classes (see _BufferPool)


class CachedBlob:
    """RandomAccessFile over a remote blob through the BlockCache: misses fetch refill-size aligned blocks.

    Sequential readers get asynchronous readahead: big ranges (up to READAHEAD_MAX) are fetched by
    a small shared worker pool ahead of the reader, so registry round trips overlap with the
    reader's own work. Blocks being fetched are tracked so no two fetches of a block overlap and a
    reader that needs an in-flight block waits for it instead of fetching it again.
    """

    def __init__(self, name: str, store: BlobStore, fetch: Fetch, audit: AuditLog | None = None) -> None:
        self.name = name
        self.store = store
        self._size = store.size
        self.fetch = fetch
        self.refill = store.cache.refill
        self.audit = audit or store.cache.audit
        self._seq_end = -1
        self._ra = self.refill
        self._frontier = 0  # end of the furthest readahead submitted
        self._streak = 0  # bytes read back to back so far
        self._inflight: dict[int, _Pending] = {}  # block offset -> the fetch covering it
        self._lock = threading.Lock()
        self._reads = 0
        # for the inline warm path: fixed for the store's life (the bitmap is cleared in place, never replaced)
        self._genv = store.genv
        self._verified = store.verified
        self._fd = store.data_fd

    def size(self) -> int:
        return self._size

    def pread(self, size: int, offset: int) -> bytes:
        buf = bytearray(max(0, min(size, self._size - offset)))
        n = self.pread_into(memoryview(buf), offset)
        return bytes(buf[:n])

    def fd_span(self, offset: int, length: int) -> tuple[int, int] | None:
        """(cache data fd, offset) when every page of the span is cached and verified, else None.

        For the ZFile reader's one-call block read: it checks the block CRC, so a page evicted or
        refilled under the read is caught there and the read goes through pread_into instead."""
        end = offset + length
        if (
            length <= 0
            or offset < 0
            or end > self._size
            or self._genv[0] != self.store.gen
            or self._verified.find(0, offset >> 12, (end + 4095) >> 12) >= 0
        ):
            return None
        METRICS.cache_hits += 1
        self._reads += 1
        if not self._reads & 1023:  # keep the blob recent for the LRU, as warm pread_into does
            self._touch()
        return (self._fd, offset)

    def pread_into(self, buf: memoryview, offset: int) -> int:
        """Warm reads are handled inline (one preadv between two generation checks); the rest in _pread.

        Every step counts here (a warm 4 KiB read through the image stack is this and a preadv): the mapped
        generation, the bitmap and the fd are bound at open, and a one-page read indexes the bitmap."""
        n = len(buf)
        end = offset + n
        gen = self.store.gen
        genv = self._genv
        verified = self._verified
        if (
            genv[0] == gen
            and end <= self._size
            and n
            and (
                verified[offset >> 12]
                if n <= 4096 and not offset & 4095
                else verified.find(0, offset >> 12, (end + 4095) >> 12) < 0
            )
            and _preadv(self._fd, [buf], offset) == n
            and genv[0] == gen
        ):
            METRICS.cache_hits += 1  # unlocked on purpose: hot path; a lost increment is harmless
            if offset == self._seq_end:
                self._seq_end = end
                self._sequential(end, n)
            else:
                self._seq_end = end
                if self._streak:
                    self._ra, self._frontier, self._streak = self.refill, 0, 0
            self._reads += 1
            if not self._reads & 1023:
                self._touch()
            return n
        return self._pread(buf, offset)

    def _touch(self) -> None:
        """Mark the blob recently used for the cache's LRU (at most once per TOUCH_INTERVAL); warm hits
        call it every 1024 reads so the hot path itself reads no clock."""
        t = time.monotonic()
        st = self.store
        if t - st.last_touch > TOUCH_INTERVAL:
            st.touch(t)

    def _pread(self, buf: memoryview, offset: int) -> int:
        size = self._size
        n = len(buf)
        if offset + n > size:
            if offset >= size:
                return 0
            n = size - offset
            buf = buf[:n]
        elif n == 0:
            return 0
        st = self.store
        if st.failed:  # the blob did not match its digest: none of it is trusted
            raise OSError(errno.EIO, f"{self.name}: {st.failed}")
        if st.held:  # readahead in flight completes the blob: no read succeeds before its digest check
            self._await_verdict()
            st.release_fast_path()
        sequential = offset == self._seq_end
        self._seq_end = offset + n
        t0 = time.monotonic()
        if t0 - st.last_touch > TOUCH_INTERVAL:
            st.touch(t0)
        if st.fast_read(buf, offset):  # the common warm case: one preadv, nothing else
            METRICS.cache_hits += 1  # unlocked on purpose: hot path; a lost increment is harmless
            if sequential:
                self._sequential(offset + n, n)
            elif self._streak:
                self._ra, self._frontier, self._streak = self.refill, 0, 0
            return n
        a = offset // PAGE * PAGE
        b = min((offset + n + PAGE - 1) // PAGE * PAGE, size)
        if a == offset and b == offset + n:
            hit = st.read_verified(a, buf)
        else:
            tmp = memoryview(bytearray(b - a))
            hit = st.read_verified(a, tmp)
            if hit:
                buf[:] = tmp[offset - a : offset - a + n]
        if hit:
            METRICS.cache_hits += 1
            lat = time.monotonic() - t0
            if lat >= 0.001:
                self.audit.event("file:read", pathname=self.name, offset=offset, size=n, latency=int(lat * 1e6))
        else:
            METRICS.cache_misses += 1
        if sequential:
            self._sequential(offset + n, n)
        else:
            self._ra, self._frontier, self._streak = self.refill, 0, 0
        if not hit:
            try:
                self._fill(buf, offset)
            except OSError as e:  # the one ERROR line per failed read (the client retried quietly until its deadline)
                log.error("%s: read of %d bytes at offset %d failed: %s", self.name, n, offset, e)
                raise
        return n

    def _sequential(self, end: int, n: int) -> None:
        """Readahead proportional to the bytes read in this sequential streak (2x, capped): many small
        contiguous reads (a ZFile walking its blocks) do not balloon it, a long stream does."""
        self._streak += n
        self._ra = min(2 * self._streak, READAHEAD_MAX)
        self._maybe_readahead(end)

    # ----------------------------------------------------------------- fills

    def _claim(self, blocks: list[int], piece: int = 0, hold: bool = True) -> tuple[list[_Pending], list[_Pending]]:
        """Create pending fetches for blocks not yet in flight (one per run); return (ours, others').

        Every pending returned is referenced for the caller when `hold` (release with _unref after
        copying its data), so its pooled buffer is not reused under the caller's feet."""
        mine: list[_Pending] = []
        waits: list[_Pending] = []
        with self._lock:
            free = []
            for blk in blocks:
                p = self._inflight.get(blk)
                if p is None:
                    free.append(blk)
                elif p not in waits:
                    waits.append(p)
                    p.refs += 1
            for rs, re_ in self._runs(free, piece):
                p = _Pending(rs, re_)
                p.refs = 2 if hold else 1  # the cache writer's reference, and the caller's
                mine.append(p)
                for blk in range(rs, re_, self.refill):
                    self._inflight[blk] = p
        return mine, waits

    def _done(self, p: _Pending) -> None:
        """The pending fetch is stored (or failed): later readers go to the cache files again."""
        with self._lock:
            for blk in range(p.start, p.end, self.refill):
                if self._inflight.get(blk) is p:
                    del self._inflight[blk]
        p.ready.set()
        p.finished.set()

    def _unref(self, p: _Pending) -> None:
        """Drop one reference to p; the last one gives its buffer back to the pool."""
        with self._lock:
            p.refs -= 1
            if p.refs or p.buf is None:
                return
            buf, p.buf, p.data = p.buf, None, None
        _BUFFERS.put(buf)

    def flush(self) -> None:
        """Wait until every fetch of this blob in flight has been written to the cache files."""
        while True:
            with self._lock:
                pending = list(set(self._inflight.values()))
            if not pending:
                return
            for p in pending:
                p.finished.wait()

    def _runs(self, blocks: list[int], piece: int = 0) -> list[tuple[int, int]]:
        """Contiguous blocks merged into runs (each at most `piece` bytes when piece > 0)."""
        runs: list[list[int]] = []
        for blk in blocks:
            bend = min(blk + self.refill, self._size)
            if runs and runs[-1][1] == blk and (not piece or bend - runs[-1][0] <= piece):
                runs[-1][1] = bend
            else:
                runs.append([blk, bend])
        return [(a, b) for a, b in runs]

    def _fetch(self, p: _Pending) -> None:
        """Fetch p's range; its data is usable by waiters as soon as it arrives, stored to disk afterwards."""
        buf = _BUFFERS.get(p.end - p.start)  # reused: no zeroing and page faults per fetch
        data = memoryview(buf)[: p.end - p.start]
        p.epoch = self.store.mismatches
        t0 = time.monotonic()
        try:
            got = self.fetch(p.start, data)
            if got != len(data):
                raise OSError(errno.EIO, f"{self.name}: source returned {got} of {len(data)} bytes at {p.start}")
        except BaseException:
            _BUFFERS.lost()
            self._done(p)
            self._unref(p)
            raise
        self.audit.event(
            "download", pathname=self.name, offset=p.start, size=got, latency=int((time.monotonic() - t0) * 1e6)
        )
        p.buf = buf
        p.data = data
        p.ready.set()
        st = self.store
        cache = st.cache
        with cache._lock:
            st.refs += 1  # keep the files open until the write has landed

        def write() -> None:
            try:
                st.store(p.start, data, p.epoch)
            except Exception as e:  # a failed cache write only costs a later refetch
                log.warning("%s: cache write failed: %s", self.name, e)
            finally:
                self._done(p)
                self._unref(p)
                cache.release(st)
                _WRITES.release(len(data))

        _WRITES.acquire(len(data))
        _writer_pool().submit(write)

    def _fill(self, view: memoryview, offset: int) -> None:
        """Serve present blocks from disk, wait for in-flight ones, fetch the rest (one request per run)."""
        st = self.store
        mismatches = st.mismatches
        R = self.refill
        end = offset + len(view)
        missing: list[int] = []
        blk = offset // R * R
        while blk < end:
            bend = min(blk + R, self._size)
            if blk in self._inflight:
                missing.append(blk)
            else:
                tmp = memoryview(bytearray(bend - blk))
                if st.read_verified(blk, tmp):
                    self._copy_out(view, offset, blk, tmp)
                else:
                    missing.append(blk)
            blk = bend
        mine, waits = self._claim(missing)
        for i, p in enumerate(mine):
            try:
                self._fetch(p)
            except BaseException:
                for q in mine[i:]:
                    self._unref(q)  # the caller's reference
                for q in mine[i + 1 :]:  # never fetched: let anyone waiting on them fetch for themselves
                    self._done(q)
                    self._unref(q)
                for q in waits:
                    self._unref(q)
                raise
            self._copy_out(view, offset, p.start, p.data)  # type: ignore[arg-type]
            self._unref(p)
        try:
            for p in waits:
                p.ready.wait()
                data = p.data
                if data is not None and p.epoch == mismatches:
                    self._copy_out(view, offset, p.start, data)
                    continue
                # the other fetch failed, or began before a digest mismatch verdict (its bytes may be the blamed
                # source's): read what we need ourselves (cache first)
                lo, hi = max(p.start, offset // R * R), min(p.end, end)
                for blk in range(lo, hi, R):
                    bend = min(blk + R, self._size)
                    tmp = memoryview(bytearray(bend - blk))
                    if not st.read_verified(blk, tmp):
                        got = self.fetch(blk, tmp)
                        if got != len(tmp):
                            raise OSError(errno.EIO, f"{self.name}: source returned {got} of {len(tmp)} bytes at {blk}")
                    self._copy_out(view, offset, blk, tmp)
        finally:
            for p in waits:
                self._unref(p)
        self._await_verdict(mismatches)

    def _await_verdict(self, mismatches: int = -1) -> None:
        """If this fill leaves no page of the blob missing (all on disk or in flight), wait until they are
        stored and the whole-blob digest check has run: the read that completes a blob whose content does
        not match its digest fails (EIO) instead of ending a full read in success. So does a fill during
        which such a verdict was reached (`mismatches`: the count when it started), even when the blob is
        then refetched from another source: its bytes may be the wrong ones."""
        st = self.store
        if not (st.complete or st.disabled):
            pending = self._completing()
            for p in pending:
                p.finished.wait()
            if pending and st.failed:
                raise OSError(errno.EIO, f"{self.name}: {st.failed}")
        if mismatches >= 0 and st.mismatches != mismatches:
            why = st.failed or st.mismatch_note or "the blob did not match its digest during this read"
            raise OSError(errno.EIO, f"{self.name}: {why}")

    def _completing(self) -> set[_Pending]:
        """The fetches in flight if, once stored, no page of the blob is missing; else an empty set."""
        st = self.store
        with self._lock:
            pending = set(self._inflight.values())
        flying = sum((p.end - p.start + PAGE - 1) // PAGE for p in pending)
        return pending if pending and st.present + flying >= st.npages else set()

    @staticmethod
    def _copy_out(view: memoryview, offset: int, start: int, data: memoryview) -> None:
        lo, hi = max(start, offset), min(start + len(data), offset + len(view))
        if lo < hi:
            copy_into(view[lo - offset : hi - offset], data[lo - start : hi - start])

    def _maybe_readahead(self, end: int) -> None:
        """Keep up to `_ra` bytes beyond the reader fetched or in flight, in large asynchronous requests."""
        st = self.store
        if self._ra < 4 * self.refill or st is None or st.disabled or end >= self._size:
            return
        if st.cache.full_until > time.monotonic():
            return  # nothing would be cached: readers fetch what they need themselves
        R = self.refill
        # Window edges on refill (so page) boundaries: `_ra` counts raw bytes, fills must not.
        start = max(self._frontier, (end + R - 1) // R * R)
        piece = min(READAHEAD_PIECE, self._ra // 2) if READAHEAD_PIECE else self._ra // 2
        if start - end > self._ra - piece or start >= self._size:  # top up once a piece's worth was consumed
            return
        stop = min((start + self._ra) // R * R, self._size)
        if stop <= start:
            return
        first = start // PAGE
        recs = st.records(first, (stop - start + PAGE - 1) // PAGE)  # one pread for the whole window
        blocks = [blk for blk in range(start, stop, R) if recs[2 * (blk // PAGE - first) + 1] != MARK]
        self._frontier = stop
        mine, _ = self._claim(blocks, piece, hold=False)
        if mine and not st.complete and self._completing():
            st.hold_fast_path()
        for p in mine:
            _readahead_pool().submit(self._readahead, p)

    def _readahead(self, p: _Pending) -> None:
        try:
            self._fetch(p)
        except Exception as e:  # readahead is best effort; readers fetch themselves
            log.debug("%s: readahead failed: %s", self.name, e)

    def close(self) -> None:
        if self.store is not None:
            self.flush()
            self.store.cache.release(self.store)
            self.store = None  # type: ignore[assignment]


class _Pending:
    """A range being fetched: `ready` is set when `data` arrived (or the fetch failed: data stays None)."""

    __slots__ = ("start", "end", "data", "buf", "refs", "ready", "finished", "epoch")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.epoch = -1  # the store's `mismatches` when the fetch began
        self.data: memoryview | None = None
        self.buf: Buffer | None = None  # from _BUFFERS; returned when the last reference is dropped
        self.refs = 0
        self.ready = threading.Event()
        self.finished = threading.Event()  # written to the cache files (or given up)


class _ByteBudget:
    """Bounds the fetched-but-not-yet-written bytes (memory) when the cache disk is slower than the network."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.cv = threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cv:
            while self.used > 0 and self.used + n > self.limit:
                self.cv.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self.cv:
            self.used -= n
            self.cv.notify_all()


class _BufferPool:
    """Fetch buffers kept for reuse while a stream runs, by size class (a piece gets a buffer at least its size).

    A fresh bytearray is zeroed (memset, under the GIL) and page-faulted in: for a stream at loopback speed
    that costs as much as another copy of the data, and it stalls the other threads' libcurl callbacks.
    Readahead pieces come in many sizes (the window grows, runs end where the cache already has data), so
    buffers of 1 MiB and more are kept in power-of-two classes (exact sizes missed on half the pieces), and
    fresh ones are private anonymous mappings: the kernel supplies zeroed pages as they are first written,
    without a memset under the GIL. Buffers are kept only while some buffer is still out (a stream or its
    cache writes are running); once all are back, the pool empties, so an idle daemon does not hold this
    memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = 0
        self.out = 0
        self.free: dict[int, list[Buffer]] = {}
        self.lock = threading.Lock()

    def get(self, n: int) -> Buffer:
        """A buffer of at least n bytes (slice it)."""
        cap = n if n < POOL_CLASS_MIN else 1 << (n - 1).bit_length()
        with self.lock:
            self.out += 1
            lst = self.free.get(cap)
            if lst:
                self.kept -= cap
                return lst.pop()
        if cap < POOL_CLASS_MIN:
            return bytearray(cap)
        return mmap.mmap(-1, cap, flags=mmap.MAP_PRIVATE)

    def put(self, buf: Buffer) -> None:
        n = len(buf)
        with self.lock:
            self.out -= 1
            if self.out <= 0:
                self.out = 0
                self.free.clear()
                self.kept = 0
            elif self.kept + n <= self.limit:
                self.free.setdefault(n, []).append(buf)
                self.kept += n

    def lost(self) -> None:
        """A buffer given out will not come back (its fetch failed)."""
        with self.lock:
            self.out = max(0, self.out - 1)


_WRITES = _ByteBudget(64 << 20)
_BUFFERS = _BufferPool(96 << 20)  # the window's pieces in flight plus those waiting for the cache writer
_pools: dict[str, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def _pool(name: str, workers: int) -> ThreadPoolExecutor:
    with _pool_lock:
        p = _pools.get(name)
        if p is None:
            p = _pools[name] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"overlaybd-{name}")
        return p


def _readahead_pool() -> ThreadPoolExecutor:
    return _pool("readahead", 2)


def _writer_pool() -> ThreadPoolExecutor:
    return _pool("cache-writer", 1)
