"""`/etc/overlaybd-snapshotter/config.json`: the proxy snapshotter's boot config (upstream BootConfig).

`SnapshotterConfig` is filled only from the `SNAPSHOTTER` table (upstream's JSON spelling,
defaults and meaning), which is also the README reference. Errors are `ConfigError`s naming
the file and the dotted field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .schema import REQUIRED, ConfigError, Setting, Table, load_file, markdown_tables, parse_section, to_json_dict
from .service import DEFAULT_PATH as OVERLAYBD_JSON_PATH

DEFAULT_PATH = "/etc/overlaybd-snapshotter/config.json"
DEFAULT_ROOT = "/var/lib/containerd/io.containerd.snapshotter.v1.overlaybd"
DEFAULT_ADDRESS = "/run/overlaybd-snapshotter/overlaybd.sock"
TRACE_SUBDIR = "trace"  # traceDir default: <root>/trace

RW_MODES = ("overlayfs", "dir", "dev")
WRITABLE_LAYER_TYPES = ("append", "sparse")
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "fatal", "panic")
REQUIRED_FS_TYPES = ("ext4", "erofs")  # upstream main.go appends the missing ones


def _quota(v: str) -> str | None:
    if v == "":
        return None
    num = v[:-1] if v[-1:].lower() in ("k", "m", "g", "t") else v
    return None if num.isdigit() and len(num) <= 18 else f'must be a size like "20g"; got {json.dumps(v[:40])}'


def _nonempty(v: str) -> str | None:
    return None if v else "must not be empty"


@dataclass(frozen=True)
class ExporterConfig:
    enable: bool
    uri_prefix: str
    port: int


@dataclass(frozen=True)
class MirrorRegistry:
    host: str
    insecure: bool
    mirror_of: tuple[str, ...]


@dataclass(frozen=True)
class SnapshotterConfig:
    """The parsed config.json; `trace_dir` is already resolved to an absolute path."""

    root: str
    address: str
    verbose: str
    log_report_caller: bool
    async_remove: bool
    rw_mode: str
    auto_remove_dev: bool
    writable_layer_type: str
    default_fs_type: str
    rootfs_quota: str
    tenant: int
    runtime_type: str
    exporter_config: ExporterConfig
    mirror_registry: tuple[MirrorRegistry, ...]
    turbo_fs_type: tuple[str, ...]
    trace_dir: str
    overlaybd_config_path: str
    path: str  # where it was loaded from (not a JSON key)

    def insecure_hosts(self) -> set[str]:
        return {m.host for m in self.mirror_registry if m.insecure}


def _finish(cfg: SnapshotterConfig, path: str, prefix: str) -> SnapshotterConfig:
    """Derived values: traceDir under root when unset; the fs types upstream always allows."""
    missing = tuple(fs for fs in REQUIRED_FS_TYPES if fs not in cfg.turbo_fs_type)
    return dataclasses.replace(
        cfg,
        trace_dir=cfg.trace_dir or os.path.join(cfg.root, TRACE_SUBDIR),
        turbo_fs_type=cfg.turbo_fs_type + missing,
    )


SNAPSHOTTER = Table(
    SnapshotterConfig,
    (
        Setting(
            "root", "root", "str", DEFAULT_ROOT, "snapshot root: `metadata.db` and `snapshots/<id>/`", absolute=True
        ),
        Setting(
            "address",
            "address",
            "str",
            DEFAULT_ADDRESS,
            "unix socket serving containerd's snapshots API",
            absolute=True,
        ),
        Setting("verbose", "verbose", "str", "info", "log level", choices=LOG_LEVELS),
        Setting("logReportCaller", "log_report_caller", "bool", False, "log the calling function"),
        Setting("asyncRemove", "async_remove", "bool", False, "defer directory removal to Cleanup"),
        Setting("rwMode", "rw_mode", "str", "overlayfs", "container rootfs", choices=RW_MODES),
        Setting(
            "autoRemoveDev",
            "auto_remove_dev",
            "bool",
            False,
            "detach a layer device when its last container is removed",
        ),
        Setting(
            "writableLayerType",
            "writable_layer_type",
            "str",
            "append",
            "writable layer of `rwMode: dev`",
            choices=WRITABLE_LAYER_TYPES,
        ),
        Setting("defaultFsType", "default_fs_type", "str", "ext4", "filesystem when a layer has no blob-fs-type label"),
        Setting(
            "rootfsQuota",
            "rootfs_quota",
            "str",
            "",
            'overlayfs-mode rootfs quota such as "20g" (accepted, not enforced)',
            check=_quota,
        ),
        Setting("tenant", "tenant", "int", -1, "HBA number / NAA prefix override (-1: HBA 999999999, prefix 199)"),
        Setting(
            "runtimeType", "runtime_type", "str", "containerd", "container runtime", choices=("containerd", "docker")
        ),
        Setting(
            "exporterConfig",
            "exporter_config",
            "section",
            None,
            "metrics",
            null_is_unset=True,
            table=Table(
                ExporterConfig,
                (
                    Setting("enable", "enable", "bool", False, "serve Prometheus metrics"),
                    Setting("uriPrefix", "uri_prefix", "str", "/metrics", "metrics URI"),
                    Setting("port", "port", "int", 9863, "metrics port", lo=0, hi=65535),
                ),
            ),
        ),
        Setting(
            "mirrorRegistry",
            "mirror_registry",
            "sections",
            (),
            "registries with per-host settings",
            null_is_unset=True,
            table=Table(
                MirrorRegistry,
                (
                    Setting("host", "host", "str", REQUIRED, "registry host[:port]", check=_nonempty),
                    Setting("insecure", "insecure", "bool", False, "use http:// for that host"),
                    Setting(
                        "mirrorOf",
                        "mirror_of",
                        "strings",
                        (),
                        "registries (`docker.io`, `host:port`, `*` for all) this host mirrors: tried before them, in "
                        "list order, by every registry client (docs/registry.md); empty: per-host settings only",
                    ),
                ),
            ),
        ),
        Setting(
            "turboFsType",
            "turbo_fs_type",
            "strings",
            ("erofs", "ext4"),
            "TurboOCI fs preference (accepted, unused); `ext4` and `erofs` are appended when missing",
        ),
        Setting(
            "traceDir",
            "trace_dir",
            "str",
            "",
            "where a `record-trace-path` label may point besides the snapshot's own dir; under `root`, the "
            "snapshotter's private root-only state on one filesystem, so a label cannot aim writes elsewhere",
            absolute=True,
            empty_is_unset=True,
            shown_default="`<root>/trace`",
        ),
        Setting(
            "overlaybdConfigPath",
            "overlaybd_config_path",
            "str",
            OVERLAYBD_JSON_PATH,
            "overlaybd.json the snapshotter reads settings it shares with overlaybd-tcmu from (e.g. `readDeadlineSec`)",
            absolute=True,
        ),
    ),
    path_field="path",
    finish=_finish,
)


def config_from_dict(data: object, path: str = "<config.json>") -> SnapshotterConfig:
    """Validate parsed JSON; unknown keys are logged (upstream ignores them), bad ones raise."""
    return parse_section(SNAPSHOTTER, data, path)


def load_config(path: str | os.PathLike[str] = DEFAULT_PATH) -> SnapshotterConfig:
    """Read and validate a config.json file."""
    return load_file(SNAPSHOTTER, path)


def config_to_dict(cfg: SnapshotterConfig) -> dict[str, object]:
    """The JSON object (upstream spelling) for `cfg`."""
    return to_json_dict(SNAPSHOTTER, cfg)


def reference_markdown() -> str:
    """Markdown reference of every field, generated from the settings table."""
    return markdown_tables(SNAPSHOTTER)


__all__ = [
    "ConfigError",
    "DEFAULT_PATH",
    "ExporterConfig",
    "MirrorRegistry",
    "SNAPSHOTTER",
    "SnapshotterConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "reference_markdown",
]
