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
from collections import deque
from collections.abc import Callable

from overlaybd.tcmu.ring import Command, Ring, RingError
from overlaybd.tcmu.scsi import ASC_UNRECOVERED_READ_ERROR, CHECK_CONDITION, MEDIUM_ERROR, ScsiDisk, sense_fixed

log = logging.getLogger(__name__)

#: how long queued commands may wait on a busy worker before another one is woken
STALL_SECONDS = 0.002


class CommandProcessor:
    """Moves commands from a ring to worker threads and their results back; independent of where the ring lives.

    Why not a ThreadPoolExecutor: a Future, a queue item and a worker hand-off per command cost ~5 us,
    and several threads fighting for the GIL over a batch of fast reads cost more than the reads
    (docs/performance.md, TCMU). Here the poll thread appends a whole fetched batch to a deque and
    wakes one worker if none is running; that worker runs the batch. While commands are queued the
    poll thread checks every STALL_SECONDS (`poll` with nothing new) whether any command was started
    since the last check, and if not (a read waiting on the registry) wakes one more worker, so a slow
    command delays the ones behind it by at most a few milliseconds.
    """

    def __init__(self, ring: Ring, disk: ScsiDisk, kick: Callable[[], None], workers: int = 8, name: str = "tcmu"):
        if not ring.ooo:
            raise RingError("tcmu_mailbox.flags: kernel lacks CAP_OOOC (out-of-order completion)")
        self.ring = ring
        self.disk = disk
        self.kick = kick
        self.inflight = 0
        self._queue: deque[Command] = deque()
        lock = threading.Lock()
        self._cv = threading.Condition(lock)  # idle workers wait on it for commands
        self._drained = threading.Condition(lock)  # drain() waits on it for inflight == 0
        self._idle = 0
        self._started = 0  # commands taken by workers (progress, for the stall check)
        self._seen = 0  # `_started` at the previous stall check
        self._closed = False
        self._threads = [
            threading.Thread(target=self._worker, name=f"{name}_{i}", daemon=True) for i in range(max(1, workers))
        ]
        for t in self._threads:
            t.start()

    def poll(self) -> int:
        """Hand every newly queued command to the workers; returns how many."""
        cmds = self.ring.fetch()
        with self._cv:
            if cmds:
                self.inflight += len(cmds)
                self._queue.extend(cmds)
                if self._idle == len(self._threads):  # nobody running: start one
                    self._cv.notify()
            elif self._queue and self._idle and self._started == self._seen:
                self._cv.notify()  # queued commands but no progress since the last check: add a worker
            self._seen = self._started
        return len(cmds)

    @property
    def backlog(self) -> bool:
        """Commands are queued for the workers (the poll loop then checks for stalls)."""
        return bool(self._queue)

    def _worker(self) -> None:
        queue, cv = self._queue, self._cv
        while True:
            try:
                cmd = queue.popleft()
            except IndexError:
                with cv:
                    while not queue and not self._closed:
                        self._idle += 1
                        cv.wait()
                        self._idle -= 1
                    if not queue:
                        return  # closed and nothing left
                continue
            self._started += 1
            self._run(cmd)

    def _run(self, cmd: Command) -> None:
        try:
            status, sense = self.disk.execute(cmd.cdb, cmd.iovs)
        except Exception:  # the kernel must always get an answer
            log.exception("cmd %d (opcode %#x)", cmd.cmd_id, cmd.cdb[0] if cmd.cdb else -1)
            status, sense = CHECK_CONDITION, sense_fixed(MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR)
        try:
            self.ring.complete(cmd.cmd_id, status, sense)
        except (RingError, ValueError) as e:  # the ring was reset under us (device going away): log, carry on
            log.error("cmd %d: cannot complete: %s", cmd.cmd_id, e)
        try:
            if not self._queue:  # one kick per drained batch: the kernel reaps up to cmd_tail on each
                self.kick()
        finally:
            with self._cv:
                self.inflight -= 1
                if not self.inflight:
                    self._drained.notify_all()  # not the idle workers: waking them all costs ~1 us per command

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no command is in flight (graceful shutdown); False on timeout."""
        with self._drained:
            return self._drained.wait_for(lambda: self.inflight == 0, timeout)

    def close(self) -> None:
        """Let the workers finish what is queued, then stop them."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()


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

    @classmethod
    def from_fd(cls, minor: int, name: str, fd: int, mapping: mmap.mmap) -> UioDevice:
        """A UioDevice over an already open fd and mapping instead of /dev/uioN and its sysfs entry.

        Why: hosts without target_core_user (and the TCG guest, where the daemon itself is emulated)
        cannot measure or test the command path; `tcmu.uio_sim` provides the kernel's half of the
        ring on a shared mmap and a socketpair for the wait/kick reads and writes, and everything
        from here on (wait, kick, Ring, CommandProcessor, ScsiDisk) is the daemon's own code."""
        dev = cls.__new__(cls)
        dev.minor, dev.name, dev.fd, dev.map = minor, name, fd, mapping
        dev.size = len(mapping)
        dev.region = memoryview(mapping)
        return dev

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
                if not self.uio.wait(self._stop_r, STALL_SECONDS if self.proc.backlog else None):
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
        self.ring.close()
        self.uio.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self.on_close:
            self.on_close()
