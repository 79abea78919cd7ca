"""`/etc/overlaybd/overlaybd.json` (upstream GlobalConfig): the service-wide settings.

The `SERVICE` table below is the only description of the file: `ServiceConfig` and its
nested section classes, the parser (type errors name file and dotted field), the
defaults and `reference_markdown()` are generated from it. Legacy top-level fields
(`registryCacheDir`, `registryCacheSizeGB`, `cacheType`, `logPath`, `logLevel`,
`credentialFilePath`) are resolved by `load_service_config` into the effective values
of the modern sections, exactly as upstream falls back to them, so consumers only ever
read `cache_config`, `log_config` and `credential_config`.
"""

from __future__ import annotations

import os
from typing import Any

from .schema import ConfigError, Section, Setting, markdown_table, model, models, parse_section, read_json, to_json_dict

DEFAULT_PATH = "/etc/overlaybd/overlaybd.json"


def _one_of(*choices: str):
    def check(v: Any) -> str | None:
        if v not in choices:
            return f"expected one of {', '.join(repr(c) for c in choices)}, got {v!r}"
        return None

    return check


def _max(limit: int):
    def check(v: int) -> str | None:
        return f"must be <= {limit}, got {v}" if v > limit else None

    return check


def _refill_size(v: int) -> str | None:
    if v <= 0 or v & (v - 1) or v % 4096:
        return f"must be a power of 2 and a multiple of 4096, got {v}"
    return None


def _port(v: int) -> str | None:
    return None if 0 < v < 65536 else f"must be a TCP port (1..65535), got {v}"


def _positive(v: int) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


DOWNLOAD = Section(
    "download",
    "DownloadConfig",
    (
        Setting("enable", "bool", False, "background download of whole layers into `lowers[].dir`"),
        Setting("delay", "int", 300, "seconds to wait before the first download"),
        Setting("delayExtra", "int", 30, "random extra delay, seconds (<= 0 means 30)"),
        Setting("maxMBps", "int", 100, "throughput cap, MiB/s"),
        Setting("tryCnt", "int", 5, "attempts per layer"),
        Setting("blockSize", "u32", 262144, "download block size, bytes", _positive),
    ),
    "Background download settings (also the `download` object of config.v1.json).",
)

SERVICE = Section(
    "",
    "ServiceConfig",
    (
        Section(
            "logConfig",
            "LogConfig",
            (
                Setting("logLevel", "u32", 1, "0 DEBUG, 1 INFO, 2 WARN, 3 ERROR", _max(3)),
                Setting("logPath", "str", "", 'log file; `""` falls back to legacy `logPath`/`logLevel`'),
                Setting("logSizeMB", "u32", 10, "rotate the log at this size, MiB"),
                Setting("logRotateNum", "int", 3, "rotated log files kept"),
            ),
        ),
        Setting("logLevel", "u32", 1, "legacy: log level, used when `logConfig.logPath` is empty", _max(3)),
        Setting("logPath", "str", "/var/log/overlaybd.log", "legacy: log file, used when `logConfig.logPath` is empty"),
        Section(
            "cacheConfig",
            "CacheConfig",
            (
                Setting(
                    "cacheType",
                    "str",
                    "",
                    '`file`, `ocf` or `download`; `""` falls back to the legacy `cacheType`, '
                    "`registryCacheDir`, `registryCacheSizeGB`",
                    _one_of("", "file", "ocf", "download"),
                ),
                Setting("cacheDir", "str", "/opt/overlaybd/registry_cache", "directory of cached blobs"),
                Setting("cacheSizeGB", "u32", 4, "cache capacity, GiB"),
                Setting("refillSize", "u32", 262144, "a cache miss fetches this aligned amount, bytes", _refill_size),
                Setting("blockSize", "u32", 65536, "ocf cache block size, bytes"),
            ),
        ),
        Setting("registryCacheDir", "str", "/opt/overlaybd/registry_cache", "legacy: cache directory"),
        Setting("registryCacheSizeGB", "u32", 4, "legacy: cache capacity, GiB"),
        Setting("cacheType", "str", "file", "legacy: cache type", _one_of("file", "ocf", "download")),
        Section(
            "gzipCacheConfig",
            "GzipCacheConfig",
            (
                Setting("enable", "bool", False, "cache decompressed data of gzip (TurboOCI) layers"),
                Setting("cacheDir", "str", "/opt/overlaybd/gzip_cache", "directory of the gzip cache"),
                Setting("cacheSizeGB", "u32", 4, "gzip cache capacity, GiB"),
                Setting("refillSize", "u32", 1048576, "gzip cache refill size, bytes", _refill_size),
            ),
        ),
        Setting("credentialFilePath", "str", "/opt/overlaybd/cred.json", "legacy: credential file"),
        Section(
            "credentialConfig",
            "CredentialConfig",
            (
                Setting(
                    "mode",
                    "str",
                    "",
                    '`file`, `http`, `https` or `uds`; `""` means `file` at the legacy `credentialFilePath`',
                    _one_of("", "file", "http", "https", "uds"),
                ),
                Setting("path", "str", "", "credential file, URL or socket path"),
                Setting("timeout", "int", 1, "seconds, for http/https/uds"),
                Setting("client_cert_path", "str", "", "https: client certificate"),
                Setting("client_key_path", "str", "", "https: client key"),
                Setting("server_ca_path", "str", "", "https: CA of the credential server"),
            ),
        ),
        Setting("ioEngine", "u32", 0, "0 psync, 1 libaio, 2 posix aio (all served by pread here)", _max(2)),
        DOWNLOAD,
        Setting("enableAudit", "bool", True, "write the audit log"),
        Setting("auditPath", "str", "/var/log/overlaybd-audit.log", "audit log file"),
        Setting("enableThread", "bool", False, "one OS thread per device"),
        Section(
            "p2pConfig",
            "P2PConfig",
            (
                Setting("enable", "bool", False, "fetch blobs through a P2P proxy"),
                Setting("address", "str", "http://localhost:9731/accelerator", "P2P proxy prefix"),
            ),
        ),
        Section(
            "exporterConfig",
            "ExporterConfig",
            (
                Setting("enable", "bool", False, "serve Prometheus metrics"),
                Setting("uriPrefix", "str", "/metrics", "metrics URL path"),
                Setting("port", "int", 9863, "metrics port (127.0.0.1)", _port),
                Setting("updateInterval", "int", 60000000, "metrics update interval, microseconds"),
            ),
        ),
        Setting(
            "registryFsVersion",
            "str",
            "v2",
            "registry client flavour (`v1` or `v2`; same behaviour here)",
            _one_of("v1", "v2"),
        ),
        Section(
            "prefetchConfig",
            "PrefetchConfig",
            (Setting("concurrency", "int", 16, "threads replaying a prefetch trace", _positive),),
        ),
        Section(
            "certConfig",
            "CertConfig",
            (
                Setting("certFile", "str", "", "TLS client certificate for the registry"),
                Setting("keyFile", "str", "", "TLS client key for the registry"),
            ),
        ),
        Setting("userAgent", "str", "", 'HTTP User-Agent; `""` means `overlaybd/<version>`'),
        Section(
            "serviceConfig",
            "ServiceAPIConfig",
            (
                Setting("enable", "bool", False, "serve the live-snapshot API"),
                Setting("address", "str", "http://127.0.0.1:9862", "live-snapshot API address"),
            ),
        ),
    ),
    "Settings of /etc/overlaybd/overlaybd.json (upstream GlobalConfig), legacy fields already resolved.",
)

