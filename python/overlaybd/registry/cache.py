"""The on-disk block cache of registry blobs (`cacheConfig`): per-blob sparse files, refill-size fills, LRU.

Layout under `cacheDir` (blob offsets are file offsets, as upstream's file cache):
  `<digest>`       sparse data file, same offsets as the blob
  `<digest>.meta`  128-byte header + one 8-byte record per 4 KiB page: crc32c, present-mark
Only files named like that are the cache's: listing, eviction and `overlaybd-cache clear` leave
anything else in the directory alone.

Whole pages only: a fill is stored page by page from a page-aligned offset; the blob's last page
is the only short one and is recorded only when the fill reaches the blob's end. A page's record
is written after its data, so a crash leaves at most data without a record.

Once every page is present the blob's sha256 is checked against its digest before the header is
marked complete; a mismatch empties the blob and fails its reads (see `BlobStore.verify_complete`).

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
import hashlib
import logging
import mmap
import os
import re
import struct
import threading
import time
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
COMPLETE_OFFSET = 120  # u32 after the packed header: COMPLETE once the whole blob matched its digest
COMPLETE = 0x454E4F44  # "DONE"
MARK = 0x4F424431  # "OBD1": the page is present
TOUCH_INTERVAL = 10.0
FULL_BACKOFF = 5.0  # after ENOSPC, read through without cache writes for this long
FULL_WARN_INTERVAL = 600.0  # one "cache disk full" warning per this many seconds
GiB = 1 << 30
HELD = 1 << 32  # a "generation" no u32 takes: diverts the inline fast path while a digest verdict is due
# An OCI digest (algorithm ":" encoded): the only data-file names the cache creates (plus ".meta").
DIGEST_NAME = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


def is_cache_file(name: str) -> bool:
    """True for the names the cache creates (`<digest>`, `<digest>.meta`); all else is foreign."""
    return DIGEST_NAME.fullmatch(name[:-5] if name.endswith(".meta") else name) is not None


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
    complete: bool = False  # every page present and the blob matched its digest


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
        self.full_until = 0.0  # monotonic time until which fills skip cache writes (disk full)
        self._full_warned = -FULL_WARN_INTERVAL
        self._foreign_warned = False
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
        size: int = HEADER.unpack(hdr[: HEADER.size])[3]
        return size

    def open_blob(self, digest: str, blob_size: int) -> BlobStore:
        if DIGEST_NAME.fullmatch(digest) is None:
            raise ValueError(f"digest {digest!r} cannot name a cache file")
        with self._lock:
            st = self._open.get(digest)
            if st is None or st.closed:
                st = self._open[digest] = BlobStore(self, digest, blob_size)
            st.refs += 1
        if st.present >= st.npages and not st.complete and not st.failed:
            st.verify_complete(at_open=True)  # all pages cached by an earlier run that ended before the check
        return st

    def disk_full(self, digest: str, err: OSError) -> None:
        """ENOSPC/EDQUOT on a cache write: read through for a while, warn once (not per page)."""
        now = time.monotonic()
        self.full_until = now + FULL_BACKOFF
        METRICS.error("cache_full")
        if now - self._full_warned >= FULL_WARN_INTERVAL:
            self._full_warned = now
            log.warning("cache %s is full (%s, writing %s); reading through to the registry", self.dir, err, digest)

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

    def foreign(self) -> list[str]:
        """Names in the directory the cache did not create (left alone by listing, eviction and clear)."""
        try:
            return sorted(n for n in os.listdir(self.dir) if not is_cache_file(n))
        except FileNotFoundError:
            return []

    def entries(self) -> list[CacheEntry]:
        """The cached blobs: digest-named data files and/or their `.meta` (an orphan of either counts)."""
        out: list[CacheEntry] = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        digests = {n[:-5] if n.endswith(".meta") else n for n in names if is_cache_file(n)}
        for name in sorted(digests):
            dp = os.path.join(self.dir, name)
            try:
                st = os.stat(dp)
                data_bytes, mtime = st.st_blocks * 512, st.st_mtime
            except FileNotFoundError:
                data_bytes, mtime = 0, 0.0
            blob_size, present, meta_bytes, complete = 0, 0, 0, False
            try:
                with open(dp + ".meta", "rb") as f:
                    mst = os.fstat(f.fileno())
                    mtime, meta_bytes = mst.st_mtime, mst.st_blocks * 512
                    hdr = f.read(HEADER_SIZE)
                    if len(hdr) == HEADER_SIZE and hdr[:8] == MAGIC:
                        blob_size = HEADER.unpack(hdr[: HEADER.size])[3]
                        complete = struct.unpack_from("<I", hdr, COMPLETE_OFFSET)[0] == COMPLETE
                        recs = array("I")
                        recs.frombytes(f.read()[: ((mst.st_size - HEADER_SIZE) // 8) * 8])
                        present = min(recs[1::2].count(MARK) * PAGE, blob_size)
            except FileNotFoundError:
                if not data_bytes and not mtime:
                    continue  # both gone meanwhile
            out.append(CacheEntry(name, blob_size, data_bytes + meta_bytes, present, mtime, complete))
        return out

    # ------------------------------------------------------------- eviction

    def evict(self, target: int | None = None, reason: str = "cache") -> int:
        """Remove least-recently-used blobs until usage <= target (default: the water mark)."""
        with self._evict_lock:
            water, _ = water_marks(self.capacity)
            target = water if target is None else target
            entries = sorted(self.entries(), key=lambda e: e.last_used)
            used = sum(e.disk_bytes for e in entries)
            if not self._foreign_warned and used > target:
                self._foreign_warned = True
                other = self.foreign()
                if other:
                    log.warning("cache %s: leaving %d files the cache did not create: %s", self.dir, len(other), other)
            freed = 0
            for e in entries:
                if used <= target and target > 0:  # target 0 (clear) also removes empty leftovers
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
                if os.fstat(fd).st_size >= HEADER_SIZE:
                    os.pwrite(fd, bytes(4), COMPLETE_OFFSET)
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
        self.disabled = False  # set after an unrecoverable cache write error
        self.present = 0  # pages with a record (as far as this process knows); npages -> check the digest
        self.complete = False  # every page present and the sha256 matched the digest
        self.failed = ""  # set when the blob's content did not match its digest: reads fail with EIO
        # Digest mismatches seen by this process; a read during which one happened fails (its bytes may be
        # the wrong ones). `on_mismatch(digest)` (set by the remote layer) holds off the mirrors that served
        # the blob and names them: then the blob is refetched from the next source instead of failing.
        self.mismatches = 0
        self.mismatch_note = ""  # what the last one was, for the EIO of the reads it failed
        self.on_mismatch: Callable[[str], str] | None = None
        self.held = False  # fast path diverted until the verdict (see hold_fast_path)
        self._held_gen = 0
        # sha256 of the pages stored in order from offset 0 by this open, so the final check of a blob read
        # sequentially hashes (almost) nothing more; tied to the generation it was computed under.
        self._hash_lock = threading.Lock()
        self._hash = hashlib.sha256()
        self._hashed = 0
        self._hash_gen = -1
        self._hash_queued = False
        self._hash_claim = -1  # start of the span the cache writer is storing (and will hash itself), or -1
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
                and hdr[GEN_OFFSET + 4 : HEADER.size] == want[GEN_OFFSET + 4 : HEADER.size]
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
            self._sweep()
        except OSError:
            os.close(self.data_fd)
            os.close(self.meta_fd)
            raise
        self.gen = self.generation()

    def _sweep(self) -> None:
        """Drop records that cannot describe their page (a mark that is neither absent nor present, or a
        page beyond the data file's end: truncated); count the rest. Checksums are checked on first read."""
        recs = self.records(0, self.npages)
        marks = recs[1::2]
        data_size = os.fstat(self.data_fd).st_size
        whole = self.npages if data_size >= self.size else data_size // PAGE  # pages the data file holds
        bad = []
        if marks[whole:].count(0) != self.npages - whole:
            bad = [i for i in range(whole, self.npages) if marks[i]]
        if marks[:whole].count(MARK) + marks[:whole].count(0) != whole:
            bad += [i for i in range(whole) if marks[i] not in (0, MARK)]
        for i in bad:
            os.pwrite(self.meta_fd, bytes(8), HEADER_SIZE + i * 8)
        self.present = marks.count(MARK) - sum(1 for i in bad if marks[i] == MARK)
        flagged = struct.unpack_from("<I", self._hdr, COMPLETE_OFFSET)[0] == COMPLETE
        self.complete = flagged and not bad and self.present == self.npages
        if flagged and not self.complete:
            struct.pack_into("<I", self._hdr, COMPLETE_OFFSET, 0)
        if bad:
            METRICS.add("cache_corrupt_blocks", len(bad))
            log.warning("cache %s: dropped %d page records that do not match the data file", self.digest, len(bad))

    def generation(self) -> int:
        return self.genv[0]

    def reset_files(self) -> None:
        """Evicted while open here: bump the generation, truncate in place (fds stay valid for concurrent
        readers), keep the header."""
        with self._lock:
            gen = (self.generation() + 1) & 0xFFFFFFFF
            struct.pack_into("<I", self._hdr, GEN_OFFSET, gen)
            struct.pack_into("<I", self._hdr, COMPLETE_OFFSET, 0)
            os.ftruncate(self.data_fd, 0)
            os.ftruncate(self.meta_fd, HEADER_SIZE)
            self.verified[:] = bytes(self.npages)
            self.gen = gen
            self.held = False
            self.present = 0
            self.complete = False

    def hold_fast_path(self) -> None:
        """The pages in flight will complete the blob: send this process's reads through the slow path (which
        waits for the digest check) until release_fast_path, so none succeeds before the verdict."""
        with self._lock:
            if not self.held and not self.closed:
                self.held = True
                self._held_gen = self.gen
                self.gen = HELD

    def release_fast_path(self) -> None:
        with self._lock:
            if self.held:
                self.held = False
                g = self.generation()
                if g != self._held_gen:  # evicted meanwhile: nothing checked before counts
                    self.verified[:] = bytes(self.npages)
                self.gen = g

    def fast_read(self, view: memoryview, offset: int) -> bool:
        """Read already-verified pages straight into `view` (any alignment); False -> take the checked path."""
        gen = self.gen
        if self.held:
            return False
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
        with self._hash_lock, self._lock:  # not under the hasher's feet: it reads our fds
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

    def records(self, first: int, count: int) -> array[int]:
        """crc/mark pairs of pages [first, first+count); absent pages read as zeros."""
        raw = os.pread(self.meta_fd, count * 8, HEADER_SIZE + first * 8)
        recs = array("I")
        recs.frombytes(raw[: len(raw) // 8 * 8])
        if len(recs) < count * 2:
            recs.frombytes(bytes((count * 2 - len(recs)) * 4))
        return recs

    def drop_pages(self, first: int, count: int) -> None:
        """Forget pages [first, first+count): their records become absent (refetched on the next read)."""
        self.verified[first : first + count] = bytes(count)
        was = self.records(first, count)[1::2].count(MARK)
        os.pwrite(self.meta_fd, bytes(count * 8), HEADER_SIZE + first * 8)
        self.present = max(0, self.present - was)

    def read_verified(self, start: int, view: memoryview) -> bool:
        """Read whole pages `start`..`start+len(view)` into view; False if any page is absent or corrupt.

        The span must start on a page and end on one or at the blob's end (a page's checksum covers the
        whole page); any other span is refused (False), never checked against a partial page."""
        end = start + len(view)
        if start % PAGE or (end % PAGE and end != self.size) or end > self.size:
            return False
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

    def store(self, start: int, data: memoryview, epoch: int = -1) -> None:
        """Write the whole pages of a fetched span, then their records; a partial page is stored only when it is
        the blob's tail. A disk-full write is read through (nothing recorded); other errors disable caching.

        `epoch`: `mismatches` when the span's fetch began; bytes fetched before a digest mismatch verdict
        (from the source it blamed) are not stored after it."""
        if self.disabled or self.failed:
            return
        if time.monotonic() < self.cache.full_until:
            return  # the cache disk was full a moment ago: read through without writing
        skip = -start % PAGE  # whole pages only, by construction: trim a head or tail that is not one
        start += skip
        end = min(start + len(data) - skip, self.size)
        if end < self.size:
            end = end // PAGE * PAGE
        if end <= start:
            return
        data = data[skip : skip + end - start]
        first = start // PAGE
        count = (len(data) + PAGE - 1) // PAGE
        recs = array("I", bytes(count * 8))
        for i in range(count):
            # With the GIL held (mode 0): a page takes ~1 us, and releasing the GIL per page handed it to a
            # fetch thread's callback 4,096 times per 16 MiB piece (3-5x slower stores on two busy cores).
            recs[2 * i] = crc32c(data[i * PAGE : (i + 1) * PAGE], 0, 0)
            recs[2 * i + 1] = MARK
        self._hash_claim = start  # the hasher thread stops short of this span: it is hashed from memory below
        try:
            self._store(start, data, first, count, recs, epoch)
        finally:
            self._hash_claim = -1

    def _store(self, start: int, data: memoryview, first: int, count: int, recs: array[int], epoch: int) -> None:
        err: OSError | None = None
        with self._lock:  # serialised with reset_files: no record for data an eviction truncated meanwhile
            if self.closed or (epoch >= 0 and epoch != self.mismatches):
                return
            gen = self.generation()
            try:
                before = self.records(first, count)[1::2].count(MARK)
                done = 0
                while done < len(data):
                    done += os.pwrite(self.data_fd, data[done:], start + done)
                raw = recs.tobytes()
                if os.pwrite(self.meta_fd, raw, HEADER_SIZE + first * 8) != len(raw):
                    raise OSError(errno.ENOSPC, "short page record write")
            except OSError as e:
                err = e
                try:
                    self.drop_pages(first, count)
                except OSError:
                    pass
            else:
                self.present += count - before
                mine = self._held_gen if self.held else self.gen  # the generation this open's bitmap is for
                if gen == mine and self.generation() == gen:  # else an eviction raced us: check on read
                    self.verified[first : first + count] = b"\x01" * count
                whole = self.present >= self.npages and not self.complete
        if err is not None:  # outside our lock: eviction may reset this very blob
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                self.cache.disk_full(self.digest, err)
                try:
                    self.cache.evict(target=int(self.cache.used * 0.9), reason="disk")  # LRU first
                except OSError as e2:
                    log.debug("cache %s: eviction after ENOSPC failed: %s", self.digest, e2)
                return
            log.warning("cache %s: write failed (%s); not caching this blob", self.digest, err)
            METRICS.error("cache_write")
            self.disabled = True
            return
        self._hash_stored(start, data, gen)
        self.cache.account((count - before) * PAGE)
        if whole:
            self.verify_complete()

    def _hash_stored(self, start: int, data: memoryview, gen: int) -> None:
        """Extend the running sha256 over a span just stored under generation `gen`.

        A span that reaches the hashed front is hashed here, from the fetch buffer: no read-back of what
        was just written, and hashlib releases the GIL for the whole span. Spans stored ahead of the
        front (out of order, or by an earlier run) are hashed from the data file by the hasher thread
        once the front reaches them."""
        end = start + len(data)
        with self._hash_lock:  # held by the hasher for one chunk at most
            if self._hash_gen != gen:
                if start or self.closed:
                    return
                self._hash, self._hashed, self._hash_gen = hashlib.sha256(), 0, gen
            front = self._hashed
            if not start <= front < end or self.closed or self.generation() != gen:
                return
            self._hash.update(data[front - start :])
            self._hashed = end
        if end < self.size and self.records(end // PAGE, 1)[1] == MARK:
            self._kick_hash()  # stored beyond this span already

    def _kick_hash(self) -> None:
        """Have the hasher thread extend the running sha256 over pages already on disk (off the cache writer,
        whose speed bounds how far fetches may run ahead)."""
        with self._lock:
            if self._hash_queued or self.closed:
                return
            self._hash_queued = True
        _hasher().submit(self._hash_catch_up)

    def _hash_catch_up(self) -> None:
        """Extend the running sha256 from `_hashed` over the pages present on disk (page cache), in order.

        The lock is taken per chunk, so the cache writer can extend the hash from memory in between."""
        with self._lock:
            self._hash_queued = False
        buf = memoryview(bytearray(HASH_CHUNK_PAGES * PAGE))
        while True:
            with self._hash_lock:
                with self._lock:
                    if self.closed:
                        return
                    gen = self.generation()
                if self._hash_gen != gen:
                    self._hash, self._hashed, self._hash_gen = hashlib.sha256(), 0, gen
                if self._hashed >= self.size:
                    return
                first = self._hashed // PAGE
                marks = self.records(first, min(HASH_CHUNK_PAGES, self.npages - first))[1::2]
                run = marks.index(0) if 0 in marks else len(marks)  # records are 0 or MARK (swept at open)
                claim = self._hash_claim
                n = min(run * PAGE, self.size - self._hashed, (claim if claim >= 0 else self.size) - self._hashed)
                if n <= 0:
                    return
                if os.preadv(self.data_fd, [buf[:n]], self._hashed) != n or self.generation() != gen:
                    return
                self._hash.update(buf[:n])  # releases the GIL for large spans
                self._hashed += n

    def verify_complete(self, at_open: bool = False) -> bool:
        """Every page is present: check the blob's sha256 against its digest before marking it complete.

        Why: a page checksum only says the cache holds what was fetched; an uncompressed layer has no
        other check, so a registry that served wrong bytes is caught here. A mismatch that page
        checksums explain (cache corruption) drops those pages; otherwise the blob is emptied and,
        unless found at open (bytes fetched by an earlier run), its reads fail until it is reopened.
        Returns True when the blob is complete and correct."""
        gen = self.generation()
        recs = self.records(0, self.npages)
        self.present = recs[1::2].count(MARK)
        if self.present < self.npages:
            return False  # another process evicted pages meanwhile
        algo, _, want = self.digest.partition(":")
        if algo != "sha256":
            return False  # nothing to check it against; stays "all pages present"
        self._hash_catch_up()  # the running hash over what is not hashed yet (also what the hasher would do)
        with self._hash_lock:
            h, off = (self._hash.copy(), self._hashed) if self._hash_gen == gen else (hashlib.sha256(), 0)
        buf = memoryview(bytearray(max(PAGE, min(self.size - off, 4 << 20))))
        while off < self.size:
            view = buf[: min(len(buf), self.size - off)]
            if os.preadv(self.data_fd, [view], off) != len(view):
                return False  # truncated under us (evicted)
            h.update(view)  # hashlib releases the GIL for large buffers
            off += len(view)
        if self.generation() != gen:
            return False
        got = h.hexdigest()
        if got == want:
            with self._lock:
                if self.generation() == gen and not self.closed:
                    struct.pack_into("<I", self._hdr, COMPLETE_OFFSET, COMPLETE)
                    self.complete = True
            METRICS.add("blobs_verified")
            log.info("cache %s: all %d bytes cached and verified against the digest", self.digest, self.size)
            return True
        bad = [i for i in range(self.npages) if not self._page_ok(i, recs[2 * i], buf)]
        if bad:
            METRICS.add("cache_corrupt_blocks", len(bad))
            log.warning("cache %s: %d pages have bad checksums; dropping them", self.digest, len(bad))
            for i in bad:
                self.drop_pages(i, 1)
            return False
        METRICS.error("digest_mismatch")
        msg = f"blob {self.digest} ({self.size} bytes) as served by the registry hashes to sha256:{got}"
        self.cache.used = max(0, self.cache.used - self.npages * PAGE)
        with self._lock:  # before the reset: a store of bytes fetched before this verdict is refused from now on
            self.mismatches += 1
        self.reset_files()
        if at_open:
            log.error("cache %s: %s; emptied it (fetched by an earlier run), refetching on demand", self.digest, msg)
            return False
        blame = ""
        if self.on_mismatch is not None:
            try:
                blame = self.on_mismatch(self.digest)
            except Exception as e:  # never let the hook turn a verdict into a crash
                log.warning("cache %s: holding off the sources of the mismatching blob failed: %s", self.digest, e)
        if blame:
            self.mismatch_note = f"{msg}; served by {blame}, not used for this blob again: refetching it elsewhere"
            log.error("cache %s: %s", self.digest, self.mismatch_note)
            return False
        self.failed = f"{msg}; its reads fail until the layer is reopened"
        log.error("cache %s: %s; emptied it and failing its reads until the layer is reopened", self.digest, msg)
        return False

    def _page_ok(self, i: int, crc: int, buf: memoryview) -> bool:
        n = min(PAGE, self.size - i * PAGE)
        return os.preadv(self.data_fd, [buf[:n]], i * PAGE) == n and crc32c(buf[:n]) == crc


HASH_CHUNK_PAGES = 1024  # the hasher reads 4 MiB at a time
_hasher_pool: list[ThreadPoolExecutor] = []
_hasher_lock = threading.Lock()


def _hasher() -> ThreadPoolExecutor:
    """One thread per process extends the running sha256 of blobs being filled in order."""
    with _hasher_lock:
        if not _hasher_pool:
            _hasher_pool.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlaybd-cache-hash"))
        return _hasher_pool[0]


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
