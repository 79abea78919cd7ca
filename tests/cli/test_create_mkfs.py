"""overlaybd-create --mkfs: ext4 on a new append/sparse layer (through the real FUSE frontend + loop device).

The file system is checked from the outside: the layer is committed, dumped to a raw file with
overlaybd-dump and examined with e2fsck/dumpe2fs. TMPDIR points into the test's directory so a
leftover run directory or loop device of the tool would be seen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

VSIZE = 64 << 20


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mount, losetup)"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "no /dev/fuse or loop devices"
    for exe in ("mkfs.ext4", "e2fsck", "dumpe2fs", "losetup"):
        if shutil.which(exe) is None:
            return f"{exe} missing (e2fsprogs/util-linux)"
    return None


pytestmark = [pytest.mark.root, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test directory, also the tools' TMPDIR; afterwards no loop device may point into it."""
    run = tmp_path / "tmp"
    run.mkdir()
    monkeypatch.setenv("TMPDIR", str(run))
    yield tmp_path
    leaked = [ln for ln in _loop_list() if str(tmp_path) in ln]
    for ln in leaked:  # clean up before failing, so one bad run does not starve the host of loop devices
        subprocess.run(["losetup", "-d", ln.split(":", 1)[0]], capture_output=True)
    assert not leaked, f"loop devices left attached: {leaked}"
    with open("/proc/self/mountinfo") as f:
        mounts = [ln for ln in f if str(tmp_path) in ln]
    assert not mounts, f"FUSE mounts left: {mounts}"
    assert list(run.iterdir()) == [], "the tool left files in TMPDIR"


def _loop_list() -> list[str]:
    r = subprocess.run(["losetup", "-a"], capture_output=True, text=True)
    return r.stdout.splitlines()


def _fs_size(raw: Path) -> int:
    r = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True, check=True)
    fields = dict(ln.split(":", 1) for ln in r.stdout.splitlines() if ":" in ln)
    return int(fields["Block count"]) * int(fields["Block size"])


@pytest.mark.parametrize("sparse", [False, True], ids=["append", "sparse"])
def test_mkfs_layer_is_clean_ext4(tool, work: Path, sparse: bool) -> None:
    data, index = work / "data", work / "index"
    tool("overlaybd-create", "--mkfs", *(["-s"] if sparse else []), data, index, "64MiB")
    commit, raw = work / "layer.commit", work / "disk.raw"
    tool("overlaybd-commit", data, index, commit)
    tool("overlaybd-dump", commit, raw)
    assert raw.stat().st_size == VSIZE
    r = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _fs_size(raw) == VSIZE
    features = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True).stdout
    feature_line = next(ln for ln in features.splitlines() if ln.startswith("Filesystem features:"))
    assert "has_journal" not in feature_line and "flex_bg" in feature_line


def test_mkfs_turbooci_fsmeta(tool, work: Path) -> None:
    """--turboOCI --mkfs (the snapshotter's TurboOCI create): the warp data file is the fs-meta image itself."""
    data, index = work / "fsmeta", work / "windex"
    tool("overlaybd-create", "-s", "--turboOCI", "--mkfs", data, index, "64MiB")
    r = subprocess.run(["e2fsck", "-fn", str(data)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _fs_size(data) == VSIZE


def test_mkfs_raw_image(tool, work: Path) -> None:
    data, index = work / "raw.img", work / "raw.index"
    tool("overlaybd-create", "--raw", "--mkfs", data, index, "64MiB")
    r = subprocess.run(["e2fsck", "-fn", str(data)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _fs_size(data) == VSIZE


@pytest.mark.parametrize("kind", ["append", "sparse", "raw", "turbooci"])
def test_mkfs_failure_leaves_nothing(tool, work: Path, kind: str) -> None:
    data, index = work / "data", work / "index"
    flags = {"append": [], "sparse": ["-s"], "raw": ["--raw"], "turbooci": ["-s", "--turboOCI"]}[kind]
    r = tool("overlaybd-create", "--mkfs", *flags, data, index, "64KiB", check=False)  # too small for ext4
    err = r.stderr.decode()
    assert r.returncode == 1
    assert err.count("\n") == 1 and err.startswith(f"overlaybd-create: {data}: mkfs.ext4 failed"), err
    assert "Traceback" not in err
    assert not data.exists() and not index.exists()


def test_mkfs_refuses_existing_files(tool, work: Path) -> None:
    data, index = work / "data", work / "index"
    data.write_bytes(b"keep")
    r = tool("overlaybd-create", "--mkfs", data, index, "64MiB", check=False)
    assert r.returncode == 1 and f"{data}: file exists" in r.stderr.decode()
    assert data.read_bytes() == b"keep" and not index.exists()
