"""delivery=sysupdate: the Butane variant that installs the SYSEXT_LEVEL image under /opt/extensions/overlaybd
with a systemd-sysupdate transfer, checked by our translator, ignition-validate and the real `butane --strict`."""

from __future__ import annotations

import base64
import configparser
import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.butane import decode_data_url, files_by_path
from overlaybd import __version__
from overlaybd.butane import ButaneVarError, parse_vars, render, translate
from overlaybd.butane.render import sysupdate_image_name, sysupdate_transfer

REPO = Path(__file__).resolve().parents[2]
BUTANE = REPO.parent / "shared" / "tools" / "butane"
URL = "https://ext.example.com/overlaybd"
SHA = "ab" * 32
SYSUPDATE = [
    ["delivery=sysupdate", f"sysupdate_url={URL}"],
    ["delivery=sysupdate", f"sysupdate_url={URL}/", "sysupdate_version=1.2.3", "sysupdate_arch=arm64",
     f"sysupdate_sha256={SHA}", "butane_version=1.0.0", "cache_size_gb=8"],
]  # fmt: skip
# sysupdate.d(5) of systemd 257: the keys each section may hold.
TRANSFER_KEYS = {
    "Transfer": {"MinVersion", "ProtectVersion", "Verify", "Features", "RequisiteFeatures"},
    "Source": {"Type", "Path", "PathRelativeTo", "MatchPattern"},
    "Target": {
        "Type", "Path", "PathRelativeTo", "MatchPattern", "MatchPartitionType", "PartitionUUID", "PartitionFlags",
        "PartitionNoAuto", "PartitionGrowFileSystem", "ReadOnly", "Mode", "TriesDone", "TriesLeft", "InstancesMax",
        "RemoveTemporary", "CurrentSymlink",
    },
}  # fmt: skip


def contents(ign: dict, path: str) -> str:
    """A file's inline contents, also when the translator chose gzip (as butane does for long text)."""
    c = files_by_path(ign)[path]["contents"]
    if c.get("compression") == "gzip":
        return gzip.decompress(base64.b64decode(c["source"].partition(",")[2])).decode()
    return decode_data_url(c["source"])


def parse_transfer(text: str) -> configparser.ConfigParser:
    """A transfer file is a systemd unit-style ini: strict sections, case-sensitive keys, no duplicates."""
    cp = configparser.ConfigParser(strict=True, interpolation=None, comment_prefixes=("#", ";"))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(text)
    for section in cp.sections():
        unknown = set(cp[section]) - TRANSFER_KEYS.get(section, set())
        assert not unknown, (section, unknown)
    return cp


def check_transfer(text: str, url: str) -> None:
    cp = parse_transfer(text)
    assert cp.sections() == ["Transfer", "Source", "Target"]
    assert dict(cp["Source"]) == {"Type": "url-file", "Path": url, "MatchPattern": "overlaybd_@v_%a.raw"}
    assert cp["Target"]["Type"] == "regular-file" and cp["Target"]["Path"] == "/opt/extensions/overlaybd"
    assert cp["Target"]["MatchPattern"] == "overlaybd_@v_%a.raw"
    assert cp["Target"]["CurrentSymlink"] == "/etc/extensions/overlaybd.raw"
    assert cp["Transfer"]["Verify"] == "false"


def test_transfer_file() -> None:
    check_transfer(sysupdate_transfer(URL), URL + "/")
    assert sysupdate_transfer(URL + "/") == sysupdate_transfer(URL)
    for bad in ("ftp://x/", "https://", "http://a b/", 'http://x/"', "http://u@x/", "http://x/?a=1"):
        with pytest.raises(ButaneVarError, match="sysupdate_url"):
            sysupdate_transfer(bad)


