"""config.v1.json parsing, dumping (upstream key spelling, atomic) and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from overlaybd.config.device import (
    MAX_LOWERS,
    ConfigError,
    device_config_from_dict,
    device_config_to_dict,
    dump_device_config,
    load_device_config,
)

FULL = {
    "repoBlobUrl": "https://registry.example/v2/ns/repo/blobs",
    "lowers": [
        {"file": "/l/0.commit"},
        {"dir": "/l/1", "digest": "sha256:" + "a" * 64, "size": 123},
        {"file": "/l/meta", "targetFile": "/l/layer.tar", "targetDigest": "sha256:" + "b" * 64, "gzipIndex": "/g"},
    ],
    "upper": {"index": "/u/index", "data": "/u/data"},
    "resultFile": "/r/init-debug.log",
    "download": {"enable": True, "delay": 1, "delayExtra": 2, "maxMBps": 3, "tryCnt": 4, "blockSize": 4096},
    "accelerationLayer": False,
    "recordTracePath": "",
}


def test_full_config_round_trip(tmp_path: Path) -> None:
    cfg = device_config_from_dict(FULL)
    assert cfg.repo_blob_url.endswith("/blobs")
    assert [lo.file for lo in cfg.lowers] == ["/l/0.commit", "", "/l/meta"]
    assert cfg.lowers[1].dir == "/l/1" and cfg.lowers[1].size == 123
    assert cfg.lowers[2].target_file == "/l/layer.tar" and cfg.lowers[2].gzip_index == "/g"
    assert cfg.upper.index == "/u/index" and cfg.writable
    assert cfg.download.max_mbps == 3 and cfg.download.delay_extra == 2
    out = tmp_path / "config.v1.json"
    dump_device_config(cfg, out)
    text = json.loads(out.read_text())
    assert text["repoBlobUrl"] == FULL["repoBlobUrl"]
    assert text["lowers"][2]["targetFile"] == "/l/layer.tar"
    assert text["download"]["maxMBps"] == 3
    again = load_device_config(out)
    again.path = cfg.path
    assert again == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["config.v1.json"]  # no temp files left


def test_vector_merge_config(vectors: Path) -> None:
    cfg = load_device_config(vectors / "config" / "merge.config.v1.json")
    assert [lo.file for lo in cfg.lowers] == ["WORKDIR/L0.commit", "WORKDIR/L1.commit"]
    assert cfg.upper is None and not cfg.writable and cfg.download is None


def test_upper_vsize_is_accepted_silently(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = device_config_from_dict({"lowers": [], "upper": {"index": "i", "data": "d", "vsize": 64}})
    assert cfg.writable and "vsize" not in caplog.text


def test_read_only_when_upper_incomplete() -> None:
    assert not device_config_from_dict({"upper": {"index": "i"}}).writable


def test_unknown_field_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        device_config_from_dict({"lowers": [{"file": "x", "color": "red"}], "extra": 1})
    assert "lowers[0].color" in caplog.text and "extra" in caplog.text


@pytest.mark.parametrize(
    "doc, field, expect",
    [
        ({"lowers": {"file": "x"}}, "lowers", "expected array"),
        ({"lowers": ["x"]}, "lowers[0]", "expected object"),
        ({"lowers": [{"file": 3}]}, "lowers[0].file", "expected string, got 3"),
        ({"lowers": [{"digest": "sha256:x", "size": "12"}]}, "lowers[0].size", 'expected integer, got "12"'),
        ({"lowers": [{"digest": "sha256:x", "size": -1}]}, "lowers[0].size", "non-negative"),
        ({"lowers": [{}]}, "lowers[0]", "needs at least one of"),
        ({"upper": []}, "upper", "expected object"),
        ({"upper": {"data": None}}, "upper.data", "expected string, got null"),
        ({"repoBlobUrl": 1}, "repoBlobUrl", "expected string"),
        ({"resultFile": False}, "resultFile", "expected string"),
        ({"accelerationLayer": "true"}, "accelerationLayer", "expected boolean"),
        ({"download": {"enable": 1}}, "download.enable", "expected boolean"),
        ({"download": {"blockSize": 0}}, "download.blockSize", "must be > 0"),
        ({"accelerationLayer": True, "recordTracePath": "/t"}, "recordTracePath", "cannot be combined"),
        ({"lowers": [{"file": "x"}] * (MAX_LOWERS + 1)}, "lowers", "at most 255"),
    ],
)
def test_bad_fields(tmp_path: Path, doc: dict, field: str, expect: str) -> None:
    p = tmp_path / "config.v1.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as e:
        load_device_config(p)
    assert e.value.field == field and e.value.path == str(p)
    assert expect in str(e.value) and str(e.value).startswith(f"{p}: {field}: ")


def test_255_lowers_allowed() -> None:
    assert len(device_config_from_dict({"lowers": [{"file": "x"}] * MAX_LOWERS}).lowers) == MAX_LOWERS


def test_missing_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_device_config(tmp_path / "config.v1.json")
    p = tmp_path / "bad.json"
    p.write_text('{"lowers": [\n{"file": "x"},\n]}')
    with pytest.raises(ConfigError, match=r"line 3 column 1: invalid JSON"):
        load_device_config(p)


def test_dump_leaves_out_empty_fields() -> None:
    d = device_config_to_dict(device_config_from_dict({"lowers": [{"file": "a"}]}))
    assert d == {"lowers": [{"file": "a"}]}
