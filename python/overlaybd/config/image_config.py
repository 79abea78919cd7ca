"""`config.v1.json`: the image of one overlaybd block device (upstream ImageConfig).

Written by the snapshotter per snapshot and read by the frontends (TCMU/FUSE) and by tools
such as overlaybd-merge. `lowers` are bottom -> top. `DeviceConfig` and its layer dataclasses
are filled only from the `DEVICE` table (JSON keys spelled as upstream spells them). Writes are
atomic so a crash never leaves half a config for the next attach.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..format.atomic import atomic_write_bytes
from .schema import U64, ConfigError, Setting, Table, load_file, markdown_tables, parse_section, to_json_dict
from .service import DOWNLOAD, DownloadConfig

MAX_LOWERS = 255  # upstream MAX_STACK_LAYERS


@dataclass(frozen=True)
class LowerLayer:
    """One read-only layer of the device: a local file/dir, a registry blob, or both."""

    file: str
    dir: str
    digest: str
    size: int
    target_file: str
    target_digest: str
    gzip_index: str


@dataclass(frozen=True)
class UpperLayer:
    """The writable layer; the device is read-only if `index` or `data` is empty."""

    index: str
    data: str
    target: str
    gzip_index: str


@dataclass(frozen=True)
class DeviceConfig:
    """A parsed config.v1.json. `lowers` bottom -> top; `upper` None = read-only device."""

    repo_blob_url: str
    lowers: tuple[LowerLayer, ...]
    upper: UpperLayer | None
    result_file: str
    download: DownloadConfig | None  # None: take overlaybd.json's `download`
    acceleration_layer: bool
    record_trace_path: str
    path: str  # where it was loaded from (not a JSON key)

    @property
    def writable(self) -> bool:
        return self.upper is not None and bool(self.upper.index) and bool(self.upper.data)


def _lower_has_source(lower: LowerLayer, path: str, prefix: str) -> LowerLayer:
    if not (lower.file or lower.dir or lower.digest):
        raise ConfigError(path, prefix, "needs at least one of file, dir, digest")
    return lower


def _trace_modes_exclusive(cfg: DeviceConfig, path: str, prefix: str) -> DeviceConfig:
    if cfg.acceleration_layer and cfg.record_trace_path:
        raise ConfigError(path, "recordTracePath", "cannot be combined with accelerationLayer")
    return cfg


LOWER = Table(
    LowerLayer,
    (
        Setting("file", "file", "str", "", "local layer file, tried first"),
        Setting(
            "dir", "dir", "str", "", "layer dir: `overlaybd.commit`, `.commit`, `overlaybd.sealed` tried after `file`"
        ),
        Setting("digest", "digest", "str", "", "blob digest in `repoBlobUrl` (remote layer)"),
        Setting("size", "size", "int", 0, "blob size in bytes (background download)", lo=0, hi=U64[1]),
        Setting("targetFile", "target_file", "str", "", "TurboOCI: local original OCI layer"),
        Setting("targetDigest", "target_digest", "str", "", "TurboOCI: remote original OCI layer"),
        Setting("gzipIndex", "gzip_index", "str", "", "TurboOCI: gzip index of the target"),
    ),
    finish=_lower_has_source,
)

UPPER = Table(
    UpperLayer,
    (
        Setting("index", "index", "str", "", "writable layer index file"),
        Setting("data", "data", "str", "", "writable layer data file"),
        Setting("target", "target", "str", "", "TurboOCI writable (warp) target"),
        Setting("gzipIndex", "gzip_index", "str", "", "TurboOCI gzip index"),
    ),
    ignored=("vsize",),  # written by the snapshotter, ignored by upstream
)

DEVICE = Table(
    DeviceConfig,
    (
        Setting("repoBlobUrl", "repo_blob_url", "str", "", "blob URL prefix; a lower's blob is `repoBlobUrl/<digest>`"),
        Setting(
            "lowers",
            "lowers",
            "sections",
            (),
            "layers bottom -> top; each needs `file`, `dir` or `digest`",
            table=LOWER,
            max_items=MAX_LOWERS,
        ),
        Setting("upper", "upper", "optional", None, "writable layer; absent = read-only device", table=UPPER),
        Setting(
            "resultFile",
            "result_file",
            "str",
            "",
            "written with `success` or `failed:<reason>` when the image opens",
        ),
        Setting(
            "download",
            "download",
            "optional",
            None,
            "background download of remote lowers (same fields as in overlaybd.json)",
            table=DOWNLOAD,
            shown_default="overlaybd.json's",
        ),
        Setting(
            "accelerationLayer",
            "acceleration_layer",
            "bool",
            False,
            "last lower is a trace layer: dropped, replayed",
        ),
        Setting(
            "recordTracePath",
            "record_trace_path",
            "str",
            "",
            "empty file: record a trace; trace file: replay it (not with `accelerationLayer`)",
        ),
    ),
    path_field="path",
    finish=_trace_modes_exclusive,
)


def device_config_from_dict(data: object, path: str = "<config.v1.json>") -> DeviceConfig:
    """Validate a decoded config.v1.json document."""
    return parse_section(DEVICE, data, path)


def load_device_config(path: str | os.PathLike[str]) -> DeviceConfig:
    """Read config.v1.json. Raises ConfigError naming the file and the field."""
    return load_file(DEVICE, path)


def device_config_to_dict(cfg: DeviceConfig) -> dict[str, object]:
    """JSON object with upstream key spelling; fields at their default are left out."""
    return to_json_dict(DEVICE, cfg, skip_defaults=True)


def dump_device_config(cfg: DeviceConfig, path: str | os.PathLike[str]) -> None:
    """Write config.v1.json atomically (temp file + fsync + rename)."""
    text = json.dumps(device_config_to_dict(cfg), indent=2) + "\n"
    atomic_write_bytes(path, text.encode())


def reference_markdown() -> str:
    """The configuration reference of config.v1.json, generated from the settings table."""
    return markdown_tables(DEVICE)


__all__ = [
    "ConfigError",
    "DEVICE",
    "DeviceConfig",
    "DownloadConfig",
    "LOWER",
    "LowerLayer",
    "MAX_LOWERS",
    "UPPER",
    "UpperLayer",
    "device_config_from_dict",
    "device_config_to_dict",
    "dump_device_config",
    "load_device_config",
    "reference_markdown",
]
