"""The on-disk block cache of registry blobs (`cacheConfig`): per-blob sparse files, refill-size fills, LRU.

Layout under `cacheDir` (blob offsets are file offsets, as upstream's file cache):
  `<digest>`       sparse data file, same offsets as the blob
  `<digest>.meta`  128-byte header + one 8-byte record per 4 KiB page: crc32c, present-mark

Why a checksum per page: the data write and the record write are two steps, a
crash or an out-of-band truncation/bit-rot can leave a record pointing at wrong
bytes. A page whose crc32c does not match is treated as absent (dropped and
refetched), so the cache never serves torn or corrupt data. Records are written
after the data they describe; concurrent readers (threads or processes) either see
no record (and fetch themselves — fills are idempotent) or a record whose page can
be verified. Nothing is kept only in memory, so the cache survives a restart.

Each open verifies a page once (then trusts an in-memory bitmap); whoever evicts
a blob bumps a generation in its header first, so other openers re-verify.

Eviction is whole blobs, least recently used first (meta mtime, touched on use),
when the total exceeds the capacity's risk mark, down to its water mark
(upstream's marks). An evicted blob's files are truncated then unlinked; a blob
open in this process is truncated in place. Reading through the cache (fills,
readahead) is in cached_blob.py.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import threading
from array import array
from dataclasses import dataclass
from typing import Any

from crc32c import crc32c

from .audit import AuditLog
from .metrics import METRICS

log = logging.getLogger(__name__)

PAGE = 4096
MAGIC = b"OBDCACH1"
HEADER = struct.Struct("<8sIIQ96s")  # magic, page size, generation, blob size, digest
GEN_OFFSET = 12  # u32 bumped by whoever evicts the blob; readers holding it open notice and re-verify
HEADER_SIZE = 128
MARK = 0x4F424431  # "OBD1": the page is present
TOUCH_INTERVAL = 10.0
GiB = 1 << 30


def water_marks(capacity: int) -> tuple[int, int]:
    """(water, risk): evict when above risk, down to water (upstream cache_pool rule)."""
    water = max(int(capacity * 0.9), capacity - 50 * GiB)
    risk = max(capacity - 5 * GiB, (water + capacity) // 2)
    return water, risk


@dataclass
class CacheEntry:
    digest: str
    blob_size: int
    disk_bytes: int
    present_bytes: int
    last_used: float


class BlockCache:
    """All cached blobs under one directory, with a capacity shared by this process's readers."""

    def __init__(self, cache_dir: str, capacity: int, refill_size: int = 262144, audit: AuditLog | None = None) -> None:
        if refill_size <= 0 or refill_size % PAGE or refill_size & (refill_size - 1):
            raise ValueError(f"cacheConfig.refillSize: must be a power of 2 and a multiple of 4096, got {refill_size}")
        self.dir = cache_dir
        self.capacity = capacity
        self.refill = refill_size
        self.audit = audit or AuditLog("", False)
        self._open: dict[str, BlobStore] = {}
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        os.makedirs(cache_dir, exist_ok=True)
        self.used = sum(e.disk_bytes for e in self.entries())

    # ----------------------------------------------------------- blob files

    def data_path(self, digest: str) -> str:
        return os.path.join(self.dir, digest)

    def cached_size(self, digest: str) -> int | None:
        """Blob size recorded in the cache header of `digest`, if this blob has cache files."""
        try:
            with open(self.data_path(digest) + ".meta", "rb") as f:
                hdr = f.read(HEADER_SIZE)
        except OSError:
            return None
        if len(hdr) != HEADER_SIZE or hdr[:8] != MAGIC:
            return None
        return HEADER.unpack(hdr[: HEADER.size])[3]

    def open_blob(self, digest: str, blob_size: int) -> BlobStore:
        if "/" in digest or digest.startswith("."):
            raise ValueError(f"digest {digest!r} cannot name a cache file")
        with self._lock:
            st = self._open.get(digest)
            if st is None or st.closed:
                st = self._open[digest] = BlobStore(self, digest, blob_size)
            st.refs += 1
            return st

    def release(self, store: BlobStore) -> None:
        with self._lock:
            store.refs -= 1
            if store.refs <= 0 and self._open.get(store.digest) is store:
                del self._open[store.digest]
                store.close_files()

    def account(self, nbytes: int) -> None:
        """Called after a fill added `nbytes` to the cache; evicts when over the risk mark."""
        self.used += nbytes
        _, risk = water_marks(self.capacity)
        if self.used > risk:
            self.evict()

    # ------------------------------------------------------------- listing

    def entries(self) -> list[CacheEntry]:
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for name in names:
            if name.endswith(".meta") or name.startswith("."):
                continue
            dp = os.path.join(self.dir, name)
            try:
                st = os.stat(dp)
            except FileNotFoundError:
                continue
            blob_size, present, mtime, meta_bytes = 0, 0, st.st_mtime, 0
            try:
                with open(dp + ".meta", "rb") as f:
                    mst = os.fstat(f.fileno())
                    mtime, meta_bytes = mst.st_mtime, mst.st_blocks * 512
                    hdr = f.read(HEADER_SIZE)
                    if len(hdr) == HEADER_SIZE and hdr[:8] == MAGIC:
                        blob_size = HEADER.unpack(hdr[: HEADER.size])[3]
                        recs = array("I")
                        recs.frombytes(f.read()[: ((mst.st_size - HEADER_SIZE) // 8) * 8])
                        present = min(recs[1::2].count(MARK) * PAGE, blob_size)
            except FileNotFoundError:
                pass
            out.append(CacheEntry(name, blob_size, st.st_blocks * 512 + meta_bytes, present, mtime))
        return out

    # ------------------------------------------------------------- eviction

    def evict(self, target: int | None = None, reason: str = "cache") -> int:
        """Remove least-recently-used blobs until usage <= target (default: the water mark)."""
        with self._evict_lock:
            water, _ = water_marks(self.capacity)
            target = water if target is None else target
            entries = sorted(self.entries(), key=lambda e: e.last_used)
            used = sum(e.disk_bytes for e in entries)
            freed = 0
            for e in entries:
                if used <= target:
                    break
                self.remove(e.digest)
                used -= e.disk_bytes
                freed += e.disk_bytes
            self.used = used
            if freed:
                METRICS.add("evicted_bytes", freed)
                self.audit.event(
                    "eviction",
                    actualEvict=freed,
                    evictByCache=freed if reason == "cache" else 0,
                    evictByDisk=freed if reason == "disk" else 0,
                    totalUsed_=used,
                )
            return freed

    def remove(self, digest: str) -> None:
        """Drop one blob: bump its generation, truncate (frees space even if another process holds it
        open), then unlink. The meta file is never cut below its header, which readers keep mapped."""
        with self._lock:
            st = self._open.get(digest)
        if st is not None:
            st.reset_files()
            return
        dp = self.data_path(digest)
        try:
            fd = os.open(dp + ".meta", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            try:
                raw = os.pread(fd, 4, GEN_OFFSET)
                if len(raw) == 4:
                    os.pwrite(fd, struct.pack("<I", (struct.unpack("<I", raw)[0] + 1) & 0xFFFFFFFF), GEN_OFFSET)
                if os.fstat(fd).st_size > HEADER_SIZE:
                    os.ftruncate(fd, HEADER_SIZE)
            finally:
                os.close(fd)
        for path, keep in ((dp, 0), (dp + ".meta", None)):
            try:
                if keep is not None:
                    os.truncate(path, keep)
                os.unlink(path)
            except FileNotFoundError:
                pass

    def clear(self) -> int:
        return self.evict(target=0, reason="clear")


class BlobStore:
    """The cache files of one blob; shared by every reader of that blob in this process."""

    def __init__(self, cache: BlockCache, digest: str, blob_size: int) -> None:
        self.cache = cache
        self.digest = digest
        self.size = blob_size
        self.refs = 0
        self.closed = False
        self.npages = (blob_size + PAGE - 1) // PAGE
        self._lock = threading.Lock()
        self.last_touch = 0.0
        self.disabled = False  # set after an unrecoverable cache write error (e.g. disk full)
        # Pages whose crc32c this open has checked (or written). Re-checking every read would cost more
        # than the read itself; the header generation tells us when someone else evicted the blob.
        self.verified = bytearray(self.npages)
        self._open_files()

    def _open_files(self) -> None:
        dp = self.cache.data_path(self.digest)
        self.data_fd = os.open(dp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self.meta_fd = os.open(dp + ".meta", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            os.close(self.data_fd)
            raise
        try:
            hdr = os.pread(self.meta_fd, HEADER_SIZE, 0)
            want = HEADER.pack(MAGIC, PAGE, 0, self.size, self.digest.encode()[:96]).ljust(HEADER_SIZE, b"\0")
            same = (
                len(hdr) == HEADER_SIZE
                and hdr[:GEN_OFFSET] == want[:GEN_OFFSET]
                and hdr[GEN_OFFSET + 4 :] == want[GEN_OFFSET + 4 :]
            )
            if not same:
                if hdr:
                    log.warning("cache %s: header does not match this blob; starting it afresh", self.digest)
                os.ftruncate(self.data_fd, 0)
                if os.pwrite(self.meta_fd, want, 0) != HEADER_SIZE:
                    raise OSError(errno.ENOSPC, f"cache {self.digest}: short header write")
                os.ftruncate(self.meta_fd, HEADER_SIZE)
            self._hdr = mmap.mmap(self.meta_fd, HEADER_SIZE)
            # The generation as a u32 view of the mapped header: read twice per warm read, so no struct call.
            # Native order == the header's little-endian on every platform Flatcar ships (amd64, arm64).
            self.genv = memoryview(self._hdr)[GEN_OFFSET : GEN_OFFSET + 4].cast("I")
        except OSError:
            os.close(self.data_fd)
            os.close(self.meta_fd)
            raise
        self.gen = self.generation()

    def generation(self) -> int:
        return self.genv[0]

    def reset_files(self) -> None:
        """Evicted while open here: bump the generation, truncate in place (fds stay valid for concurrent
        readers), keep the header."""
        with self._lock:
            gen = (self.generation() + 1) & 0xFFFFFFFF
            struct.pack_into("<I", self._hdr, GEN_OFFSET, gen)
            os.ftruncate(self.data_fd, 0)
            os.ftruncate(self.meta_fd, HEADER_SIZE)
            self.verified[:] = bytes(self.npages)
            self.gen = gen

    def fast_read(self, view: memoryview, offset: int) -> bool:
        """Read already-verified pages straight into `view` (any alignment); False -> take the checked path."""
        gen = self.gen
        if self.generation() != gen:
            self.verified[:] = bytes(self.npages)
            self.gen = self.generation()
            return False
        if self.verified.find(0, offset // PAGE, (offset + len(view) + PAGE - 1) // PAGE) != -1:
            return False
        if os.preadv(self.data_fd, [view], offset) != len(view):
            self.verified[:] = bytes(self.npages)  # truncated under us: trust nothing we checked before
            return False
        return self.generation() == gen  # evicted during the read: the bytes may be from the new, empty file

    def close_files(self) -> None:
        with self._lock:
            if not self.closed:
                self.genv.release()
                self._hdr.close()
                os.close(self.data_fd)
                os.close(self.meta_fd)
                self.closed = True

    def touch(self, now: float) -> None:
        """Mark the blob recently used (meta mtime drives LRU), at most every TOUCH_INTERVAL."""
        self.last_touch = now
        try:
            os.utime(self.meta_fd)
        except OSError:
            pass

    def records(self, first: int, count: int) -> array:
        """crc/mark pairs of pages [first, first+count); absent pages read as zeros."""
        raw = os.pread(self.meta_fd, count * 8, HEADER_SIZE + first * 8)
        recs = array("I")
        recs.frombytes(raw[: len(raw) // 8 * 8])
        if len(recs) < count * 2:
            recs.frombytes(bytes((count * 2 - len(recs)) * 4))
        return recs

    def drop_pages(self, first: int, count: int) -> None:
        self.verified[first : first + count] = bytes(count)
        os.pwrite(self.meta_fd, bytes(count * 8), HEADER_SIZE + first * 8)

    def read_verified(self, start: int, view: memoryview) -> bool:
        """Read page-aligned `start`..`start+len(view)` into view; False if any page is absent or corrupt."""
        first = start // PAGE
        count = (len(view) + PAGE - 1) // PAGE
        recs = self.records(first, count)
        if recs[1::2].count(MARK) != count:
            return False
        n = os.preadv(self.data_fd, [view], start)
        if n != len(view):
            return False
        for i in range(count):
            if crc32c(view[i * PAGE : (i + 1) * PAGE]) != recs[2 * i]:
                METRICS.add("cache_corrupt_blocks")
                log.warning("cache %s: page at %d has a bad checksum; dropping it", self.digest, (first + i) * PAGE)
                self.drop_pages(first + i, 1)
                return False
        self.verified[first : first + count] = b"\x01" * count
        return True

    def store(self, start: int, data: memoryview) -> None:
        """Write a fetched page-aligned span, then its records. Errors (disk full) disable caching of this blob."""
        if self.disabled:
            return
        first = start // PAGE
        count = (len(data) + PAGE - 1) // PAGE
        recs = array("I", bytes(count * 8))
        for i in range(count):
            recs[2 * i] = crc32c(data[i * PAGE : (i + 1) * PAGE], 0, 1)  # 1: without the GIL (readers, fetchers)
            recs[2 * i + 1] = MARK
        try:
            before = self.records(first, count)[1::2].count(MARK)
            done = 0
            while done < len(data):
                done += os.pwrite(self.data_fd, data[done:], start + done)
            os.pwrite(self.meta_fd, recs.tobytes(), HEADER_SIZE + first * 8)
            self.verified[first : first + count] = b"\x01" * count
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                log.warning("cache %s: disk full (%s); serving this blob from the registry", self.digest, e)
                METRICS.error("cache_full")
                try:
                    self.drop_pages(first, count)
                except OSError:
                    pass
                self.cache.evict(target=int(self.cache.used * 0.9), reason="disk")  # LRU first; this blob is newest
                return
            log.warning("cache %s: write failed (%s); not caching", self.digest, e)
            METRICS.error("cache_write")
            self.disabled = True
            return
        self.cache.account((count - before) * PAGE)


_caches: dict[str, BlockCache] = {}
_caches_lock = threading.Lock()


def cache_for(service: Any, audit: AuditLog | None = None) -> BlockCache | None:
    """The process-wide BlockCache of the service's cacheConfig (None for cacheType `download`)."""
    cc = service.cache_config
    if cc.cache_type == "download":
        return None
    with _caches_lock:
        c = _caches.get(cc.cache_dir)
        if c is None:
            c = _caches[cc.cache_dir] = BlockCache(cc.cache_dir, cc.cache_size_gb * GiB, cc.refill_size, audit)
        return c
