"""Butane templates: every rendering parses (YAML, TOML), keeps containerd's defaults, follows the schema,
and (when Debian's ignition package is installed) passes ignition-validate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers.butane import decode_data_url, files_by_path
from overlaybd.butane import VARIABLES, ButaneError, ButaneVarError, parse_vars, render, translate
from overlaybd.butane.ignition import load_yaml
from overlaybd.butane.render import template_dir
from overlaybd.cli.butane import main as butane_main

REPO = Path(__file__).resolve().parents[2]
STOCK_TOML = REPO / "butane" / "flatcar-containerd-config.toml"

VARIANTS = [
    [],
    ["butane_version=1.0.0"],
    ["registry_auth=registry.example.com=alice:s3cr:et=", "registry_auth=127.0.0.1:5001/team/app=bob:pw"],
    ["cache_size_gb=16", "rw_mode=dir", "cri_snapshotter=true"],
    ["butane_version=1.0.0", "rw_mode=dev", "snapshotter_address=/run/obd/snap.sock"],
]


def contents(ign: dict, path: str) -> str:
    return decode_data_url(files_by_path(ign)[path]["contents"]["source"])


def is_subset(small: object, big: object) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and is_subset(v, big[k]) for k, v in small.items())
    return small == big


@pytest.mark.parametrize("pairs", VARIANTS, ids=lambda p: ",".join(p) or "defaults")
def test_render_parses_and_translates(pairs: list[str]) -> None:
    values = parse_vars(pairs)
    text = render(values)
    doc = yaml.safe_load(text)
    assert doc["variant"] == "flatcar" and doc["version"] == values["butane_version"]
    ign = translate(doc)
    assert ign["ignition"]["version"] == {"1.0.0": "3.3.0", "1.1.0": "3.4.0"}[values["butane_version"]]
    files = files_by_path(ign)
    assert contents(ign, "/etc/flatcar/enabled-sysext.conf") == "overlaybd\n"
    assert files["/etc/flatcar/enabled-sysext.conf"]["mode"] == 0o644
    assert files["/etc/containerd/config.toml"]["overwrite"] is True

    toml = tomllib.loads(contents(ign, "/etc/containerd/config.toml"))
    stock = tomllib.loads(STOCK_TOML.read_text())
    assert is_subset(stock, toml), "rendered config.toml lost or changed one of Flatcar's stock settings"
    assert toml["proxy_plugins"]["overlaybd"] == {"type": "snapshot", "address": values["snapshotter_address"]}
    cri = toml["plugins"]["io.containerd.grpc.v1.cri"]
    if values["cri_snapshotter"]:
        assert cri["containerd"]["snapshotter"] == "overlaybd"
        assert cri["containerd"]["disable_snapshot_annotations"] is False
    else:
        assert "snapshotter" not in cri.get("containerd", {})

    (unit,) = ign["systemd"]["units"]
    assert unit["name"] == "containerd.service"
    (drop,) = unit["dropins"]
    assert drop["name"] == "10-overlaybd.conf"
    assert "ExecStart=\nExecStart=/usr/bin/containerd --config /etc/containerd/config.toml" in drop["contents"]

    if values["registry_auth"]:
        cred = json.loads(contents(ign, "/etc/overlaybd/cred.json"))
        assert files["/etc/overlaybd/cred.json"]["mode"] == 0o600
        for host, user, password in values["registry_auth"]:
            assert cred["auths"][host] == {"username": user, "password": password}
    else:
        assert "/etc/overlaybd/cred.json" not in files
    if values["cache_size_gb"]:
        obd = json.loads(contents(ign, "/etc/overlaybd/overlaybd.json"))
        assert obd["cacheConfig"]["cacheSizeGB"] == values["cache_size_gb"]
        assert obd["credentialConfig"] == {"mode": "file", "path": "/etc/overlaybd/cred.json"}
    else:
        assert "/etc/overlaybd/overlaybd.json" not in files
    if values["rw_mode"]:
        snap = json.loads(contents(ign, "/etc/overlaybd-snapshotter/config.json"))
        assert snap["rwMode"] == values["rw_mode"]
        assert snap["address"] == values["snapshotter_address"]


def test_plain_http_registries_become_insecure_mirror_registry_entries() -> None:
    """The snapshotter's lazy reads of a plain-http registry need an insecure mirrorRegistry entry."""
    from overlaybd.config.snapshotter import config_from_dict

    vals = parse_vars(["plain_http_registry=127.0.0.1:5000", "plain_http_registry=reg.lan", "rw_mode=dir"])
    ign = translate(yaml.safe_load(render(vals)))
    snap = json.loads(contents(ign, "/etc/overlaybd-snapshotter/config.json"))
    assert snap["rwMode"] == "dir"
    assert snap["mirrorRegistry"] == [
        {"host": "127.0.0.1:5000", "insecure": True},
        {"host": "reg.lan", "insecure": True},
    ]
    cfg = config_from_dict(snap)  # what the snapshotter will load
    assert [(m.host, m.insecure) for m in cfg.mirror_registry] == [("127.0.0.1:5000", True), ("reg.lan", True)]
    alone = json.loads(
        contents(
            translate(yaml.safe_load(render(parse_vars(["plain_http_registry=r:1"])))),
            "/etc/overlaybd-snapshotter/config.json",
        )
    )
    assert alone["rwMode"] == "overlayfs" and alone["mirrorRegistry"] == [{"host": "r:1", "insecure": True}]
    for bad in ("http://r", "r/x", "a b", ""):
        with pytest.raises(ButaneVarError, match="plain_http_registry"):
            parse_vars([f"plain_http_registry={bad}"])


