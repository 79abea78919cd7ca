"""One TCMU backstore being served: its UIO device, ring and a worker pool running SCSI commands.

Why a pool per device: a READ that has to fetch from a registry can take seconds; other commands
(and other devices) must go on meanwhile. Completions go back out of order (mailbox CAP_OOOC).
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from overlaybd.tcmu.ring import Command, Ring, RingError
from overlaybd.tcmu.scsi import ASC_UNRECOVERED_READ_ERROR, CHECK_CONDITION, MEDIUM_ERROR, ScsiDisk, sense_fixed

log = logging.getLogger(__name__)


class CommandProcessor:
    """Moves commands from a ring to a pool and their results back; independent of where the ring lives."""

    def __init__(self, ring: Ring, disk: ScsiDisk, kick: Callable[[], None], workers: int = 8, name: str = "tcmu"):
        if not ring.ooo:
            raise RingError("tcmu_mailbox.flags: kernel lacks CAP_OOOC (out-of-order completion)")
        self.ring = ring
        self.disk = disk
        self.kick = kick
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self.inflight = 0
        self._cv = threading.Condition()

    def poll(self) -> int:
        """Hand every newly queued command to the pool; returns how many."""
        cmds = self.ring.fetch()
        with self._cv:
            self.inflight += len(cmds)
        for cmd in cmds:
            self.pool.submit(self._run, cmd)
        return len(cmds)

    def _run(self, cmd: Command) -> None:
        try:
            status, sense = self.disk.execute(cmd.cdb, cmd.iovs)
        except Exception:  # the kernel must always get an answer
            log.exception("cmd %d (opcode %#x)", cmd.cmd_id, cmd.cdb[0] if cmd.cdb else -1)
            status, sense = CHECK_CONDITION, sense_fixed(MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR)
        self.ring.complete(cmd.cmd_id, status, sense)
        try:
            self.kick()
        finally:
            with self._cv:
                self.inflight -= 1
                self._cv.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no command is in flight (graceful shutdown); False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self.inflight == 0, timeout)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class UioDevice:
    """/dev/uioN of one TCMU backstore: mmap of map0, wait = read(), kick = write()."""

    def __init__(self, minor: int, sysfs: str = "/sys/class/uio", dev: str = "/dev"):
        self.minor = minor
        base = f"{sysfs}/uio{minor}"
        with open(f"{base}/name") as f:
            self.name = f.read().strip()
        with open(f"{base}/maps/map0/size") as f:
            self.size = int(f.read().strip(), 0)
        self.fd = os.open(f"{dev}/uio{minor}", os.O_RDWR | os.O_CLOEXEC)
        self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.region = memoryview(self.map)

    def kick(self) -> None:
        os.write(self.fd, struct.pack("<I", 0))

    def wait(self, stop_fd: int, timeout: float | None = None) -> bool:
        """Block until the kernel signals new commands (True) or `stop_fd` becomes readable (False)."""
        r, _, _ = select.select([self.fd, stop_fd], [], [], timeout)
        if self.fd in r:
            os.read(self.fd, 4)
            return True
        return stop_fd not in r and timeout is not None

    def close(self) -> None:
        try:
            self.region.release()
            self.map.close()
        except BufferError:  # a command's view is still referenced somewhere; GC unmaps it later
            log.warning("uio%d: mapping still referenced at close", self.minor)
        os.close(self.fd)


class TcmuDevice:
    """A served backstore: the uio device, its ring, the disk emulation and a poller thread."""

    def __init__(self, uio: UioDevice, disk: ScsiDisk, *, workers: int = 8, on_close: Callable[[], None] | None = None):
        self.uio = uio
        self.disk = disk
        self.ring = Ring(uio.region)
        self.proc = CommandProcessor(self.ring, disk, uio.kick, workers, name=f"uio{uio.minor}")
        self.on_close = on_close
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._loop, name=f"uio{uio.minor}-poll", daemon=True)

    def start(self) -> None:
        """Serve, first picking up commands queued before we (re)started (crash recovery)."""
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                self.proc.poll()
                if not self.uio.wait(self._stop_r):
                    return
        except (RingError, OSError) as e:
            log.error("uio%d (%s): %s", self.uio.minor, self.uio.name, e)

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop polling, finish in-flight commands, flush and close."""
        os.write(self._stop_w, b"x")
        self._thread.join()
        if not self.proc.drain(drain_timeout):
            log.warning("uio%d: %d commands still in flight at shutdown", self.uio.minor, self.proc.inflight)
        self.proc.close()
        if not self.disk.read_only:
            try:
                self.disk.image.fsync()
            except OSError as e:
                log.error("uio%d: fsync: %s", self.uio.minor, e)
        self.uio.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self.on_close:
            self.on_close()