# Generated classes, importable by name: ServiceConfig, LogConfig, CacheConfig, GzipCacheConfig,
# CredentialConfig, DownloadConfig, P2PConfig, ExporterConfig, PrefetchConfig, CertConfig, ServiceAPIConfig.
globals().update(models(SERVICE, __name__))
ServiceConfig = model(SERVICE, __name__)
DownloadConfig = model(DOWNLOAD, __name__)


def _resolve_legacy(cfg: Any) -> None:
    """Fold legacy top-level fields into the modern sections, as upstream reads them."""
    if not cfg.log_config.log_path:
        cfg.log_config.log_path = cfg.log_path
        cfg.log_config.log_level = cfg.log_level
    if not cfg.cache_config.cache_type:
        cfg.cache_config.cache_type = cfg.cache_type
        cfg.cache_config.cache_dir = cfg.registry_cache_dir
        cfg.cache_config.cache_size_gb = cfg.registry_cache_size_gb
    if not cfg.credential_config.mode:
        cfg.credential_config.mode = "file"
        cfg.credential_config.path = cfg.credential_file_path
    if not cfg.user_agent:
        from overlaybd import __version__

        cfg.user_agent = f"overlaybd/{__version__}"


def service_config_from_dict(data: Any, path: str = "<overlaybd.json>") -> Any:
    """Parse an already-decoded overlaybd.json document (legacy fields resolved)."""
    cfg = parse_section(SERVICE, data, path)
    _resolve_legacy(cfg)
    return cfg


def default_service_config() -> Any:
    """The configuration upstream uses when every field is missing."""
    return service_config_from_dict({})


def load_service_config(path: str | os.PathLike[str] = DEFAULT_PATH) -> Any:
    """Read and validate overlaybd.json. Raises ConfigError naming the file and field."""
    p = os.fspath(path)
    return service_config_from_dict(read_json(p), p)


def service_config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON object with upstream key spelling (effective values; legacy fields included)."""
    return to_json_dict(SERVICE, cfg)


def reference_markdown() -> str:
    """The configuration reference of overlaybd.json, generated from the settings table."""
    intro = (
        "### `/etc/overlaybd/overlaybd.json`\n\n"
        "All fields are optional; a missing field takes its default. Unknown fields are logged and ignored "
        "(as upstream does). A wrong type is an error naming the file and the field. "
        "Python attribute names are the JSON keys in snake_case.\n\n"
    )
    return intro + markdown_table(SERVICE)


__all__ = [
    "ConfigError",
    "DEFAULT_PATH",
    "DownloadConfig",
    "SERVICE",
    "ServiceConfig",
    "default_service_config",
    "load_service_config",
    "reference_markdown",
    "service_config_from_dict",
    "service_config_to_dict",
]