def test_special_characters_in_credentials_survive() -> None:
    nasty = "p'a\"s: #s\n{x}\\ü=:"
    ign = translate(yaml.safe_load(render(parse_vars([f"registry_auth=r.example=u:{nasty}"]))))
    cred = json.loads(contents(ign, "/etc/overlaybd/cred.json"))
    assert cred["auths"]["r.example"] == {"username": "u", "password": nasty}


def test_render_is_deterministic_across_processes() -> None:
    """Two interpreters with different hash seeds (set/dict order of str keys) render the same bytes."""
    import subprocess
    import sys

    pairs = VARIANTS[2] + VARIANTS[3]
    code = (
        "import sys; from overlaybd.butane import parse_vars, render; "
        "sys.stdout.write(render(parse_vars(sys.argv[1:])))"
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", code, *pairs],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "4242")
    ]
    assert outs[0] == outs[1] == render(parse_vars(pairs))


@pytest.mark.parametrize(
    ("pair", "name"),
    [
        ("butane_version=1.2.0", "butane_version"),
        ("cache_size_gb=lots", "cache_size_gb"),
        ("cache_size_gb=0", "cache_size_gb"),
        ("rw_mode=ramdisk", "rw_mode"),
        ("cri_snapshotter=maybe", "cri_snapshotter"),
        ("snapshotter_address=run/x.sock", "snapshotter_address"),
        ("snapshotter_address=/run/../x.sock", "snapshotter_address"),
        ("registry_auth=no-credentials", "registry_auth"),
        ("registry_auth=https://r.example=u:p", "registry_auth"),
        ("colour=blue", "colour"),
        ("cache_size_gb", "cache_size_gb"),
    ],
)
def test_bad_variables_name_the_variable(pair: str, name: str) -> None:
    with pytest.raises(ButaneVarError) as e:
        parse_vars([pair])
    assert e.value.name == name and repr(name) in str(e.value)


def test_duplicate_registry_is_an_error() -> None:
    with pytest.raises(ButaneVarError, match="registry_auth"):
        render(parse_vars(["registry_auth=r.example=a:b", "registry_auth=r.example=c:d"]))


SECRET_VARIABLES = sorted(name for name, var in VARIABLES.items() if var.secret)


@pytest.mark.parametrize("name", SECRET_VARIABLES)
@pytest.mark.parametrize("spelling", ["{n}", " {n}", "{n} ", "  {d}", "{d}"])
def test_secret_variables_make_the_output_private_however_spelled(tmp_path: Path, name: str, spelling: str) -> None:
    """Parsing and the secrecy decision use one normalisation: ' registry_auth=...' is still a secret."""
    assert SECRET_VARIABLES == ["registry_auth"]  # a new secret variable needs a value below
    value = {"registry_auth": "r.example=u:s3cret"}[name]
    out = tmp_path / "obd.bu"
    flag = spelling.format(n=name, d=name.replace("_", "-")) + "=" + value
    assert butane_main(["--var", flag, "-o", str(out)]) == 0
    assert "s3cret" in out.read_text()
    assert out.stat().st_mode & 0o777 == 0o600, f"--var {flag!r}: a config holding passwords must be 0600"


