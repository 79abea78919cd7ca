"""`/etc/overlaybd-snapshotter/config.json`: the proxy snapshotter's boot config (upstream BootConfig).

One table (`SETTINGS`) holds every scalar field with upstream's JSON spelling, default and
meaning; parsing, defaults and `reference_markdown()` all come from it. The two list fields
(`mirrorRegistry`, `turboFsType`) and the `exporterConfig` object are checked by hand below.
Errors are `ConfigError`s naming the file and the dotted field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .schema import ConfigError, Setting, check_value, log, read_json

DEFAULT_PATH = "/etc/overlaybd-snapshotter/config.json"
DEFAULT_ROOT = "/var/lib/containerd/io.containerd.snapshotter.v1.overlaybd"
DEFAULT_ADDRESS = "/run/overlaybd-snapshotter/overlaybd.sock"

RW_MODES = ("overlayfs", "dir", "dev")
WRITABLE_LAYER_TYPES = ("append", "sparse")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "fatal", "panic")


def _one_of(*choices: str):
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}; got {json.dumps(v)}"

    return check


def _quota(v: str) -> str | None:
    if v == "":
        return None
    num = v[:-1] if v[-1:].lower() in ("k", "m", "g", "t") else v
    return None if num.isdigit() else f'must be a size like "20g"; got {json.dumps(v)}'


SETTINGS: tuple[Setting, ...] = (
    Setting("root", "str", DEFAULT_ROOT, "snapshot root: `metadata.db` and `snapshots/<id>/`"),
    Setting("address", "str", DEFAULT_ADDRESS, "unix socket serving containerd.services.snapshots.v1"),
    Setting("verbose", "str", "info", "log level", _one_of(*LOG_LEVELS)),
    Setting("logReportCaller", "bool", False, "log the calling function"),
    Setting("asyncRemove", "bool", False, "defer directory removal to Cleanup"),
    Setting("rwMode", "str", "overlayfs", "container rootfs: `overlayfs`, `dir` or `dev`", _one_of(*RW_MODES)),
    Setting("autoRemoveDev", "bool", False, "detach a layer device when its last container is removed"),
    Setting(
        "writableLayerType", "str", "append", "writable layer: `append` or `sparse`", _one_of(*WRITABLE_LAYER_TYPES)
    ),
    Setting("defaultFsType", "str", "ext4", "filesystem when a layer has no blob-fs-type label"),
    Setting("rootfsQuota", "str", "", 'overlayfs-mode rootfs quota such as "20g" (accepted, not enforced)', _quota),
    Setting("tenant", "int", -1, "HBA number / NAA prefix override (-1: HBA 999999999, prefix 199)"),
    Setting("runtimeType", "str", "containerd", "`containerd` or `docker`", _one_of("containerd", "docker")),
)

EXPORTER_SETTINGS: tuple[Setting, ...] = (
    Setting("enable", "bool", False, "serve Prometheus metrics"),
    Setting("uriPrefix", "str", "/metrics", "metrics URI"),
    Setting("port", "int", 9863, "metrics port"),
)


def _attr(key: str) -> str:
    out = []
    for i, ch in enumerate(key):
        if ch.isupper() and i and not key[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


@dataclass
class ExporterConfig:
    enable: bool = False
    uri_prefix: str = "/metrics"
    port: int = 9863


@dataclass
class MirrorRegistry:
    host: str
    insecure: bool = False


@dataclass
class SnapshotterConfig:
    """The parsed config.json; attribute names are the JSON keys in snake_case."""

    root: str = DEFAULT_ROOT
    address: str = DEFAULT_ADDRESS
    verbose: str = "info"
    log_report_caller: bool = False
    async_remove: bool = False
    rw_mode: str = "overlayfs"
    auto_remove_dev: bool = False
    writable_layer_type: str = "append"
    default_fs_type: str = "ext4"
    rootfs_quota: str = ""
    tenant: int = -1
    runtime_type: str = "containerd"
    exporter_config: ExporterConfig = field(default_factory=ExporterConfig)
    mirror_registry: list[MirrorRegistry] = field(default_factory=list)
    turbo_fs_type: list[str] = field(default_factory=lambda: ["erofs", "ext4"])
    path: str = ""  # where it was loaded from (not serialised)

    def insecure_hosts(self) -> set[str]:
        return {m.host for m in self.mirror_registry if m.insecure}


def config_from_dict(data: Any, path: str = "<config.json>") -> SnapshotterConfig:
    """Validate parsed JSON; unknown keys are logged (upstream ignores them), bad ones raise."""
    if not isinstance(data, dict):
        raise ConfigError(path, "(top level)", f"expected object, got {json.dumps(data)[:60]}")
    cfg = SnapshotterConfig(path=path)
    known = {s.key: s for s in SETTINGS}
    for key, value in data.items():
        if key in known:
            setattr(cfg, _attr(key), check_value(path, key, known[key], value))
        elif key == "exporterConfig":
            cfg.exporter_config = _exporter(value, path)
        elif key == "mirrorRegistry":
            cfg.mirror_registry = _mirrors(value, path)
        elif key == "turboFsType":
            cfg.turbo_fs_type = _string_list(value, path, key)
        else:
            log.warning("%s: %s: unknown field ignored", path, key)
    cfg.root = cfg.root.strip()
    cfg.address = cfg.address.strip()
    for key in ("root", "address"):
        value = getattr(cfg, key)
        if not value:
            raise ConfigError(path, key, "must be set")
        if not os.path.isabs(value):
            raise ConfigError(path, key, f"must be an absolute path; got {json.dumps(value)}")
    for fs in ("ext4", "erofs"):  # upstream main.go appends the missing ones
        if fs not in cfg.turbo_fs_type:
            cfg.turbo_fs_type.append(fs)
    return cfg


def _exporter(value: Any, path: str) -> ExporterConfig:
    if value is None:
        return ExporterConfig()
    if not isinstance(value, dict):
        raise ConfigError(path, "exporterConfig", f"expected object, got {json.dumps(value)[:60]}")
    out = ExporterConfig()
    known = {s.key: s for s in EXPORTER_SETTINGS}
    for key, v in value.items():
        if key not in known:
            log.warning("%s: exporterConfig.%s: unknown field ignored", path, key)
            continue
        setattr(out, _attr(key), check_value(path, f"exporterConfig.{key}", known[key], v))
    if not 0 <= out.port <= 65535:
        raise ConfigError(path, "exporterConfig.port", f"must be 0..65535; got {out.port}")
    return out


def _mirrors(value: Any, path: str) -> list[MirrorRegistry]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(path, "mirrorRegistry", f"expected array, got {json.dumps(value)[:60]}")
    out = []
    for i, item in enumerate(value):
        where = f"mirrorRegistry[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(path, where, f"expected object, got {json.dumps(item)[:60]}")
        host = item.get("host")
        if not isinstance(host, str) or not host:
            raise ConfigError(path, f"{where}.host", f"expected non-empty string, got {json.dumps(host)}")
        insecure = item.get("insecure", False)
        if not isinstance(insecure, bool):
            raise ConfigError(path, f"{where}.insecure", f"expected boolean, got {json.dumps(insecure)}")
        out.append(MirrorRegistry(host, insecure))
    return out


def _string_list(value: Any, path: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(path, key, f"expected array of strings, got {json.dumps(value)[:60]}")
    return list(value)


def load_config(path: str | os.PathLike[str] = DEFAULT_PATH) -> SnapshotterConfig:
    """Read and validate a config.json file."""
    p = os.fspath(path)
    return config_from_dict(read_json(p), p)


def config_to_dict(cfg: SnapshotterConfig) -> dict[str, Any]:
    """The JSON object (upstream spelling) for `cfg`."""
    out: dict[str, Any] = {s.key: getattr(cfg, _attr(s.key)) for s in SETTINGS}
    out["exporterConfig"] = {s.key: getattr(cfg.exporter_config, _attr(s.key)) for s in EXPORTER_SETTINGS}
    out["mirrorRegistry"] = [{"host": m.host, "insecure": m.insecure} for m in cfg.mirror_registry]
    out["turboFsType"] = list(cfg.turbo_fs_type)
    return out


def reference_markdown() -> str:
    """Markdown table of every field, generated from the settings tables (used by docs/snapshotter.md)."""
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        rows.append(f"| `{s.key}` | {s.kind} | `{json.dumps(s.default)}` | {s.doc} |")
    for s in EXPORTER_SETTINGS:
        rows.append(f"| `exporterConfig.{s.key}` | {s.kind} | `{json.dumps(s.default)}` | {s.doc} |")
    rows.append("| `mirrorRegistry` | [{host, insecure}] | `[]` | `insecure: true` => http:// for that host |")
    rows.append('| `turboFsType` | [string] | `["erofs","ext4"]` | TurboOCI fs preference (accepted, unused) |')
    return "\n".join(rows) + "\n"
