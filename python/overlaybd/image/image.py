"""Opening a device config (config.v1.json) into one block image: lowers + optional upper.

This is what both frontends (TCMU and FUSE) and tools like overlaybd-dump/-merge sit
on. The result is a `Stack` (format.lsmt) wrapped in `Image`, whose read path is the
stack's own `pread_into` bound directly (no extra Python frame per request).
Like upstream's `create_image_file`, the outcome is written to `resultFile`
(`success` or `failed:<reason>`), which the snapshotter reads to explain a failed attach.

Not implemented yet (TODO): trace record/replay (`recordTracePath`, the acceleration
layer's `trace` file) — the acceleration layer is dropped from the stack as upstream
does, but its trace is not replayed. TurboOCI layers read their target from a local
`targetFile` (lower) or `upper.target`; remote/gzip targets (`targetDigest`, `gzipIndex`)
are refused with a clear error.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..config.device import DeviceConfig, load_device_config
from ..config.schema import ConfigError
from ..format.atomic import atomic_write_bytes
from ..format.errors import FormatError, ReadOnly
from ..format.fileio import LocalFile
from .layers import LayerOpenError, RemoteOpener, open_lower_source

log = logging.getLogger(__name__)


class ImageOpenError(Exception):
    """The device cannot be opened; str() names the config file and the field (e.g. `lowers[1]`)."""

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path = path
        self.field = field
        self.message = message
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")


class Image:
    """A virtual block device: random-access reads, and writes/discards when it has an upper layer."""

    def __init__(self, name: str, stack: Any, config: DeviceConfig, download: Any) -> None:
        self.name = name
        self.config = config
        self.download = download  # effective background-download settings (config's, else the service's)
        self._stack = stack  # owns its layers, which own their byte sources
        self.vsize: int = stack.vsize
        self.read_only: bool = bool(stack.read_only)
        # Hot path: bind the stack's methods directly.
        self.pread_into = stack.pread_into
        self.pread = stack.pread

    def size(self) -> int:
        return self.vsize

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        if self.read_only:
            raise ReadOnly(self.name, "upper", "image has no writable layer")
        return self._stack.pwrite(data, offset)

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnly(self.name, "upper", "image has no writable layer")
        self._stack.discard(offset, length)

    def fsync(self) -> None:
        if not self.read_only:
            self._stack.fsync()

    def close(self) -> None:
        stack, self._stack = self._stack, None
        if stack is None:
            return
        stack.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Image({self.name!r}, vsize={self.vsize}, read_only={self.read_only})"


def close_all(objs: list[Any]) -> None:
    for o in objs:
        try:
            o.close()
        except Exception as e:  # closing must go on for the rest
            log.warning("closing %r: %s", o, e)


def write_result_file(path: str, text: str) -> None:
    """Write `success`/`failed:<reason>` atomically; a failure here is logged, never raised."""
    if not path:
        return
    try:
        atomic_write_bytes(path, text.encode("utf-8", "replace"))
    except OSError as e:
        log.warning("cannot write resultFile %s: %s", path, e)


def effective_lowers(cfg: DeviceConfig) -> list[Any]:
    """The lowers that form the disk: all of them, minus the acceleration (trace) layer if flagged."""
    if cfg.acceleration_layer:
        if not cfg.lowers:
            raise ImageOpenError(cfg.path or "<config>", "accelerationLayer", "set but there are no lowers")
        return list(cfg.lowers[:-1])  # trace replay of the acceleration layer: TODO
    return list(cfg.lowers)


def open_lowers(cfg: DeviceConfig, service: Any, remote_opener: RemoteOpener | None, owned: list[Any]) -> list[Any]:
    """Open every lower (bottom -> top) as a read-only LSMT layer; every opened object is appended to `owned`."""
    from ..format import opener

    name = cfg.path or "<config>"
    layers = []
    for i, lower in enumerate(effective_lowers(cfg)):
        src = open_lower_source(name, i, lower, cfg.repo_blob_url, service, remote_opener, cfg.download)
        owned.append(src)
        try:
            if lower.target_file:
                layer = _open_warp_lower(src, lower.target_file)
            else:
                layer = opener.open_layer(src)
        except FormatError as e:
            raise ImageOpenError(name, f"lowers[{i}]", str(e)) from e
        owned[-1] = layer  # the layer owns (and closes) its source
        layers.append(layer)
    return layers


def _open_warp_lower(src: Any, target_path: str) -> Any:
    """A TurboOCI lower: the committed fs-meta layer plus the original layer tar it points into."""
    from ..format import lsmt, opener

    target = LocalFile(target_path)
    try:
        return lsmt.open_warp_ro(opener.unwrap(src), target)
    except BaseException:
        target.close()
        raise


def _open(cfg: DeviceConfig, service: Any, remote_opener: RemoteOpener | None) -> Image:
    from ..format import lsmt

    name = cfg.path or "<config>"
    if cfg.upper is not None and cfg.upper.gzip_index:
        raise ImageOpenError(name, "upper.gzipIndex", "TurboOCI writable layers over a gzip target are not supported")
    if not effective_lowers(cfg) and not cfg.writable:
        raise ImageOpenError(name, "lowers", "no layers to open")
    if cfg.record_trace_path:
        log.warning("%s: recordTracePath: trace record/replay is not implemented; ignored", name)
    owned: list[Any] = []
    try:
        layers = open_lowers(cfg, service, remote_opener, owned)
        upper = None
        if cfg.writable:
            try:
                if cfg.upper.target:
                    upper = lsmt.open_warp_rw(cfg.upper.data, cfg.upper.index, target=LocalFile(cfg.upper.target))
                else:
                    upper = lsmt.open_rw(cfg.upper.data, cfg.upper.index)
            except (FormatError, OSError) as e:
                raise ImageOpenError(name, "upper", str(e)) from e
            owned.append(upper)
        try:
            stack = lsmt.Stack(layers, upper=upper, check_order=False)
        except FormatError as e:
            raise ImageOpenError(name, "lowers", str(e)) from e
    except BaseException:
        close_all(list(reversed(owned)))
        raise
    download = cfg.download if cfg.download is not None else getattr(service, "download", None)
    return Image(name, stack, cfg, download)


def open_image(
    config: DeviceConfig | str | os.PathLike[str],
    service: Any | None = None,
    *,
    remote_opener: RemoteOpener | None = None,
) -> Image:
    """Open the device described by `config` (a DeviceConfig or a path to config.v1.json).

    `service` is the parsed overlaybd.json (needed for remote layers: cache, credentials).
    `remote_opener(repo_blob_url, lower, service) -> RandomAccessFile` fetches digest-only
    lowers; by default `overlaybd.registry.open_remote_blob` (imported only when needed).
    Raises ImageOpenError / ConfigError naming the file and field; writes `resultFile`.
    """
    if isinstance(config, DeviceConfig):
        cfg = config
    else:
        cfg = load_device_config(config)  # no resultFile known yet if this fails
    try:
        image = _open(cfg, service, remote_opener)
    except (ImageOpenError, LayerOpenError, ConfigError) as e:
        write_result_file(cfg.result_file, f"failed:{e.message}")
        raise
    except Exception as e:
        write_result_file(cfg.result_file, f"failed:{e}")
        raise
    write_result_file(cfg.result_file, "success")
    return image
