"""An image as a block device without TCMU: served as one FUSE file, that file loop-attached.

The one implementation of "FUSE + loop": the daemon's FUSE frontend, the convertor and
`overlaybd-create --mkfs` all use `FileDevice`. Teardown runs in reverse (detach the loop device,
wait until the kernel has let go of it, unmount the FUSE file, remove it), because unmounting the
file while a loop device still holds it leaves a loop device whose backing file shows as "/" and
whose every I/O fails once this process is gone. The image itself belongs to the caller.
"""

from __future__ import annotations

import logging
import os
import time

from overlaybd.fuse.server import FuseFileServer
from overlaybd.host import loop
from overlaybd.host.mount import umount
from overlaybd.host.mountinfo import entries
from overlaybd.image.frontend import BlockImage

log = logging.getLogger(__name__)


class FileDevice:
    """`image` served as the regular file `path` (FUSE) and attached to /dev/loopN until `stop()`."""

    def __init__(self, image: BlockImage, path: str, *, read_only: bool | None = None, threads: int = 8):
        self.image = image
        self.file = os.path.abspath(path)
        self.want_read_only = read_only
        self.threads = threads
        self.server: FuseFileServer | None = None
        self.device: str | None = None

    @property
    def read_only(self) -> bool:
        """Whether the device refuses writes (asked for, or the image has no writable layer)."""
        if self.server is not None:
            return self.server.read_only
        return bool(self.want_read_only) or self.image.read_only

    def start(self) -> str:
        """Serve and attach; undo what was done if a step fails. Returns the loop device path."""
        os.makedirs(os.path.dirname(self.file), exist_ok=True)
        try:
            self.server = FuseFileServer(self.image, self.file, read_only=self.want_read_only, threads=self.threads)
            self.server.start()
            self.device = loop.attach(self.file, read_only=self.server.read_only)
        except BaseException:
            self.stop(release_timeout=5.0)
            raise
        return self.device

    def released(self) -> bool:
        """True once no loop device is bound to our file any more (the number may already serve another)."""
        return self.device is None or loop.backing_file(self.device) != os.path.realpath(self.file)

    def holders(self) -> list[str]:
        """Mount points of file systems mounted from our loop device (what keeps it busy)."""
        if self.device is None:
            return []
        return [e.mountpoint for e in entries() if e.source == self.device]

    def release(self, timeout: float = 10.0) -> bool:
        """Detach the loop device and wait up to `timeout` s for the kernel to let go; False while still held.

        A busy device is only marked for auto-clear by `losetup --detach`: it goes away when its last
        user (a mount, udev's probe) closes it, which is what we wait for.
        """
        if self.device is None:
            return True
        if not self.released():
            try:
                loop.detach(self.device)
            except loop.LoopError as e:
                if not self.released():
                    log.warning("%s", e)
        deadline = time.monotonic() + timeout
        while not self.released():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        self.device = None
        return True

    def stop(self, *, release_timeout: float = 10.0, force: bool = False) -> bool:
        """Detach the loop device, unmount the FUSE file and remove it; True when nothing was left behind.

        `force` (daemon shutdown): file systems still mounted from the device are unmounted first,
        since they cannot work once this process stops serving them.
        """
        clean = self.release(release_timeout)
        if not clean and force:
            for mp in self.holders():
                log.warning("%s: still mounted on %s at shutdown: unmounting", self.device, mp)
                umount(mp)
            clean = self.release(release_timeout)
        if not clean:
            log.error("%s: still in use by %s; its backing FUSE file goes away now", self.device, self.holders() or "?")
        if self.server is not None:
            self.server.stop()
            self.server = None
        try:
            os.unlink(self.file)
        except OSError:
            pass
        return clean

    def __enter__(self) -> FileDevice:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