@pytest.mark.parametrize("pairs", SYSUPDATE, ids=["minimal", "all"])
def test_sysupdate_variant(pairs: list[str]) -> None:
    values = parse_vars(pairs)
    ign = translate(yaml.safe_load(render(values)))
    files = files_by_path(ign)
    image = sysupdate_image_name(values["sysupdate_version"], values["sysupdate_arch"])
    assert image == f"overlaybd_{values['sysupdate_version']}_{values['sysupdate_arch']}.raw"
    first = files[f"/opt/extensions/overlaybd/{image}"]
    assert first["contents"]["source"] == f"{URL}/{image}" and first["mode"] == 0o644
    if values["sysupdate_sha256"]:
        assert first["contents"]["verification"] == {"hash": f"sha256-{SHA}"}
    check_transfer(contents(ign, "/etc/sysupdate.overlaybd.d/overlaybd.transfer"), URL + "/")
    assert "/etc/flatcar/enabled-sysext.conf" not in files  # not Flatcar's route: no lockstep download
    assert ign["storage"]["links"] == [
        {"path": "/etc/extensions/overlaybd.raw", "target": f"/opt/extensions/overlaybd/{image}", "hard": False}
    ]
    units = {u["name"]: u for u in ign["systemd"]["units"]}
    assert "--component=overlaybd update" in units["overlaybd-sysupdate.service"]["contents"]
    assert units["overlaybd-sysupdate.timer"]["enabled"] is True
    assert "/etc/containerd/config.toml" in files and "containerd.service" in units


def test_default_version_is_the_package_version() -> None:
    assert parse_vars(SYSUPDATE[0])["sysupdate_version"] == __version__


@pytest.mark.parametrize(
    ("pairs", "name"),
    [
        (["delivery=sysupdate"], "sysupdate_url"),
        (["delivery=usb"], "delivery"),
        ([f"sysupdate_url={URL}"], "sysupdate_url"),
        ([f"sysupdate_sha256={SHA}"], "sysupdate_sha256"),
        (["delivery=sysupdate", f"sysupdate_url={URL}", "sysupdate_sha256=xyz"], "sysupdate_sha256"),
        (["delivery=sysupdate", f"sysupdate_url={URL}", "sysupdate_version=1_2"], "sysupdate_version"),
        (["delivery=sysupdate", f"sysupdate_url={URL}", "sysupdate_arch=riscv64"], "sysupdate_arch"),
    ],
)
def test_bad_combinations_name_the_variable(pairs: list[str], name: str) -> None:
    with pytest.raises(ButaneVarError) as exc:
        render(parse_vars(pairs))
    assert exc.value.name == name


@pytest.mark.skipif(shutil.which("ignition-validate") is None, reason="needs ignition-validate (Debian: ignition)")
@pytest.mark.parametrize("pairs", SYSUPDATE, ids=["minimal", "all"])
def test_ignition_validate(pairs: list[str], tmp_path: Path) -> None:
    ign = translate(yaml.safe_load(render(parse_vars(pairs))))
    ign["ignition"]["version"] = "3.3.0"  # see test_render.test_ignition_validate_accepts_translation
    path = tmp_path / "config.ign"
    path.write_text(json.dumps(ign))
    res = subprocess.run(["ignition-validate", str(path)], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


@pytest.mark.skipif(not BUTANE.is_file(), reason=f"the real butane is not at {BUTANE} (shared/tools)")
@pytest.mark.parametrize("pairs", SYSUPDATE, ids=["minimal", "all"])
def test_real_butane_strict_agrees(pairs: list[str]) -> None:
    """The real translator accepts the variant with --strict and produces the same files, links and units."""
    text = render(parse_vars(pairs))
    res = subprocess.run([str(BUTANE), "--strict"], input=text, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    real = json.loads(res.stdout)
    ours = translate(yaml.safe_load(text))
    assert real["ignition"]["version"] == ours["ignition"]["version"]
    real_files = files_by_path(real)
    assert set(real_files) == set(files_by_path(ours))
    first = next(p for p in real_files if p.startswith("/opt/extensions/overlaybd/"))
    assert real_files[first]["contents"]["source"] == files_by_path(ours)[first]["contents"]["source"]
    assert real_files[first]["contents"].get("verification") == files_by_path(ours)[first]["contents"].get(
        "verification"
    )
    assert contents(real, "/etc/sysupdate.overlaybd.d/overlaybd.transfer") == contents(
        ours, "/etc/sysupdate.overlaybd.d/overlaybd.transfer"
    )
    assert real["storage"]["links"] == ours["storage"]["links"]
    assert {u["name"]: u.get("contents") for u in real["systemd"]["units"]} == {
        u["name"]: u.get("contents") for u in ours["systemd"]["units"]
    }
