"""Background download (`download` settings): whole layers into `<dir>/overlaybd.commit`, then switch.

One worker thread per process handles layers one after another, as upstream does,
so downloads never compete with each other for bandwidth. Each layer is written
to `<dir>/.download` (upstream's partial file, resumed after a restart), hashed in
order, and renamed to `overlaybd.commit` only if its sha256 equals the digest; a
mismatch discards the file and the layer keeps being served remotely. Failed layers
are retried while `tryCnt` lasts.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .audit import AuditLog
from .metrics import METRICS

log = logging.getLogger(__name__)
RETRY_DELAY = 5.0
_sleep = time.sleep  # the throttle's sleep (a seam for tests that check the requested pacing)


class DigestMismatch(Exception):
    pass


@dataclass(order=True)
class _Job:
    due: float
    seq: int
    file: Any = field(compare=False)
    cfg: Any = field(compare=False)
    audit: AuditLog = field(compare=False)
    tries_left: int = field(compare=False, default=5)


class BackgroundDownloader:
    def __init__(self) -> None:
        self._jobs: list[_Job] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._cancelled: set[int] = set()
        self.retry_delay = RETRY_DELAY
        self.active: Any = None  # the file being downloaded right now (None when idle)

    def schedule(self, f: Any, cfg: Any, audit: AuditLog) -> None:
        extra = cfg.delay_extra if cfg.delay_extra > 0 else 30
        due = time.monotonic() + max(0, cfg.delay) + random.randrange(extra)
        with self._cv:
            self._cancelled.discard(id(f))
            heapq.heappush(self._jobs, _Job(due, next(self._seq), f, cfg, audit, max(1, cfg.try_cnt)))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="overlaybd-bk-download", daemon=True)
                self._thread.start()
            self._cv.notify()

    def cancel(self, f: Any) -> None:
        with self._cv:
            self._jobs = [j for j in self._jobs if j.file is not f]
            heapq.heapify(self._jobs)
            self._cancelled.add(id(f))

    def pending(self) -> int:
        with self._cv:
            return len(self._jobs)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs or self._jobs[0].due > time.monotonic():
                    self._cv.wait(None if not self._jobs else max(0.0, self._jobs[0].due - time.monotonic()))
                job = heapq.heappop(self._jobs)
            if job.file.closed:
                continue
            self.active = job.file
            try:
                download_layer(job.file, job.cfg, job.audit, lambda j=job: j.file.closed)
            except InterruptedError as e:  # the device was closed: keep the partial file, do not retry
                log.info("%s", e)
            except Exception as e:  # any failure re-queues the layer
                job.tries_left -= 1
                METRICS.error("bk_download")
                log.error("background download of %s failed (%s); %d tries left", job.file.name, e, job.tries_left)
                if job.tries_left > 0 and not job.file.closed:
                    job.due = time.monotonic() + self.retry_delay
                    with self._cv:
                        heapq.heappush(self._jobs, job)
            finally:
                self.active = None


PARTIAL_NAME = ".download"  # upstream's name for the partial file in the layer dir
COMMIT_NAME = "overlaybd.commit"


def _present(fd: int, off: int, n: int) -> bool:
    """True if [off, off+n) of the partial file is all data (no hole), per SEEK_DATA/SEEK_HOLE.

    A block is written with one pwrite after it was fetched whole, so an allocated block is normally
    complete; one torn by a crash is caught by the digest check of the whole file before the rename."""
    try:
        if os.lseek(fd, off, os.SEEK_DATA) != off:
            return False
        return os.lseek(fd, off, os.SEEK_HOLE) >= off + n
    except OSError:  # ENXIO: no data at or after off
        return False


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def download_layer(f: Any, cfg: Any, audit: AuditLog, cancelled: Any = lambda: False) -> str:
    """Download f's whole blob to <dir>/overlaybd.commit (sha256-verified) and switch f to it.

    Resumable like upstream: the blob goes block by block into `<dir>/.download` (sparse, its final
    size), and blocks a previous run already wrote (SEEK_DATA/SEEK_HOLE) are not fetched again. The
    partial file is kept when the download is interrupted (device closed, registry down); it becomes
    `overlaybd.commit` only by an atomic rename after the sha256 of the whole file matched the digest.
    A mismatch deletes it, so the next try starts from zero. (Not AtomicOutput: its temp name is
    random, and a resumable download needs a name a restarted daemon can find.)
    """
    target = os.path.join(f.layer_dir, COMMIT_NAME)
    if os.path.exists(target):
        f.switch_to(target)
        return target
    partial = os.path.join(f.layer_dir, PARTIAL_NAME)
    size = f.size()
    bs = max(4096, cfg.block_size)
    rate = max(1, cfg.max_mbps) * (1 << 20)
    algo, _, want = f.digest.partition(":")
    if algo != "sha256":
        raise DigestMismatch(f"{f.name}: cannot verify digest {f.digest!r} (only sha256)")
    h = hashlib.sha256()
    buf = memoryview(bytearray(bs))
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fresh = os.fstat(fd).st_size != size
        if fresh:  # new, or left by a different blob: start afresh (nothing in it counts as present)
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
        t_start = time.monotonic()
        fetched = reused = 0
        off = 0
        while off < size:
            if cancelled():
                raise InterruptedError(f"{f.name}: device closed; {partial} kept for resuming")
            n = min(bs, size - off)
            view = buf[:n]
            if not fresh and _present(fd, off, n) and os.preadv(fd, [view], off) == n:
                reused += n  # written by an earlier run: hashed from the file, not fetched
            else:
                t0 = time.monotonic()
                got = f.read_for_download(view, off)
                if got != n:
                    raise OSError(f"{f.name}: short read {got} of {n} at {off}")
                done = 0
                while done < n:
                    done += os.pwrite(fd, view[done:], off + done)
                audit.event(
                    "bk_download", pathname=f.name, offset=off, size=n, latency=int((time.monotonic() - t0) * 1e6)
                )
                METRICS.add("bk_download_bytes", n)
                fetched += n
                ahead = fetched / rate - (time.monotonic() - t_start)  # throttle what we fetch to maxMBps
                if ahead > 0:
                    _sleep(ahead)
            h.update(view)
            off += n
        got_hex = h.hexdigest()
        if got_hex != want:
            _discard(partial)
            METRICS.error("digest_mismatch")  # the same kind as the block cache's whole-blob check
            blame = f.client.distrust_mirrors(f.digest)  # the next try skips a mirror that served these bytes
            raise DigestMismatch(
                f"{f.name}: downloaded content hashes to sha256:{got_hex}, expected {f.digest}; discarded {partial}"
                + (f"; served by {blame}, not used for this blob again" if blame else "")
            )
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(partial, target)
    dfd = os.open(f.layer_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    f.switch_to(target)
    log.info(
        "background download of %s finished: %d bytes fetched, %d resumed from %s", f.name, fetched, reused, partial
    )
    return target


DOWNLOADER = BackgroundDownloader()
