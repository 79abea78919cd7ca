"""overlaybd-create --turboOCI / overlaybd-commit --turboOCI reproduce upstream's warp commit."""

from __future__ import annotations

from pathlib import Path

from helpers.tools import run_tool, sha256_file
from overlaybd.format import lsmt
from overlaybd.format.fileio import LocalFile

SECTOR = 512
TOCI_FILE_SHA = "a6a876f6a6a8c3708fb7ce6ac4a392311b9ee66ae1d99d5feaa197bebb777203"


def test_create_fill_commit_matches_vector(tmp_path: Path, vectors: Path) -> None:
    toci, tar = vectors / "turbooci" / "toci.commit", vectors / "turbooci" / "layer.tar"
    data, index, out = tmp_path / "wd", tmp_path / "wi", tmp_path / "toci.commit"
    run_tool("overlaybd-create", data, index, "1", "-s", "--turboOCI")
    assert data.stat().st_size == 1 << 30 and data.stat().st_blocks == 0  # sparse fs-meta file
    # Fill it the way turboOCI-apply would: fs metadata written, file data as remote mappings.
    with lsmt.open_warp_ro(LocalFile(toci), LocalFile(tar)) as src, lsmt.open_warp_rw(data, index) as rw:
        for m in src.tagged_mappings:
            if m.tag == 1:
                rw.add_remote(m.offset * SECTOR, m.length * SECTOR, m.moffset * SECTOR)
            else:
                rw.pwrite(src.pread(m.length * SECTOR, m.offset * SECTOR), m.offset * SECTOR)
    run_tool("overlaybd-commit", data, index, out, "--turboOCI")
    assert sha256_file(out) == TOCI_FILE_SHA


def test_turbooci_commit_of_plain_layer_fails_cleanly(tmp_path: Path) -> None:
    data, index = tmp_path / "d", tmp_path / "i"
    run_tool("overlaybd-create", data, index, "64MiB")
    r = run_tool("overlaybd-commit", data, index, tmp_path / "out", "--turboOCI", check=False)
    assert r.returncode == 1 and b"not a TurboOCI fs-meta file" in r.stderr and str(data).encode() in r.stderr
    assert not (tmp_path / "out").exists()
