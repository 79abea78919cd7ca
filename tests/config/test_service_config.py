"""overlaybd.json parsing: defaults, legacy fallbacks, and every kind of bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from overlaybd.config.service import (
    SERVICE,
    ConfigError,
    default_service_config,
    load_service_config,
    reference_markdown,
    service_config_from_dict,
    service_config_to_dict,
)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "overlaybd.json"
    p.write_text(text)
    return p


def test_vector_svc_json(vectors: Path) -> None:
    cfg = load_service_config(vectors / "config" / "svc.json")
    assert cfg.cache_config.cache_type == "file"
    assert cfg.cache_config.cache_dir == "/var/tmp/obd-cache"
    assert cfg.cache_config.cache_size_gb == 1
    assert cfg.credential_config.mode == "file"
    assert cfg.enable_audit is False
    assert cfg.registry_fs_version == "v2"
    # logConfig.logPath empty -> legacy logPath default
    assert cfg.log_config.log_path == "/var/log/overlaybd.log"


def test_defaults() -> None:
    cfg = default_service_config()
    assert cfg.cache_config.cache_type == "file"
    assert cfg.cache_config.cache_dir == "/opt/overlaybd/registry_cache"
    assert cfg.cache_config.cache_size_gb == 4
    assert cfg.cache_config.refill_size == 262144
    assert cfg.download.max_mbps == 100 and cfg.download.try_cnt == 5 and cfg.download.block_size == 262144
    assert cfg.exporter_config.uri_prefix == "/metrics" and cfg.exporter_config.port == 9863
    assert cfg.p2p_config.address == "http://localhost:9731/accelerator"
    assert cfg.credential_config.path == "/opt/overlaybd/cred.json"
    assert cfg.enable_audit is True and cfg.audit_path == "/var/log/overlaybd-audit.log"
    assert cfg.gzip_cache_config.refill_size == 1048576
    assert cfg.prefetch_config.concurrency == 16
    assert cfg.user_agent.startswith("overlaybd/")


def test_legacy_fields_resolved() -> None:
    cfg = service_config_from_dict(
        {
            "registryCacheDir": "/old/cache",
            "registryCacheSizeGB": 9,
            "cacheType": "download",
            "logPath": "/old/log",
            "logLevel": 3,
            "credentialFilePath": "/old/cred.json",
        }
    )
    assert (cfg.cache_config.cache_type, cfg.cache_config.cache_dir, cfg.cache_config.cache_size_gb) == (
        "download",
        "/old/cache",
        9,
    )
    assert (cfg.log_config.log_path, cfg.log_config.log_level) == ("/old/log", 3)
    assert (cfg.credential_config.mode, cfg.credential_config.path) == ("file", "/old/cred.json")


def test_modern_fields_win_over_legacy() -> None:
    cfg = service_config_from_dict(
        {
            "registryCacheDir": "/old/cache",
            "cacheConfig": {"cacheType": "file", "cacheDir": "/new", "cacheSizeGB": 2},
            "logPath": "/old/log",
            "logConfig": {"logPath": "/new/log", "logLevel": 0},
            "credentialConfig": {"mode": "http", "path": "http://127.0.0.1:1/auth"},
        }
    )
    assert cfg.cache_config.cache_dir == "/new" and cfg.cache_config.cache_size_gb == 2
    assert cfg.log_config.log_path == "/new/log" and cfg.log_config.log_level == 0
    assert cfg.credential_config.mode == "http"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_service_config(tmp_path / "nope.json")
    assert "nope.json" in str(e.value) and "not found" in str(e.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="directory"):
        load_service_config(tmp_path)


def test_bad_json_names_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path, '{\n  "ioEngine": 0,\n  "enableAudit": tru\n}\n')
    with pytest.raises(ConfigError) as e:
        load_service_config(p)
    msg = str(e.value)
    assert str(p) in msg and "line 3 column" in msg


def test_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected object"):
        load_service_config(write(tmp_path, "[1, 2]"))


@pytest.mark.parametrize(
    "doc, field, expect",
    [
        ({"cacheConfig": {"cacheSizeGB": "4"}}, "cacheConfig.cacheSizeGB", 'expected integer, got "4"'),
        ({"cacheConfig": {"cacheSizeGB": -1}}, "cacheConfig.cacheSizeGB", "expected non-negative integer"),
        ({"cacheConfig": {"cacheSizeGB": 2**32}}, "cacheConfig.cacheSizeGB", "must be <= 4294967295"),
        ({"cacheConfig": {"cacheSizeGB": 1.5}}, "cacheConfig.cacheSizeGB", "expected integer, got 1.5"),
        ({"cacheConfig": {"cacheSizeGB": True}}, "cacheConfig.cacheSizeGB", "expected integer, got true"),
        ({"cacheConfig": {"cacheType": "ram"}}, "cacheConfig.cacheType", "expected one of"),
        ({"cacheConfig": {"refillSize": 1000}}, "cacheConfig.refillSize", "power of 2"),
        ({"cacheConfig": 5}, "cacheConfig", "expected object"),
        ({"enableAudit": "yes"}, "enableAudit", 'expected boolean, got "yes"'),
        ({"enableAudit": 1}, "enableAudit", "expected boolean, got 1"),
        ({"auditPath": 7}, "auditPath", "expected string, got 7"),
        ({"auditPath": None}, "auditPath", "expected string, got null"),
        ({"ioEngine": 3}, "ioEngine", "must be <= 2"),
        ({"readDeadlineSec": 0}, "readDeadlineSec", "expected integer >= 1, got 0"),
        ({"readDeadlineSec": 3601}, "readDeadlineSec", "must be <= 3600"),
        ({"readDeadlineSec": "30"}, "readDeadlineSec", "expected integer"),
        ({"registryCacheDir": 5}, "registryCacheDir", "expected string"),
        ({"logConfig": {"logPath": "/a\0b"}}, "logConfig.logPath", "NUL"),
        ({"download": {"maxMBps": "fast"}}, "download.maxMBps", "expected integer"),
        ({"exporterConfig": {"port": 70000}}, "exporterConfig.port", "must be <= 65535"),
        ({"p2pConfig": {"enable": "true"}}, "p2pConfig.enable", "expected boolean"),
        ({"registryFsVersion": "v3"}, "registryFsVersion", "expected one of"),
        ({"logConfig": {"logLevel": 9}}, "logConfig.logLevel", "must be <= 3"),
        ({"credentialConfig": {"timeout": "1"}}, "credentialConfig.timeout", "expected integer"),
        ({"prefetchConfig": {"concurrency": 0}}, "prefetchConfig.concurrency", "expected integer >= 1"),
    ],
)
def test_wrong_types_name_file_and_field(tmp_path: Path, doc: dict, field: str, expect: str) -> None:
    p = write(tmp_path, json.dumps(doc))
    with pytest.raises(ConfigError) as e:
        load_service_config(p)
    assert e.value.path == str(p)
    assert e.value.field == field
    assert str(e.value).startswith(f"{p}: {field}: ")
    assert expect in str(e.value)


def test_unknown_fields_warn_not_fail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = write(tmp_path, json.dumps({"fancyNewThing": 1, "cacheConfig": {"shiny": True}}))
    with caplog.at_level(logging.WARNING):
        cfg = load_service_config(p)
    assert cfg.cache_config.cache_size_gb == 4
    text = caplog.text
    assert "fancyNewThing" in text and "cacheConfig.shiny" in text


def test_integral_float_accepted() -> None:
    cfg = service_config_from_dict({"cacheConfig": {"cacheType": "file", "cacheSizeGB": 8.0}})
    assert cfg.cache_config.cache_size_gb == 8


def test_read_deadline() -> None:
    assert default_service_config().read_deadline_sec == 30
    assert service_config_from_dict({"readDeadlineSec": 5}).read_deadline_sec == 5


def test_legacy_keys_do_not_warn_and_empty_modern_values_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = service_config_from_dict(
            {
                "cacheConfig": {"cacheType": "", "cacheDir": ""},
                "cacheType": "ocf",
                "registryCacheDir": "/c",
                "logPath": "/l",
            }
        )
    assert caplog.text == ""
    assert (cfg.cache_config.cache_type, cfg.cache_config.cache_dir, cfg.log_config.log_path) == ("ocf", "/c", "/l")
    assert service_config_from_dict({"userAgent": ""}).user_agent.startswith("overlaybd/")


def test_round_trip_through_json() -> None:
    cfg = service_config_from_dict({"cacheConfig": {"cacheType": "file", "cacheSizeGB": 7}, "ioEngine": 1})
    again = service_config_from_dict(json.loads(json.dumps(service_config_to_dict(cfg))))
    assert again == cfg


def test_reference_markdown_covers_every_setting() -> None:
    md = reference_markdown()
    for table in SERVICE.subtables():
        for row in table.rows:
            if row.kind != "section":
                assert f"`{row.key}` |" in md or f".{row.key}` |" in md, row.key
            for alias in row.aliases:
                assert f"`{alias}`" in md
    assert "`cache_config.cache_size_gb`" in md and "`read_deadline_sec`" in md
