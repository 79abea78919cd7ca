"""overlaybd-apply / turboOCI-apply: upstream's flags, a layer applied onto a writable layer, and the errors."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from helpers.tools import run_tool


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _image(tmp_path: Path, size: str = "64MiB") -> Path:
    run_tool("overlaybd-create", "-s", tmp_path / "data", tmp_path / "index", size)
    config = tmp_path / "config.v1.json"
    config.write_text(
        json.dumps({"lowers": [], "upper": {"data": str(tmp_path / "data"), "index": str(tmp_path / "index")}})
    )
    return config


def _cat(image: Path, path: str) -> bytes:
    """A file of an ext4 image, read with e2fsprogs' debugfs (no mount needed)."""
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True)
    return r.stdout


@pytest.mark.root  # FUSE mount + loop device
def test_mkfs_then_layers_then_commit(tmp_path: Path) -> None:
    config = _image(tmp_path)
    first, second = tmp_path / "l1.tar.gz", tmp_path / "l2.tar"
    first.write_bytes(gzip.compress(_tar({"etc/hello": b"hello\n", "etc/gone": b"x"})))
    raw2 = _tar({"etc/hello": b"second\n", "etc/.wh.gone": b""})
    second.write_bytes(raw2)
    r = run_tool("overlaybd-apply", "--mkfs", first, config)
    assert r.stdout == b"overlaybd-apply done\n" and r.stderr == b""  # no progress when not on a terminal
    run_tool("overlaybd-apply", "--checksum", hashlib.sha256(raw2).hexdigest(), second, config)
    run_tool("overlaybd-commit", tmp_path / "data", tmp_path / "index", tmp_path / "layer.commit", "-z", "-t")
    cfg = tmp_path / "ro.json"
    cfg.write_text(json.dumps({"lowers": [{"file": str(tmp_path / "layer.commit")}]}))
    run_tool("overlaybd-dump", cfg, tmp_path / "disk.img")
    assert _cat(tmp_path / "disk.img", "/etc/hello") == b"second\n"
    assert _cat(tmp_path / "disk.img", "/etc/gone") == b""


@pytest.mark.root  # FUSE mount + loop device
def test_raw_image(tmp_path: Path) -> None:
    img = tmp_path / "raw.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    layer = tmp_path / "l.tar"
    layer.write_bytes(_tar({"a": b"raw\n"}))
    run_tool("overlaybd-apply", "--raw", "--mkfs", layer, img)
    assert _cat(img, "/a") == b"raw\n"


@pytest.mark.root  # FUSE mount + loop device
def test_errors(tmp_path: Path) -> None:
    config = _image(tmp_path)
    layer = tmp_path / "l.tar"
    layer.write_bytes(_tar({"a": b"1"}))
    r = run_tool("overlaybd-apply", layer, config, check=False)  # no file system yet
    assert r.returncode == 1 and b"needs --mkfs" in r.stderr and str(config).encode() in r.stderr
    r = run_tool("overlaybd-apply", "--mkfs", "--checksum", "0" * 64, layer, config, check=False)
    assert r.returncode == 1 and b"sha256 checksum mismatch" in r.stderr
    r = run_tool("overlaybd-apply", "--checksum", "abc", layer, config, check=False)
    assert r.returncode == 1 and b"--checksum" in r.stderr
    r = run_tool("overlaybd-apply", tmp_path / "missing.tar", config, check=False)
    assert r.returncode == 2 and b"File does not exist" in r.stderr
    r = run_tool("overlaybd-apply", layer, config, "--service_config_path", tmp_path / "nope.json", check=False)
    assert r.returncode == 2 and b"nope.json" in r.stderr
    r = run_tool("overlaybd-apply", "--gz_index_path", tmp_path / "gz", layer, config, check=False)
    assert r.returncode == 1 and b"not supported" in r.stderr
    ro = tmp_path / "ro.json"
    run_tool("overlaybd-create", tmp_path / "d2", tmp_path / "i2", "64MiB")
    run_tool("overlaybd-commit", tmp_path / "d2", tmp_path / "i2", tmp_path / "c2")
    ro.write_text(json.dumps({"lowers": [{"file": str(tmp_path / "c2")}]}))
    r = run_tool("overlaybd-apply", layer, ro, check=False)
    assert r.returncode == 1 and b"no writable layer" in r.stderr
    bad = tmp_path / "bad.tar"
    bad.write_bytes(_tar({"../escape": b"x"}))
    r = run_tool("overlaybd-apply", bad, config, check=False)
    assert r.returncode == 1 and b"escape" in r.stderr and r.stderr.count(b"\n") == 1


@pytest.mark.parametrize("flags", [[], ["--fstype", "erofs", "--import"], ["--export"]])
def test_turbooci_apply_says_not_supported(tmp_path: Path, flags: list[str]) -> None:
    layer = tmp_path / "l.tar"
    layer.write_bytes(_tar({"a": b"1"}))
    r = run_tool("turboOCI-apply", *flags, layer, tmp_path / "config.v1.json", check=False)
    assert r.returncode == 1 and b"turboOCI-apply: TurboOCI layers" in r.stderr and b"not supported" in r.stderr
    r = run_tool("turboOCI-apply", "--fstype", "xfs", layer, check=False)
    assert r.returncode == 1 and b"--fstype" in r.stderr
    assert run_tool("turboOCI-apply", "--version").stdout.startswith(b"turboOCI-apply ")
