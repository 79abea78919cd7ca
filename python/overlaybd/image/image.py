"""Opening a device config (config.v1.json) into one block image: lowers + optional upper.

This is what both frontends (TCMU and FUSE) and tools like overlaybd-dump/-merge sit
on. The result is a `Stack` (format.lsmt) wrapped in `Image`, whose read path is the
stack's own `pread_into` bound directly (no extra Python frame per request).
Like upstream's `create_image_file`, the outcome is written to `resultFile`
(`success` or `failed:<reason>`), which the snapshotter reads to explain a failed attach.

Trace prefetch (`recordTracePath`, the acceleration layer's `<dir>/trace`) is `prefetch.py`:
in record mode the lowers' layer files are wrapped to log their reads; a trace (or a priority
list of paths) is replayed in background threads once the image is open; both stop when the
image closes.
TurboOCI layers read their target from a local
`targetFile` (lower) or `upper.target`; remote/gzip targets (`targetDigest`, `gzipIndex`)
are refused with a clear error.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..config.image_config import DeviceConfig, load_device_config
from ..config.schema import ConfigError
from ..format.atomic import atomic_write_bytes
from ..format.errors import FormatError, ReadOnly
from ..format.fileio import LocalFile
from .layers import LayerOpenError, RemoteOpener, open_lower_source
from .prefetch import (
    DEFAULT_CONCURRENCY,
    BackgroundReader,
    PrefetchPlan,
    PriorityListReplayer,
    TraceRecorder,
    TraceReplayer,
    plan_prefetch,
)

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
        #: the running TraceRecorder/TraceReplayer, if any; stopped by close() before the layers close
        self.prefetcher: TraceRecorder | BackgroundReader | None = None
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
        prefetcher, self.prefetcher = self.prefetcher, None
        if prefetcher is not None:
            try:
                prefetcher.close()  # record: dump the trace; replay: stop and join the readers
            except Exception as e:  # the image must close whatever happened to the prefetch
                log.warning("%s: stopping trace prefetch: %s", self.name, e)
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
        return list(cfg.lowers[:-1])  # its <dir>/trace is replayed by image.prefetch
    return list(cfg.lowers)


def open_lowers(
    cfg: DeviceConfig,
    service: Any,
    remote_opener: RemoteOpener | None,
    owned: list[Any],
    *,
    recorder: TraceRecorder | None = None,
    layer_files: list[Any] | None = None,
) -> list[Any]:
    """Open every lower (bottom -> top) as a read-only LSMT layer; every opened object is appended to `owned`.

    `recorder` wraps each layer file (the LSMT file after tar/ZFile unwrapping) to record its
    reads; `layer_files` receives those files, bottom first (what a trace's offsets refer to).
    """
    from ..format import lsmt, opener

    name = cfg.path or "<config>"
    layers = []
    for i, lower in enumerate(effective_lowers(cfg)):
        src = open_lower_source(name, i, lower, cfg.repo_blob_url, service, remote_opener, cfg.download)
        owned.append(src)
        try:
            f = opener.unwrap(src)
            owned[-1] = f  # the unwrapped view owns (and closes) its source
            if recorder is not None:
                f = owned[-1] = recorder.wrap(f, i)
            if layer_files is not None:
                layer_files.append(f)
            if lower.target_file:
                layer = _open_warp_lower(f, lower.target_file)
            else:
                layer = lsmt.open_ro(f)
        except FormatError as e:
            raise ImageOpenError(name, f"lowers[{i}]", str(e)) from e
        owned[-1] = layer  # the layer owns (and closes) its source
        layers.append(layer)
    return layers


def _open_warp_lower(src: Any, target_path: str) -> Any:
    """A TurboOCI lower: the (unwrapped) committed fs-meta layer plus the original layer tar it points into."""
    from ..format import lsmt

    target = LocalFile(target_path)
    try:
        return lsmt.open_warp_ro(src, target)
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
    plan = plan_prefetch(cfg, name)
    recorder = TraceRecorder(plan.path, name) if plan is not None and plan.mode == "record" else None
    layer_files: list[Any] = []
    owned: list[Any] = []
    try:
        layers = open_lowers(cfg, service, remote_opener, owned, recorder=recorder, layer_files=layer_files)
        upper: lsmt.WritableLayer | None = None
        if cfg.writable and cfg.upper is not None:
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
    image = Image(name, stack, cfg, download)
    if plan is not None:
        image.prefetcher = start_prefetch(plan, image, layer_files, service, recorder)
    return image


def start_prefetch(
    plan: PrefetchPlan, image: Image, layer_files: list[Any], service: Any, recorder: TraceRecorder | None
) -> TraceRecorder | BackgroundReader | None:
    """Begin recording or start the background replay; never raises (prefetch must not fail an image)."""
    name = image.name
    try:
        if plan.mode == "record" and recorder is not None:
            return recorder if recorder.start() else None
        prefetch_config = getattr(service, "prefetch_config", None)
        concurrency = getattr(prefetch_config, "concurrency", DEFAULT_CONCURRENCY) or DEFAULT_CONCURRENCY
        replayer: BackgroundReader
        if plan.mode == "replay":
            replayer = TraceReplayer(plan.path, layer_files, concurrency, name)
        else:
            replayer = PriorityListReplayer(plan.path, image, concurrency, name)
        replayer.start()
        return replayer
    except Exception as e:
        log.warning("%s: trace prefetch (%s of %s) not started: %s", name, plan.mode, plan.path, e)
    return None


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
