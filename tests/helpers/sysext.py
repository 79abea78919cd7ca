"""Shared helpers of the sysext tier: build.sh runs (reusing out/ when the inputs are unchanged), root checks."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SH = REPO / "build.sh"
NAME = "flatcar-overlaybd"
SYSUPDATE_NAME = "overlaybd"  # extension name of the --sysext-level image (/etc/extensions/overlaybd.raw)
ARCH = {"x86_64": "x86-64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
PAYLOAD = f"flatcar_test_update-{NAME}.gz"
# Same default as the Makefile (FLATCAR_VERSION ?= ...), so a `make` in the same CI run is reused.
FLATCAR_VERSION = os.environ.get("FLATCAR_VERSION", "4593.2.5")
PYTHON = Path(sys.executable)


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop mounts, mount namespaces)")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 900)
    return subprocess.run(cmd, check=False, **kw)


@dataclass(frozen=True)
class Built:
    """One build.sh result: the image and the out dir around it."""

    out: Path
    image: Path
    fmt: str
    args: tuple[str, ...]
    log: str

    @property
    def bundle(self) -> Path:
        return self.out / "bundle"

    @property
    def sysext_level(self) -> bool:
        return "--sysext-level" in self.args or "--portable" in self.args

    @property
    def name(self) -> str:
        """The extension name systemd-sysext matches extension-release.<name> against."""
        return SYSUPDATE_NAME if self.sysext_level else NAME


def image_name(args: list[str]) -> str:
    """flatcar-overlaybd.raw, or overlaybd_<version>_<arch>.raw for --sysext-level (build.sh's names)."""
    if "--sysext-level" not in args and "--portable" not in args:
        return f"{NAME}.raw"
    from overlaybd import __version__

    version = args[args.index("--sysext-version") + 1] if "--sysext-version" in args else __version__
    return f"overlaybd_{version}_{ARCH}.raw"


def build(out: Path, args: list[str], env_extra: dict[str, str] | None = None) -> Built:
    """Run build.sh unless out/ already holds an image built from exactly these inputs (the .key file)."""
    env = dict(os.environ, PYTHON=str(PYTHON), **(env_extra or {}))
    full = [*args, "--out", str(out)]
    image = out / image_name(args)
    key = run([str(BUILD_SH), "--print-key", *args], env=env)
    assert key.returncode == 0, key.stderr
    keyfile = image.with_name(image.name + ".key")
    if image.is_file() and keyfile.is_file() and keyfile.read_text().strip() == key.stdout.strip():
        log = "(reused)"
    else:
        res = run([str(BUILD_SH), *full], env=env)
        assert res.returncode == 0, f"build.sh failed:\n{res.stdout}\n{res.stderr}"
        log = res.stdout
    fmt = "squashfs" if "squashfs" in args else "erofs"
    return Built(out=out, image=image, fmt=fmt, args=tuple(args), log=log)
