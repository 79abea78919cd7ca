"""`config.v1.json`: one overlaybd block device (upstream ImageConfig).

Written by the snapshotter per snapshot and read by the frontends (TCMU/FUSE) and by
tools such as overlaybd-merge. `lowers` are bottom -> top. The JSON key spelling is
upstream's (`repoBlobUrl`, `targetFile`, ...); attributes are the same keys in
snake_case. Writes are atomic so a crash never leaves half a config for the next attach.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..format.atomic import atomic_write_bytes
from .schema import (
    ConfigError,
    Section,
    Setting,
    check_value,
    log,
    model,
    models,
    parse_section,
    read_json,
    to_json_dict,
)
from .service import DOWNLOAD, DownloadConfig

MAX_LOWERS = 255  # upstream MAX_STACK_LAYERS

LOWER = Section(
    "lowers[]",
    "LowerLayer",
    (
        Setting("file", "str", "", "local layer file, tried first"),
        Setting("dir", "str", "", "layer dir: `overlaybd.commit`, `.commit`, `overlaybd.sealed` tried after `file`"),
        Setting("digest", "str", "", "blob digest in `repoBlobUrl` (remote layer)"),
        Setting("size", "u64", 0, "blob size in bytes (background download)"),
        Setting("targetFile", "str", "", "TurboOCI: local original OCI layer"),
        Setting("targetDigest", "str", "", "TurboOCI: remote original OCI layer"),
        Setting("gzipIndex", "str", "", "TurboOCI: gzip index of the target"),
    ),
    "One read-only layer of the device.",
)

UPPER = Section(
    "upper",
    "UpperLayer",
    (
        Setting("index", "str", "", "writable layer index file"),
        Setting("data", "str", "", "writable layer data file"),
        Setting("target", "str", "", "TurboOCI writable (warp) target"),
        Setting("gzipIndex", "str", "", "TurboOCI gzip index"),
    ),
    "The writable layer; read-only device if `index` or `data` is empty.",
    ignored=("vsize",),  # written by the snapshotter, ignored by upstream
)

globals().update(models(LOWER, __name__))
globals().update(models(UPPER, __name__))
LowerLayer = model(LOWER, __name__)
UpperLayer = model(UPPER, __name__)


@dataclass
class DeviceConfig:
    """A parsed config.v1.json. `lowers` bottom -> top; `upper` None = read-only device."""

    repo_blob_url: str = ""
    lowers: list[Any] = field(default_factory=list)
    upper: Any | None = None
    result_file: str = ""
    download: Any | None = None  # None: take overlaybd.json's `download`
    acceleration_layer: bool = False
    record_trace_path: str = ""
    path: str = ""  # where it was loaded from (not serialised)

    @property
    def writable(self) -> bool:
        return self.upper is not None and bool(self.upper.index) and bool(self.upper.data)


_TOP: dict[str, tuple[str, str]] = {
    # json key -> (attribute, kind) of the scalar top-level fields
    "repoBlobUrl": ("repo_blob_url", "str"),
    "resultFile": ("result_file", "str"),
    "accelerationLayer": ("acceleration_layer", "bool"),
    "recordTracePath": ("record_trace_path", "str"),
}


def device_config_from_dict(data: Any, path: str = "<config.v1.json>") -> DeviceConfig:
    """Validate a decoded config.v1.json document."""
    if not isinstance(data, dict):
        raise ConfigError(path, "(top level)", f"expected object, got {json.dumps(data)[:60]}")

    cfg = DeviceConfig(path=path)
    for key, value in data.items():
        if key in _TOP:
            attr, kind = _TOP[key]
            setattr(cfg, attr, check_value(path, key, Setting(key, kind, None, ""), value))
        elif key == "lowers":
            if not isinstance(value, list):
                raise ConfigError(path, "lowers", f"expected array, got {json.dumps(value)[:60]}")
            if len(value) > MAX_LOWERS:
                raise ConfigError(path, "lowers", f"{len(value)} layers, at most {MAX_LOWERS} are supported")
            cfg.lowers = [parse_section(LOWER, v, path, f"lowers[{i}]") for i, v in enumerate(value)]
        elif key == "upper":
            cfg.upper = parse_section(UPPER, value, path, "upper")
        elif key == "download":
            cfg.download = parse_section(DOWNLOAD, value, path, "download")
        else:
            log.warning("%s: %s: unknown field ignored", path, key)
    for i, lower in enumerate(cfg.lowers):
        if not (lower.file or lower.dir or lower.digest):
            raise ConfigError(path, f"lowers[{i}]", "needs at least one of file, dir, digest")
    if cfg.acceleration_layer and cfg.record_trace_path:
        raise ConfigError(path, "recordTracePath", "cannot be combined with accelerationLayer")
    return cfg


def load_device_config(path: str | os.PathLike[str]) -> DeviceConfig:
    """Read config.v1.json. Raises ConfigError naming the file and the field."""
    p = os.fspath(path)
    return device_config_from_dict(read_json(p), p)


def device_config_to_dict(cfg: DeviceConfig) -> dict[str, Any]:
    """JSON object with upstream key spelling; empty optional fields are left out."""
    out: dict[str, Any] = {}
    if cfg.repo_blob_url:
        out["repoBlobUrl"] = cfg.repo_blob_url
    out["lowers"] = [to_json_dict(LOWER, lo, skip_defaults=True) for lo in cfg.lowers]
    if cfg.upper is not None:
        out["upper"] = to_json_dict(UPPER, cfg.upper, skip_defaults=True)
    if cfg.result_file:
        out["resultFile"] = cfg.result_file
    if cfg.download is not None:
        out["download"] = to_json_dict(DOWNLOAD, cfg.download)
    if cfg.acceleration_layer:
        out["accelerationLayer"] = True
    if cfg.record_trace_path:
        out["recordTracePath"] = cfg.record_trace_path
    return out


def dump_device_config(cfg: DeviceConfig, path: str | os.PathLike[str]) -> None:
    """Write config.v1.json atomically (temp file + fsync + rename)."""
    text = json.dumps(device_config_to_dict(cfg), indent=2) + "\n"
    atomic_write_bytes(path, text.encode())


__all__ = [
    "ConfigError",
    "DeviceConfig",
    "DownloadConfig",
    "LowerLayer",
    "MAX_LOWERS",
    "UpperLayer",
    "device_config_from_dict",
    "device_config_to_dict",
    "dump_device_config",
    "load_device_config",
]
