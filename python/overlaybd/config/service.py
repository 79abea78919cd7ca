"""`/etc/overlaybd/overlaybd.json` (upstream GlobalConfig): the service-wide settings.

`ServiceConfig` and its nested dataclasses are filled only from the `SERVICE` table, which is
also the README reference. Upstream's legacy top-level keys (`registryCacheDir`,
`registryCacheSizeGB`, `cacheType`, `logPath`, `logLevel`, `credentialFilePath`) are aliases of
the modern fields in the table: a modern key that is present and not `""` wins, else the legacy
key, else the default; consumers only read `cache_config`, `log_config` and `credential_config`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import __version__
from .schema import (
    U32,
    ConfigError,
    Setting,
    Table,
    load_file,
    markdown_tables,
    parse_section,
    to_json_dict,
)

DEFAULT_PATH = "/etc/overlaybd/overlaybd.json"
DEFAULT_USER_AGENT = f"overlaybd/{__version__}"


def _refill_size(v: int) -> str | None:
    if v <= 0 or v & (v - 1) or v % 4096:
        return f"must be a power of 2 and a multiple of 4096, got {v}"
    return None


@dataclass(frozen=True)
class DownloadConfig:
    """Background download of whole layers (also the `download` object of config.v1.json)."""

    enable: bool
    delay: int
    delay_extra: int
    max_mbps: int
    try_cnt: int
    block_size: int


@dataclass(frozen=True)
class LogConfig:
    log_level: int
    log_path: str
    log_size_mb: int
    log_rotate_num: int


@dataclass(frozen=True)
class CacheConfig:
    cache_type: str
    cache_dir: str
    cache_size_gb: int
    refill_size: int
    block_size: int


@dataclass(frozen=True)
class GzipCacheConfig:
    enable: bool
    cache_dir: str
    cache_size_gb: int
    refill_size: int


@dataclass(frozen=True)
class CredentialConfig:
    mode: str
    path: str
    timeout: int
    client_cert_path: str
    client_key_path: str
    server_ca_path: str


@dataclass(frozen=True)
class P2PConfig:
    enable: bool
    address: str


@dataclass(frozen=True)
class ExporterConfig:
    enable: bool
    uri_prefix: str
    port: int
    update_interval: int


@dataclass(frozen=True)
class MirrorConfig:
    """Registry mirrors (docs/registry.md "Mirrors"): containerd's hosts directory and the snapshotter's list."""

    hosts_dir: str
    snapshotter_config: str
    retry_sec: int


@dataclass(frozen=True)
class PrefetchConfig:
    concurrency: int


@dataclass(frozen=True)
class CertConfig:
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class ServiceAPIConfig:
    enable: bool
    address: str


@dataclass(frozen=True)
class ServiceConfig:
    """A parsed overlaybd.json; legacy keys already folded into the modern sections."""

    log_config: LogConfig
    cache_config: CacheConfig
    gzip_cache_config: GzipCacheConfig
    credential_config: CredentialConfig
    io_engine: int
    download: DownloadConfig
    enable_audit: bool
    audit_path: str
    enable_thread: bool
    p2p_config: P2PConfig
    exporter_config: ExporterConfig
    registry_fs_version: str
    prefetch_config: PrefetchConfig
    cert_config: CertConfig
    user_agent: str
    service_config: ServiceAPIConfig
    read_deadline_sec: int
    mirror_config: MirrorConfig
    path: str  # where it was loaded from (not a JSON key)


DOWNLOAD = Table(
    DownloadConfig,
    (
        Setting("enable", "enable", "bool", False, "background download of whole layers into `lowers[].dir`"),
        Setting("delay", "delay", "int", 300, "seconds to wait before the first download"),
        Setting("delayExtra", "delay_extra", "int", 30, "random extra delay, seconds (<= 0 means 30)"),
        Setting("maxMBps", "max_mbps", "int", 100, "throughput cap, MiB/s"),
        Setting("tryCnt", "try_cnt", "int", 5, "attempts per layer"),
        Setting("blockSize", "block_size", "int", 262144, "download block size, bytes", lo=1, hi=U32[1]),
    ),
)

LOG = Table(
    LogConfig,
    (
        Setting(
            "logLevel", "log_level", "int", 1, "0 DEBUG, 1 INFO, 2 WARN, 3 ERROR", lo=0, hi=3, aliases=("logLevel",)
        ),
        Setting(
            "logPath",
            "log_path",
            "str",
            "/var/log/overlaybd.log",
            "log file",
            empty_is_unset=True,
            aliases=("logPath",),
        ),
        Setting("logSizeMB", "log_size_mb", "int", 10, "rotate the log at this size, MiB", lo=0, hi=U32[1]),
        Setting("logRotateNum", "log_rotate_num", "int", 3, "rotated log files kept"),
    ),
)

CACHE = Table(
    CacheConfig,
    (
        Setting(
            "cacheType",
            "cache_type",
            "str",
            "file",
            "registry block cache",
            choices=("file", "ocf", "download"),
            empty_is_unset=True,
            aliases=("cacheType",),
        ),
        Setting(
            "cacheDir",
            "cache_dir",
            "str",
            "/opt/overlaybd/registry_cache",
            "directory of cached blobs",
            empty_is_unset=True,
            aliases=("registryCacheDir",),
        ),
        Setting(
            "cacheSizeGB",
            "cache_size_gb",
            "int",
            4,
            "cache capacity, GiB",
            lo=0,
            hi=U32[1],
            aliases=("registryCacheSizeGB",),
        ),
        Setting(
            "refillSize",
            "refill_size",
            "int",
            262144,
            "a cache miss fetches this aligned amount, bytes",
            lo=0,
            hi=U32[1],
            check=_refill_size,
        ),
        Setting("blockSize", "block_size", "int", 65536, "ocf cache block size, bytes", lo=0, hi=U32[1]),
    ),
)

GZIP_CACHE = Table(
    GzipCacheConfig,
    (
        Setting("enable", "enable", "bool", False, "cache decompressed data of gzip (TurboOCI) layers"),
        Setting("cacheDir", "cache_dir", "str", "/opt/overlaybd/gzip_cache", "directory of the gzip cache"),
        Setting("cacheSizeGB", "cache_size_gb", "int", 4, "gzip cache capacity, GiB", lo=0, hi=U32[1]),
        Setting(
            "refillSize",
            "refill_size",
            "int",
            1048576,
            "gzip cache refill size, bytes",
            lo=0,
            hi=U32[1],
            check=_refill_size,
        ),
    ),
)

CREDENTIAL = Table(
    CredentialConfig,
    (
        Setting(
            "mode",
            "mode",
            "str",
            "file",
            "where registry credentials come from",
            choices=("file", "http", "https", "uds"),
            empty_is_unset=True,
        ),
        Setting(
            "path",
            "path",
            "str",
            "/opt/overlaybd/cred.json",
            "credential file, URL or socket path",
            empty_is_unset=True,
            aliases=("credentialFilePath",),
        ),
        Setting("timeout", "timeout", "int", 1, "seconds, for http/https/uds"),
        Setting("client_cert_path", "client_cert_path", "str", "", "https: client certificate"),
        Setting("client_key_path", "client_key_path", "str", "", "https: client key"),
        Setting("server_ca_path", "server_ca_path", "str", "", "https: CA of the credential server"),
    ),
)

SERVICE = Table(
    ServiceConfig,
    (
        Setting("logConfig", "log_config", "section", None, "logging", table=LOG),
        Setting("cacheConfig", "cache_config", "section", None, "registry block cache", table=CACHE),
        Setting("gzipCacheConfig", "gzip_cache_config", "section", None, "gzip cache", table=GZIP_CACHE),
        Setting("credentialConfig", "credential_config", "section", None, "credentials", table=CREDENTIAL),
        Setting(
            "ioEngine", "io_engine", "int", 0, "0 psync, 1 libaio, 2 posix aio (all served by pread here)", lo=0, hi=2
        ),
        Setting("download", "download", "section", None, "background download", table=DOWNLOAD),
        Setting("enableAudit", "enable_audit", "bool", True, "write the audit log"),
        Setting("auditPath", "audit_path", "str", "/var/log/overlaybd-audit.log", "audit log file"),
        Setting("enableThread", "enable_thread", "bool", False, "one OS thread per device"),
        Setting(
            "p2pConfig",
            "p2p_config",
            "section",
            None,
            "P2P proxy",
            table=Table(
                P2PConfig,
                (
                    Setting("enable", "enable", "bool", False, "fetch blobs through a P2P proxy"),
                    Setting("address", "address", "str", "http://localhost:9731/accelerator", "P2P proxy prefix"),
                ),
            ),
        ),
        Setting(
            "exporterConfig",
            "exporter_config",
            "section",
            None,
            "metrics",
            table=Table(
                ExporterConfig,
                (
                    Setting("enable", "enable", "bool", False, "serve Prometheus metrics"),
                    Setting("uriPrefix", "uri_prefix", "str", "/metrics", "metrics URL path"),
                    Setting("port", "port", "int", 9863, "metrics port (127.0.0.1)", lo=1, hi=65535),
                    Setting(
                        "updateInterval", "update_interval", "int", 60000000, "metrics update interval, microseconds"
                    ),
                ),
            ),
        ),
        Setting(
            "registryFsVersion",
            "registry_fs_version",
            "str",
            "v2",
            "registry client flavour (same behaviour here)",
            choices=("v1", "v2"),
        ),
        Setting(
            "prefetchConfig",
            "prefetch_config",
            "section",
            None,
            "trace prefetch",
            table=Table(
                PrefetchConfig,
                (
                    Setting(
                        "concurrency", "concurrency", "int", 16, "threads replaying a prefetch trace", lo=1, hi=1024
                    ),
                ),
            ),
        ),
        Setting(
            "certConfig",
            "cert_config",
            "section",
            None,
            "registry TLS client certificate",
            table=Table(
                CertConfig,
                (
                    Setting("certFile", "cert_file", "str", "", "TLS client certificate for the registry"),
                    Setting("keyFile", "key_file", "str", "", "TLS client key for the registry"),
                ),
            ),
        ),
        Setting(
            "userAgent",
            "user_agent",
            "str",
            DEFAULT_USER_AGENT,
            "HTTP User-Agent",
            empty_is_unset=True,
            shown_default='`"overlaybd/<version>"`',
        ),
        Setting(
            "serviceConfig",
            "service_config",
            "section",
            None,
            "live-snapshot API",
            table=Table(
                ServiceAPIConfig,
                (
                    Setting("enable", "enable", "bool", False, "serve the live-snapshot API"),
                    Setting("address", "address", "str", "http://127.0.0.1:9862", "live-snapshot API address"),
                ),
            ),
        ),
        Setting(
            "readDeadlineSec",
            "read_deadline_sec",
            "int",
            30,
            "overall deadline of one block read from a registry, retries included; after it the device "
            "request fails with EIO",
            lo=1,
            hi=3600,
        ),
        Setting(
            "mirrorConfig",
            "mirror_config",
            "section",
            None,
            "registry mirrors",
            table=Table(
                MirrorConfig,
                (
                    Setting(
                        "hostsDir",
                        "hosts_dir",
                        "str",
                        "/etc/containerd/certs.d",
                        "containerd's registry hosts directory: `<hostsDir>/<registry>/hosts.toml` (or `_default/`) "
                        'lists mirrors tried in order before the registry; `""` turns it off',
                    ),
                    Setting(
                        "snapshotterConfig",
                        "snapshotter_config",
                        "str",
                        "/etc/overlaybd-snapshotter/config.json",
                        "snapshotter config whose `mirrorRegistry` entries with `mirrorOf` are tried first; "
                        '`""` turns it off',
                    ),
                    Setting(
                        "retrySec",
                        "retry_sec",
                        "int",
                        30,
                        "a mirror that failed (refused, 5xx, 404) is skipped for this long, then tried again",
                        lo=1,
                        hi=3600,
                    ),
                ),
            ),
        ),
    ),
    path_field="path",
)


def service_config_from_dict(data: object, path: str = "<overlaybd.json>") -> ServiceConfig:
    """Parse an already-decoded overlaybd.json document (legacy keys resolved)."""
    return parse_section(SERVICE, data, path)


def default_service_config() -> ServiceConfig:
    """The configuration upstream uses when every field is missing."""
    return service_config_from_dict({})


def load_service_config(path: str | os.PathLike[str] = DEFAULT_PATH) -> ServiceConfig:
    """Read and validate overlaybd.json. Raises ConfigError naming the file and field."""
    return load_file(SERVICE, path)


def service_config_to_dict(cfg: ServiceConfig) -> dict[str, object]:
    """JSON object with upstream key spelling (effective values, modern keys only)."""
    return to_json_dict(SERVICE, cfg)


def reference_markdown() -> str:
    """The configuration reference of overlaybd.json, generated from the settings table."""
    return markdown_tables(SERVICE)


__all__ = [
    "CacheConfig",
    "CertConfig",
    "ConfigError",
    "CredentialConfig",
    "DEFAULT_PATH",
    "DOWNLOAD",
    "DownloadConfig",
    "ExporterConfig",
    "GzipCacheConfig",
    "LogConfig",
    "MirrorConfig",
    "P2PConfig",
    "PrefetchConfig",
    "SERVICE",
    "ServiceAPIConfig",
    "ServiceConfig",
    "default_service_config",
    "load_service_config",
    "reference_markdown",
    "service_config_from_dict",
    "service_config_to_dict",
]
