"""Fixtures for the sysext tier: build the image once per session (or reuse out/ when `make` already
built it from the same inputs) and mount it read-only; everything is unmounted even on failure."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.sysext import FLATCAR_VERSION, REPO, Built, build, needs_root, run


@pytest.fixture(scope="session")
def sysext_build() -> Built:
    """The default image (erofs, lockstep VERSION_ID) in REPO/out, like `make sysext`."""
    return build(REPO / "out", ["--flatcar-version", FLATCAR_VERSION])


@pytest.fixture(scope="session")
def portable_build(sysext_build: Built, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The sysupdate route's image (squashfs, SYSEXT_LEVEL=1.0), made from the same frozen bundle (no second
    PyInstaller run). `--portable` is the old spelling of `--sysext-level`: the test keeps it working."""
    out = tmp_path_factory.mktemp("portable")
    shutil.copytree(sysext_build.bundle, out / "bundle", symlinks=True)
    args = ["--flatcar-version", FLATCAR_VERSION, "--format", "squashfs", "--portable", "--reuse-bundle"]
    return build(out, [*args, "--sysupdate-url", "http://127.0.0.1:8080/overlaybd/"])


@pytest.fixture(scope="session")
def tools() -> list[str]:
    from overlaybd.cli import TOOLS

    return sorted(TOOLS)


def _mount(image: Path, fstype: str) -> Iterator[Path]:
    needs_root()
    mnt = Path(tempfile.mkdtemp(prefix="obd-sysext-mnt-"))
    res = run(["mount", "-t", fstype, "-o", "loop,ro", str(image), str(mnt)])
    assert res.returncode == 0, res.stderr
    try:
        yield mnt
    finally:
        run(["umount", "-d", str(mnt)])
        mnt.rmdir()


@pytest.fixture(scope="session")
def mounted(sysext_build: Built) -> Iterator[Path]:
    """The default image loop-mounted read-only (root of the image)."""
    yield from _mount(sysext_build.image, sysext_build.fmt)


@pytest.fixture(scope="session")
def mounted_portable(portable_build: Built) -> Iterator[Path]:
    yield from _mount(portable_build.image, portable_build.fmt)
