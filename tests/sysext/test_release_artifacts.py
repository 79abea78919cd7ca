"""What a build publishes beside the image: the signed update payload (read back by the library and by the
FROZEN overlaybd-download-sysext, as a machine would), Flatcar's listings, and for the sysupdate route the
SHA256SUMS manifest and the transfer file."""

from __future__ import annotations

import configparser
import fnmatch
import hashlib
import re
import subprocess
from pathlib import Path

import pytest
from helpers.sysext import ARCH, NAME, PAYLOAD, Built, needs_root, run
from overlaybd.update_payload import verify_and_extract

CONTENTS_LINE = re.compile(r"^[-dl][rwxsStT-]{9} +\d+ root +root +\d+ \d{4}-\d\d-\d\d \d\d:\d\d \./\S*( -> \S+)?$")
WTD_LINE = re.compile(r"^[-dl][rwxsStT-]{9} \d+ \d+ \d+ \d+ \./\S*$")


def test_payload_verifies_and_extracts_to_the_image(sysext_build: Built, tmp_path: Path) -> None:
    payload, pub = sysext_build.out / PAYLOAD, sysext_build.out / "update-payload-key.pub.pem"
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with open(tmp_path / "x.raw", "w+b") as f:
        info = verify_and_extract(payload, pub, f)
    assert info.image_size == sysext_build.image.stat().st_size
    assert (tmp_path / "x.raw").read_bytes() == sysext_build.image.read_bytes()
    assert payload.read_bytes()[:4] == b"CrAU"


def test_frozen_download_tool_installs_the_image(sysext_build: Built, tmp_path: Path) -> None:
    """The bundle's own overlaybd-download-sysext (frozen cryptography, bz2, pycurl) with an empty environment."""
    tool = sysext_build.bundle / "bin" / "overlaybd-download-sysext"
    pub = sysext_build.out / "update-payload-key.pub.pem"
    res = run(
        ["env", "-i", str(tool), "-p", str(pub), "-o", str(tmp_path / "ue-rs"), "-f", str(sysext_build.out / PAYLOAD)]
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "ue-rs" / f"{NAME}.raw").read_bytes() == sysext_build.image.read_bytes()
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"<html>404</html>")
    res = run(["env", "-i", str(tool), "-p", str(pub), "-o", str(tmp_path / "o2"), "-f", str(bad)])
    assert (
        res.returncode == 1
        and res.stderr.startswith("overlaybd-download-sysext: error: ")
        and "bad magic" in res.stderr
    )


def test_flatcar_listings(sysext_build: Built) -> None:
    """build_library/reports_util.sh formats: ls-like contents sorted by path, technical details, df report."""
    contents = (sysext_build.out / f"{NAME}_contents.txt").read_text().splitlines()
    assert all(CONTENTS_LINE.match(ln) for ln in contents), [ln for ln in contents if not CONTENTS_LINE.match(ln)][:3]
    paths = [ln.split(" ./", 1)[1].split(" -> ")[0] for ln in contents]
    assert paths == sorted(paths) and paths[0] == ""
    assert f"usr/lib/extension-release.d/extension-release.{NAME}" in paths
    assert any(ln.endswith("./usr/local/overlaybd/bin/overlaybd-tcmu -> ../overlaybd") for ln in contents)
    wtd = (sysext_build.out / f"{NAME}_contents_wtd.txt").read_text().splitlines()
    assert len(wtd) == len(contents) and all(WTD_LINE.match(ln) for ln in wtd)
    usage = (sysext_build.out / f"{NAME}_disk_usage.txt").read_text().splitlines()
    assert usage[0].split() == ["File", "Size", "Used", "Avail", "Use%", "Type"]
    row = usage[1].split()
    assert len(usage) == 2 and row[0] == "/" and row[-1] == sysext_build.fmt


def test_listing_is_of_the_image(sysext_build: Built) -> None:
    """Made from the loop-mounted image (as Flatcar's build does) when root: sizes are those inside the image."""
    needs_root()
    assert ">> listings from the staged tree" not in sysext_build.log
    size = sysext_build.bundle.joinpath("overlaybd").stat().st_size
    line = next(
        ln
        for ln in (sysext_build.out / f"{NAME}_contents.txt").read_text().splitlines()
        if ln.endswith(" ./usr/local/overlaybd/overlaybd")
    )
    assert int(line.split()[4]) == size


def test_sysupdate_route_files(portable_build: Built) -> None:
    out = portable_build.out
    assert not (out / PAYLOAD).exists(), "update payloads belong to the lockstep route"
    sums = (out / "SHA256SUMS").read_text().splitlines()
    listed = dict(reversed(ln.split("  ", 1)) for ln in sums)
    assert listed[portable_build.image.name] == hashlib.sha256(portable_build.image.read_bytes()).hexdigest()
    cp = configparser.ConfigParser(strict=True, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((out / "overlaybd.transfer").read_text())
    assert cp["Source"]["Path"] == "http://127.0.0.1:8080/overlaybd/"
    # Both MatchPatterns pick up the image name, with @v = its version and %a = this architecture.
    for section in ("Source", "Target"):
        pattern = cp[section]["MatchPattern"].replace("@v", "*").replace("%a", ARCH)
        assert fnmatch.fnmatchcase(portable_build.image.name, pattern), (pattern, portable_build.image.name)


def test_transfer_file_reads_as_systemd_config(portable_build: Built, tmp_path: Path) -> None:
    """systemd's own config reader finds and prints it where systemd-sysupdate --component=overlaybd looks."""
    d = tmp_path / "root/etc/sysupdate.overlaybd.d"
    d.mkdir(parents=True)
    text = (portable_build.out / "overlaybd.transfer").read_text()
    (d / "overlaybd.transfer").write_text(text)
    res = subprocess.run(
        ["systemd-analyze", "cat-config", f"--root={tmp_path / 'root'}", "sysupdate.overlaybd.d/overlaybd.transfer"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if res.returncode != 0 and "--root" in res.stderr:
        pytest.skip(f"systemd-analyze cat-config --root unsupported here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    assert "overlaybd.transfer" in res.stdout and "CurrentSymlink=/etc/extensions/overlaybd.raw" in res.stdout
