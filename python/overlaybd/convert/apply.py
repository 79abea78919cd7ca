"""Apply one OCI layer tar onto the writable upper layer of an image (upstream's `overlaybd-apply`).

Why a library function: the convertor and `overlaybd-apply` build layers the same way (device, optional
mkfs, mount, tar applied with OCI whiteout rules, unmount, flush); the tool only adds upstream's
inputs: a config.v1.json (or, with `raw`, a raw image file), a tar that may be gzip/zstd compressed or
a FIFO, and an optional sha256 of the uncompressed tar.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any, cast

from ..host.command import HostError
from ..host.mkfs import mkfs
from ..host.mount import mount, umount, umount_all_under
from ..host.progress import CountingReader, Progress
from .convertor import ConvertError
from .extract import apply_layer

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _Hashing:
    """A stream that hashes what is read through it (upstream's `--checksum` of the uncompressed tar)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> None:
        """Read to the end (tar's end blocks and padding belong to the checksum)."""
        while self.read(1 << 20):
            pass


@contextlib.contextmanager
def tar_stream(path: str, progress: Progress) -> Iterator[IO[bytes]]:
    """The uncompressed tar of `path` (plain, gzip or zstd, regular file or FIFO); reads count as progress."""
    raw = open(path, "rb")  # closed below, after the decompressor
    try:
        counted = CountingReader(raw, progress)
        head = raw.peek(4)[:4] if hasattr(raw, "peek") else b""
        stream: Any
        if head[:2] == GZIP_MAGIC:
            stream = gzip.GzipFile(fileobj=cast(IO[bytes], counted), mode="rb")
        elif head == ZSTD_MAGIC:
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(cast(IO[bytes], counted))
        else:
            stream = counted
        yield stream
    finally:
        raw.close()


@contextlib.contextmanager
def _device(config: str, raw: bool, service: Any, work: str) -> Iterator[str]:
    """A block device of the image: the raw file loop-attached, or config.v1.json served through FUSE + loop."""
    from ..host import loop

    if raw:
        try:
            dev = loop.attach(config)
        except HostError as e:
            raise ConvertError(f"{config}: cannot attach a loop device: {e}") from e
        try:
            yield dev
        finally:
            loop.detach(dev)
        return
    from ..fuse.file_device import FileDevice
    from ..image import open_image

    image = open_image(config, service)
    if image.read_only:
        image.close()
        raise ConvertError(f"{config}: upper: the image has no writable layer to apply onto")
    try:
        fdev = FileDevice(image, os.path.join(work, "apply.img"), read_only=False)
        try:
            path = fdev.start()
        except (OSError, RuntimeError) as e:
            raise ConvertError(f"{config}: cannot attach a device: {e}") from e
        try:
            yield path
        finally:
            fdev.stop()
        image.fsync()  # the upper layer is committed next: its writes must be on disk
    finally:
        image.close()


def apply_tar(
    tar_path: str,
    config: str,
    *,
    make_fs: bool = False,
    raw: bool = False,
    service: Any = None,
    checksum: str = "",
    fstype: str = "ext4",
    progress: Progress | None = None,
) -> int:
    """Apply the layer tar at `tar_path` onto the image `config`; returns the number of entries applied.

    `make_fs` formats the device first (the bottom layer). `checksum` (hex sha256 of the uncompressed
    tar) is checked after the tar was read to its end: a mismatch is an error, as upstream's.
    """
    progress = progress or Progress("overlaybd-apply", enabled=False)
    try:
        total = os.stat(tar_path).st_size if os.path.isfile(tar_path) else None
    except OSError as e:
        raise ConvertError(f"{tar_path}: {e.strerror}") from e
    progress.stage(os.path.basename(tar_path), total)
    work = tempfile.mkdtemp(prefix="obd-apply-")
    hashing: _Hashing | None = None
    try:
        with _device(config, raw, service, work) as dev:
            if make_fs:
                try:
                    mkfs(dev, fstype)
                except HostError as e:
                    raise ConvertError(f"{config}: {e}") from e
            mnt = os.path.join(work, "mnt")
            try:
                mount(dev, mnt, fstype)
            except HostError as e:
                raise ConvertError(f"{config}: mount: {e} (a bottom layer needs --mkfs)") from e
            try:
                with tar_stream(tar_path, progress) as stream:
                    hashing = _Hashing(stream) if checksum else None
                    n = apply_layer(hashing or stream, mnt, tar_path)  # type: ignore[arg-type]
                    if hashing is not None:
                        hashing.drain()
            finally:
                umount(mnt)
        if hashing is not None:
            got = hashing.sha.hexdigest()
            if got != checksum.removeprefix("sha256:"):
                raise ConvertError(f"{tar_path}: sha256 checksum mismatch, expected {checksum}, got {got}")
        return n
    except OSError as e:
        where = e.filename or tar_path
        raise ConvertError(f"{where}: {e.strerror or e}") from e
    finally:
        progress.close()
        umount_all_under(work, lazy=True)
        shutil.rmtree(work, ignore_errors=True)