def test_cli_var_flags_output_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "obd.bu"
    assert butane_main(["--var", "cache_size_gb=2", "--var", "butane_version=1.0.0", "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["version"] == "1.0.0"
    assert out.stat().st_mode & 0o777 == 0o644
    assert butane_main(["--var", "registry_auth=r.example=u:p", "-o", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600, "a config holding passwords must not be world-readable"
    assert butane_main(["--ignition", "--var", "rw_mode=dir"]) == 0
    assert json.loads(capsys.readouterr().out)["ignition"]["version"] == "3.4.0"
    assert butane_main(["--var", "rw_mode=bogus"]) == 2
    assert "variable 'rw_mode'" in capsys.readouterr().err


def test_templates_found_from_repo_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert template_dir() == REPO / "butane"
    alt = tmp_path / "tpl"
    shutil.copytree(REPO / "butane", alt)
    (alt / "overlaybd.bu.j2").write_text("variant: flatcar\nversion: {{ butane_version }}\n")
    monkeypatch.setenv("OVERLAYBD_BUTANE_TEMPLATES", str(alt))
    assert render() == "variant: flatcar\nversion: 1.1.0\n"


# The shape of the upstream docs' second example: the second file item is indented inside the first.
UPSTREAM_INVALID = """\
variant: flatcar
version: 1.0.0
storage:
  files:
    - path: /etc/flatcar/enabled-sysext.conf
      contents:
        inline: overlaybd
        - path: /etc/containerd/config.toml
          contents:
            inline: x
"""


def test_upstream_docs_example_shape_is_rejected() -> None:
    with pytest.raises(ButaneError) as e:
        load_yaml(UPSTREAM_INVALID, "docs-example.bu")
    assert e.value.field == "yaml" and "docs-example.bu" in str(e.value)


def base_doc() -> dict:
    return translate_ready({"variant": "flatcar", "version": "1.0.0"})


def translate_ready(doc: dict) -> dict:
    doc.setdefault("storage", {"files": [{"path": "/etc/a", "mode": 0o644, "contents": {"inline": "a"}}]})
    dropin = {"name": "x.conf", "contents": "[A]\nB=c"}
    doc.setdefault("systemd", {"units": [{"name": "a.service", "dropins": [dropin]}]})
    return doc


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(variant="fcos"), "variant"),
        (lambda d: d.update(version="1.3.0"), "version"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["storage"]["files"][0].update(path="etc/a"), "storage.files[0].path"),
        (lambda d: d["storage"]["files"][0].update(path="/etc/../a"), "storage.files[0].path"),
        (lambda d: d["storage"]["files"][0].update(mode=0o17777), "storage.files[0].mode"),
        (lambda d: d["storage"]["files"][0].update(mode="0644"), "storage.files[0].mode"),
        (
            lambda d: d["storage"]["files"][0].update(contents={"inline": "a", "source": "data:,a"}),
            "storage.files[0].contents",
        ),
        (
            lambda d: d["storage"]["files"][0].pop("contents") and d["storage"]["files"][0].update(overwrite=True),
            "storage.files[0].overwrite",
        ),
        (lambda d: d["storage"]["files"].append({"path": "/etc/a"}), "storage.files[1].path"),
        (lambda d: d["storage"]["files"][0].update(user={"id": 0, "name": "root"}), "storage.files[0].user"),
        (lambda d: d["systemd"]["units"][0].update(name="a.serv"), "systemd.units[0].name"),
        (lambda d: d["systemd"]["units"][0]["dropins"][0].update(name="x.cfg"), "systemd.units[0].dropins[0].name"),
        (
            lambda d: d["systemd"]["units"][0]["dropins"][0].update(contents="no section"),
            "systemd.units[0].dropins[0].contents line 1",
        ),
        (lambda d: d["systemd"]["units"].append({"name": "a.service"}), "systemd.units[1].name"),
    ],
)
def test_schema_violations_name_the_field(mutate, field: str) -> None:
    doc = base_doc()
    mutate(doc)
    with pytest.raises(ButaneError) as e:
        translate(doc, "t.bu")
    assert e.value.field == field


def test_data_urls_round_trip() -> None:
    for text in ["overlaybd\n", "a b%c/d?e#f\n", "ü" * 50, "\x00\x01binary-ish"]:
        files = [{"path": "/x", "contents": {"inline": text}}]
        doc = {"variant": "flatcar", "version": "1.1.0", "storage": {"files": files}}
        assert contents(translate(doc), "/x") == text


@pytest.mark.skipif(shutil.which("ignition-validate") is None, reason="needs ignition-validate (Debian: ignition)")
@pytest.mark.parametrize("pairs", VARIANTS, ids=lambda p: ",".join(p) or "defaults")
def test_ignition_validate_accepts_translation(pairs: list[str], tmp_path: Path) -> None:
    ign = translate(yaml.safe_load(render(parse_vars(pairs))))
    if ign["ignition"]["version"] == "3.4.0":
        # Debian's ignition 2.14 knows spec 3.4.0 only as experimental; everything this config uses exists
        # unchanged in 3.3.0, so validate the same document under 3.3.0.
        ign["ignition"]["version"] = "3.3.0"
    path = tmp_path / "config.ign"
    path.write_text(json.dumps(ign))
    res = subprocess.run(["ignition-validate", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == ""
