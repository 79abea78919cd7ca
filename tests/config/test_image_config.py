"""config.v1.json parsing, dumping (upstream key spelling, atomic), bad input and hostile input."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import time
from pathlib import Path

import pytest
from overlaybd.config.image_config import (
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
    assert again.path == str(out)
    assert dataclasses.replace(again, path=cfg.path) == cfg
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
        ({"download": {"blockSize": 0}}, "download.blockSize", "expected integer >= 1, got 0"),
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


def test_frozen() -> None:
    cfg = device_config_from_dict({"lowers": [{"file": "a"}]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.result_file = "x"  # type: ignore[misc]
    assert isinstance(cfg.lowers, tuple)


# --- hostile input (issue 14 item 9): one ConfigError line naming file and field, bounded cost ---


def _load_error(p: Path) -> ConfigError:
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_device_config(p)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300 and msg.startswith(f"{p}: ")
    return e.value


def test_nested_200k_deep_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "config.v1.json"
    p.write_text('{"lowers": [{"file": "x", "extra": ' + "[" * 200_000 + "]" * 200_000 + "}]}")
    err = _load_error(p)
    assert err.field.startswith("line 1 column ") and "nested deeper than" in err.message


def test_deep_nesting_in_unknown_field_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "config.v1.json"
    p.write_text('{"x": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}")
    assert "nested deeper than" in _load_error(p).message


def test_brackets_inside_strings_do_not_count(tmp_path: Path) -> None:
    p = tmp_path / "config.v1.json"
    p.write_text(json.dumps({"lowers": [{"file": "[{" * 100 + '\\"' + "[" * 50}]}))
    assert load_device_config(p).lowers[0].file.startswith("[{[{")


def test_nul_in_file_names_the_field(tmp_path: Path) -> None:
    p = tmp_path / "config.v1.json"
    p.write_text(json.dumps({"lowers": [{"file": "/a\u0000b"}]}))
    err = _load_error(p)
    assert err.field == "lowers[0].file" and "NUL" in err.message


@pytest.mark.parametrize(
    "doc, field, expect",
    [
        ('{"lowers": [{"digest": "d", "size": ' + "9" * 5000 + "}]}", "lowers[0].size", "5000-digit number"),
        ('{"lowers": [{"digest": "d", "size": 1e400}]}', "lowers[0].size", "expected integer"),
        ('{"lowers": [{"digest": "d", "size": NaN}]}', "lowers[0].size", "expected integer"),
        ('{"lowers": [{"digest": "d", "size": 18446744073709551616}]}', "lowers[0].size", "must be <="),
        ('{"lowers": [{"file": "' + "a" * 5000 + '"}]}', "lowers[0].file", "longer than 4096"),
        ('{"resultFile": ["' + "a" * 5000 + '"]}', "resultFile", "expected string"),
    ],
)
def test_absurd_values_name_the_field(tmp_path: Path, doc: str, field: str, expect: str) -> None:
    p = tmp_path / "config.v1.json"
    p.write_text(doc)
    err = _load_error(p)
    assert err.field == field and expect in err.message


def test_big_file_refused_before_parsing(tmp_path: Path) -> None:
    p = tmp_path / "config.v1.json"
    p.write_text('{"lowers": [], "pad": "' + "x" * (2 << 20) + '"}')
    assert "larger than 1 MiB" in _load_error(p).message


def test_fifo_and_nul_path_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert "not a regular file" in _load_error(fifo).message
    with pytest.raises(ConfigError, match="NUL"):
        load_device_config(str(tmp_path / "a\0b"))


def test_unknown_field_flood_is_capped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "config.v1.json"
    p.write_text(json.dumps({f"k{i}" + "z" * 500: 1 for i in range(1000)}))
    with caplog.at_level(logging.WARNING):
        load_device_config(p)
    assert len(caplog.records) <= 25 and max(len(r.getMessage()) for r in caplog.records) < 300


def test_hostile_files_stay_in_bounded_memory(tmp_path: Path) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i, doc in enumerate(
        [
            "[" * ((1 << 20) - 1),
            '{"lowers": [' + ",".join(['{"file": "x"}'] * 60_000) + "]}",
            '{"a": [' + ",".join(["[]"] * 300_000) + "]}",
        ]
    ):
        p = tmp_path / f"{i}.json"
        p.write_text(doc[: 1 << 20])
        try:
            load_device_config(p)  # the last one is valid JSON: accepted with a warning
        except ConfigError:
            pass
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB
