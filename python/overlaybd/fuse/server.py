"""Serve one image as a single regular file over /dev/fuse (the frontend for hosts without TCMU).

The FUSE mount *is* the file: we mount over a regular file with rootmode=S_IFREG, so the kernel's
root inode is the image and there is no directory to look up. A loop device on top of it gives a
block device (see `file_device.py`). Worker threads each read one request at a time from the same
/dev/fuse fd, so a slow remote read never blocks other requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import threading
import time

from overlaybd.fuse import protocol as P
from overlaybd.image.frontend import BlockImage

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20
READ_BUFFER = MAX_WRITE + 64 * 1024  # a request header plus the largest WRITE payload
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2


class FuseError(RuntimeError):
    """Mounting or serving the FUSE file failed; the message names the mountpoint."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str, path: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise FuseError(f"{path}: {what}: {os.strerror(err)}")


class FuseFileServer:
    """One image exposed as the regular file `mountpoint` (created if missing) until `stop()`."""

    def __init__(self, image: BlockImage, mountpoint: str, *, read_only: bool | None = None, threads: int = 8):
        self.image = image
        self.mountpoint = os.path.abspath(mountpoint)
        self.read_only = image.read_only if read_only is None else (read_only or image.read_only)
        self.threads = threads
        self._size = image.size()
        self._write_lock = threading.Lock()  # image writers are not assumed to be thread-safe
        self._fd = -1
        self._workers: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._mtime = int(time.time())
        self.mode = stat.S_IFREG | (0o444 if self.read_only else 0o644)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Mount and start the workers; returns once the kernel has finished INIT."""
        if not os.path.exists(self.mountpoint):
            with open(self.mountpoint, "wb"):
                pass
        elif not os.path.isfile(self.mountpoint):
            raise FuseError(f"{self.mountpoint}: mountpoint: must be a regular file")
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={self._fd},rootmode={stat.S_IFREG:o},user_id=0,group_id=0,allow_other"
        libc = _libc()
        flags = MS_NOSUID | MS_NODEV
        rc = libc.mount(b"overlaybd", self.mountpoint.encode(), b"fuse.overlaybd", flags, opts.encode())
        if rc != 0:
            os.close(self._fd)
            self._fd = -1
            _check(rc, "mount fuse", self.mountpoint)
        for i in range(self.threads):
            t = threading.Thread(target=self._worker, name=f"fuse-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        log.info("fuse: %s serving %d bytes (%s)", self.mountpoint, self._size, "ro" if self.read_only else "rw")

    def stop(self) -> None:
        """Unmount and join the workers; a file still held open (a loop device) is detached lazily, with a warning."""
        if self._fd < 0:
            return
        self._stopping.set()
        libc = _libc()
        if libc.umount2(self.mountpoint.encode(), 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EBUSY:
                log.warning("fuse: %s is still open (loop device?): unmounting lazily", self.mountpoint)
            if libc.umount2(self.mountpoint.encode(), MNT_DETACH) != 0:
                log.warning("fuse: umount %s: %s", self.mountpoint, os.strerror(ctypes.get_errno()))
        for t in self._workers:
            t.join(timeout=5)
        os.close(self._fd)
        self._fd = -1
        self._workers.clear()

    def __enter__(self) -> FuseFileServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- request loop ----------------------------------------------------------------------
    def _worker(self) -> None:
        buf = bytearray(READ_BUFFER)
        view = memoryview(buf)
        reply_buf = bytearray(MAX_WRITE)
        while True:
            try:
                n = os.readv(self._fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue  # ENOENT: the request was interrupted before we got it
                if e.errno in (errno.ENODEV, errno.EBADF):
                    return  # unmounted
                log.error("fuse: read %s: %s", self.mountpoint, e)
                return
            if n < P.IN_HEADER.size:
                continue
            _len, opcode, unique, _node, _uid, _gid, _pid, _pad = P.IN_HEADER.unpack_from(buf)
            body = view[P.IN_HEADER.size : n]
            try:
                self._dispatch(opcode, unique, body, reply_buf)
            except OSError as e:
                self._reply_error(unique, e.errno or errno.EIO)
            except Exception:  # a bug in one request must not kill the mount
                log.exception("fuse: opcode %d on %s", opcode, self.mountpoint)
                self._reply_error(unique, errno.EIO)
            if opcode == P.DESTROY:
                return

    def _send(self, unique: int, *parts: bytes | memoryview) -> None:
        total = sum(len(p) for p in parts)
        try:
            os.writev(self._fd, [P.out_header(unique, 0, total), *parts])
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                log.warning("fuse: reply %d on %s: %s", unique, self.mountpoint, e)

    def _reply_error(self, unique: int, err: int) -> None:
        try:
            os.write(self._fd, P.out_header(unique, -err))
        except OSError:
            pass

    def _dispatch(self, opcode: int, unique: int, body: memoryview, reply_buf: bytearray) -> None:
        if opcode in P.NO_REPLY:
            return
        if opcode == P.READ:
            _fh, offset, size, *_ = P.READ_IN.unpack_from(body)
            size = max(0, min(size, self._size - offset, len(reply_buf)))
            out = memoryview(reply_buf)[:size]
            got = 0
            while got < size:  # a short reply means EOF to the kernel: fill it completely
                n = self.image.pread_into(out[got:], offset + got)
                if n <= 0:
                    raise OSError(errno.EIO, f"short read at {offset + got}")
                got += n
            self._send(unique, out)
        elif opcode == P.WRITE:
            if self.read_only:
                raise OSError(errno.EROFS, "read-only")
            _fh, offset, size, *_ = P.WRITE_IN.unpack_from(body)
            if offset + size > self._size:
                raise OSError(errno.EFBIG, "beyond image size")
            data = body[P.WRITE_IN.size : P.WRITE_IN.size + size]
            with self._write_lock:
                self.image.pwrite(data, offset)
            self._send(unique, P.WRITE_OUT.pack(size, 0))
        elif opcode == P.GETATTR or opcode == P.SETATTR:
            if opcode == P.SETATTR:
                valid, _ = P.SETATTR_IN.unpack_from(body)
                if valid & P.FATTR_SIZE:
                    raise OSError(errno.EPERM, "an image has a fixed size")
            self._send(unique, P.attr_out(self._size, self.mode, mtime=self._mtime))
        elif opcode == P.OPEN:
            flags, _ = P.OPEN_IN.unpack_from(body)
            if self.read_only and (flags & os.O_ACCMODE) != os.O_RDONLY:
                raise OSError(errno.EROFS, "read-only")
            self._send(unique, P.OPEN_OUT.pack(0, P.FOPEN_KEEP_CACHE if self.read_only else 0, 0))
        elif opcode == P.FSYNC or opcode == P.FLUSH:
            if opcode == P.FSYNC and not self.read_only:
                with self._write_lock:
                    self.image.fsync()
            self._send(unique)
        elif opcode == P.FALLOCATE:
            self._fallocate(unique, body)
        elif opcode in (P.RELEASE, P.ACCESS):
            self._send(unique)
        elif opcode == P.STATFS:
            blocks = self._size // 4096
            self._send(unique, P.STATFS_OUT.pack(blocks, 0, 0, 1, 0, 4096, 255, 4096, 0))
        elif opcode == P.INIT:
            major, minor, max_readahead, flags = P.INIT_IN.unpack_from(body)
            if major != P.KERNEL_MAJOR:
                raise OSError(errno.EPROTO, f"kernel FUSE major {major}")
            want = flags & (P.ASYNC_READ | P.BIG_WRITES | P.MAX_PAGES)
            init_out = P.INIT_OUT.pack(
                P.KERNEL_MAJOR,
                min(minor, P.OUR_MINOR),
                max_readahead,
                want,
                64,
                48,
                MAX_WRITE,
                1,
                MAX_WRITE // 4096,
                0,
                0,
            )
            self._send(unique, init_out)
        elif opcode == P.DESTROY:
            self._send(unique)
        else:
            raise OSError(errno.ENOSYS, "unsupported")

    def _fallocate(self, unique: int, body: memoryview) -> None:
        """Loop turns BLKDISCARD into PUNCH_HOLE|KEEP_SIZE and write-zeroes into ZERO_RANGE."""
        _fh, offset, length, mode, _ = P.FALLOCATE_IN.unpack_from(body)
        if offset + length > self._size:
            length = max(0, self._size - offset)
        if mode & (P.FALLOC_FL_PUNCH_HOLE | P.FALLOC_FL_ZERO_RANGE):
            if self.read_only:
                raise OSError(errno.EROFS, "read-only")
            if length:
                with self._write_lock:
                    self.image.discard(offset, length)  # discarded ranges read back as zeros
        elif mode & ~P.FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, "fallocate mode")
        self._send(unique)
