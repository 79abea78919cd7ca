"""One overlaybd device through FUSE: open the image from its config, serve it as a file, loop-attach it.

This is what the daemon runs per device on hosts without target_core_user; the snapshotter gets the
same /dev/<block> it would get from tcm_loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from overlaybd.fuse.server import BlockImage, FuseFileServer
from overlaybd.host import loop

log = logging.getLogger(__name__)

ImageOpener = Callable[[str], BlockImage]


def default_opener(service: Any = None) -> ImageOpener:
    """overlaybd.image.open_image bound to the daemon's service config (imported late: optional in tests)."""

    def open_(config_path: str) -> BlockImage:
        from overlaybd.image import open_image

        return open_image(config_path, service=service)

    return open_


class FuseDevice:
    """config.v1.json -> image -> FUSE file `<run_dir>/<dev_id>.img` -> /dev/loopN."""

    def __init__(
        self,
        config_path: str,
        dev_id: str,
        run_dir: str,
        opener: ImageOpener,
        *,
        read_only: bool = False,
        threads: int = 8,
    ):
        self.config_path = config_path
        self.dev_id = dev_id
        self.file = os.path.join(run_dir, f"{dev_id}.img")
        self.opener = opener
        self.want_read_only = read_only
        self.threads = threads
        self.image: BlockImage | None = None
        self.server: FuseFileServer | None = None
        self.device: str | None = None

    def start(self) -> str:
        """Open, serve and attach; undo what was done if a step fails. Returns the loop device path."""
        os.makedirs(os.path.dirname(self.file), exist_ok=True)
        self.image = self.opener(self.config_path)
        try:
            self.server = FuseFileServer(self.image, self.file, read_only=self.want_read_only, threads=self.threads)
            self.server.start()
            self.device = loop.attach(self.file, read_only=self.server.read_only)
        except BaseException:
            self.stop()
            raise
        log.info(
            "fuse device %s: %s -> %s (%s)",
            self.dev_id,
            self.config_path,
            self.device,
            "ro" if self.server.read_only else "rw",
        )
        return self.device

    def stop(self) -> None:
        """Detach the loop device, flush, unmount the file and close the image."""
        if self.device:
            try:
                loop.detach(self.device)
            except loop.LoopError as e:
                log.warning("%s", e)
            self.device = None
        if self.server:
            self.server.stop()
            self.server = None
        if self.image is not None:
            if not getattr(self.image, "read_only", True):
                try:
                    self.image.fsync()
                except OSError as e:
                    log.error("fuse device %s: fsync: %s", self.dev_id, e)
            close = getattr(self.image, "close", None)
            if close:
                close()
            self.image = None
        try:
            os.unlink(self.file)
        except OSError:
            pass
