"""config.json model: upstream defaults, and errors that name the file and the field."""

from __future__ import annotations

import json

import pytest
from overlaybd.config.schema import ConfigError
from overlaybd.config.snapshotter import config_to_dict, load_config, reference_markdown

SHIPPED = {
    "root": "/var/lib/containerd/io.containerd.snapshotter.v1.overlaybd",
    "address": "/run/overlaybd-snapshotter/overlaybd.sock",
    "verbose": "info",
    "rwMode": "overlayfs",
    "runtimeType": "containerd",
    "logReportCaller": False,
    "autoRemoveDev": False,
    "mirrorRegistry": [],
}


def write(tmp_path, data) -> str:
    p = tmp_path / "config.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(p)


def test_shipped_file_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, SHIPPED))
    assert cfg.root == SHIPPED["root"] and cfg.address == SHIPPED["address"]
    assert cfg.rw_mode == "overlayfs" and cfg.writable_layer_type == "append" and cfg.default_fs_type == "ext4"
    assert cfg.tenant == -1 and cfg.exporter_config.port == 9863 and cfg.turbo_fs_type == ("erofs", "ext4")
    assert not cfg.async_remove and cfg.mirror_registry == ()
    again = load_config(write(tmp_path, config_to_dict(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)
    assert "`writableLayerType`" in reference_markdown()
    assert cfg.trace_dir == SHIPPED["root"] + "/trace"
    assert cfg.overlaybd_config_path == "/etc/overlaybd/overlaybd.json"


def test_trace_dir_and_overlaybd_json_path(tmp_path):
    cfg = load_config(write(tmp_path, {**SHIPPED, "root": "/srv/snap"}))
    assert cfg.trace_dir == "/srv/snap/trace"
    cfg = load_config(write(tmp_path, {**SHIPPED, "traceDir": "/srv/traces", "overlaybdConfigPath": "/o.json"}))
    assert (cfg.trace_dir, cfg.overlaybd_config_path) == ("/srv/traces", "/o.json")


def test_mirrors_and_turbo(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            {
                **SHIPPED,
                "mirrorRegistry": [{"host": "127.0.0.1:5000", "insecure": True}, {"host": "r.example"}],
                "turboFsType": ["erofs"],
            },
        )
    )
    assert cfg.insecure_hosts() == {"127.0.0.1:5000"}
    assert cfg.turbo_fs_type == ("erofs", "ext4")


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"rwMode": "ramdisk"}, "rwMode"),
        ({"writableLayerType": "cow"}, "writableLayerType"),
        ({"verbose": 3}, "verbose"),
        ({"autoRemoveDev": "yes"}, "autoRemoveDev"),
        ({"tenant": 1.5}, "tenant"),
        ({"root": ""}, "root"),
        ({"address": "relative.sock"}, "address"),
        ({"rootfsQuota": "lots"}, "rootfsQuota"),
        ({"exporterConfig": {"port": 70000}}, "exporterConfig.port"),
        ({"exporterConfig": []}, "exporterConfig"),
        ({"mirrorRegistry": [{"insecure": True}]}, "mirrorRegistry[0].host"),
        ({"mirrorRegistry": [{"host": "h", "insecure": "no"}]}, "mirrorRegistry[0].insecure"),
        ({"turboFsType": "erofs"}, "turboFsType"),
        ({"turboFsType": ["ext4", 1]}, "turboFsType[1]"),
        ({"traceDir": "relative"}, "traceDir"),
        ({"overlaybdConfigPath": ""}, "overlaybdConfigPath"),
        ({"root": "/a\0b"}, "root"),
    ],
)
def test_errors_name_file_and_field(tmp_path, patch, field):
    path = write(tmp_path, {**SHIPPED, **patch})
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert ei.value.path == path and ei.value.field == field
    assert str(ei.value).startswith(f"{path}: {field}: ")


def test_syntax_and_missing(tmp_path):
    with pytest.raises(ConfigError, match="line 1 column"):
        load_config(write(tmp_path, "{not json"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "absent.json"))
    with pytest.raises(ConfigError, match="expected object"):
        load_config(write(tmp_path, "[]"))


def test_cli_reports_config_error(tmp_path, capsys):
    from overlaybd.cli.snapshotter import main

    path = write(tmp_path, {**SHIPPED, "rwMode": "x"})
    assert main([path]) == 2
    assert f"{path}: rwMode:" in capsys.readouterr().err
