"""Background download (`download` settings): whole layers into `<dir>/overlaybd.commit`, then switch.

One worker thread per process handles layers one after another, as upstream does,
so downloads never compete with each other for bandwidth. Each layer is written
to a temp file in its dir (AtomicOutput), hashed while written, and renamed only if
its sha256 equals the digest; a mismatch discards the file and the layer keeps
being served remotely. Failed layers are retried while `tryCnt` lasts.
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

from ..format.atomic import AtomicOutput
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
            try:
                download_layer(job.file, job.cfg, job.audit, lambda j=job: j.file.closed)
            except Exception as e:  # noqa: BLE001 — any failure re-queues the layer
                job.tries_left -= 1
                METRICS.error("bk_download")
                log.error("background download of %s failed (%s); %d tries left", job.file.name, e, job.tries_left)
                if job.tries_left > 0 and not job.file.closed:
                    job.due = time.monotonic() + self.retry_delay
                    with self._cv:
                        heapq.heappush(self._jobs, job)


def download_layer(f: Any, cfg: Any, audit: AuditLog, cancelled: Any = lambda: False) -> str:
    """Download f's whole blob to <dir>/overlaybd.commit (sha256-verified) and switch f to it."""
    target = os.path.join(f.layer_dir, "overlaybd.commit")
    if os.path.exists(target):
        f.switch_to(target)
        return target
    size = f.size()
    bs = max(4096, cfg.block_size)
    rate = max(1, cfg.max_mbps) * (1 << 20)
    h = hashlib.sha256()
    buf = memoryview(bytearray(bs))
    t_start = time.monotonic()
    out = AtomicOutput(target)
    try:
        off = 0
        while off < size:
            if cancelled():
                raise InterruptedError("device closed")
            n = min(bs, size - off)
            t0 = time.monotonic()
            got = f.read_for_download(buf[:n], off)
            if got != n:
                raise OSError(f"{f.name}: short read {got} of {n} at {off}")
            out.write(buf[:n])
            h.update(buf[:n])
            audit.event("bk_download", pathname=f.name, offset=off, size=n,
                        latency=int((time.monotonic() - t0) * 1e6))
            METRICS.add("bk_download_bytes", n)
            off += n
            ahead = off / rate - (time.monotonic() - t_start)  # throttle to maxMBps
            if ahead > 0:
                _sleep(ahead)
        algo, _, want = f.digest.partition(":")
        got_hex = h.hexdigest()
        if algo != "sha256" or got_hex != want:
            raise DigestMismatch(f"{f.name}: downloaded content hashes to sha256:{got_hex}, expected {f.digest}; "
                                 "discarded")
        out.commit()
    except BaseException:
        out.abort()
        raise
    f.switch_to(target)
    log.info("background download of %s finished: %d bytes", f.name, size)
    return target


DOWNLOADER = BackgroundDownloader()
