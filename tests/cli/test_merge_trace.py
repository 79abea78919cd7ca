"""overlaybd-merge with `recordTracePath` naming an empty file records a prefetch trace (how upstream made
vectors/trace/trace.bin), and the merged output is unchanged by the recording."""

from __future__ import annotations

import shutil
from pathlib import Path

from overlaybd.format import opener
from overlaybd.format.fileio import LocalFile
from overlaybd.format.trace import read_trace


def _unwrapped_size(path: Path) -> int:
    f = opener.unwrap(LocalFile(str(path)))
    try:
        return f.size()
    finally:
        f.close()


def _setup(vectors: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copy(vectors / "zfile" / "L0.commit.z_lz4", tmp_path)
    shutil.copy(vectors / "commit" / "L1.commit", tmp_path)
    svc = tmp_path / "svc.json"
    svc.write_text((vectors / "config" / "svc.json").read_text().replace("WORKDIR", str(tmp_path)))
    cfg = tmp_path / "trace.config.v1.json"
    cfg.write_text((vectors / "trace" / "trace.config.v1.json").read_text().replace("WORKDIR", str(tmp_path)))
    return cfg, svc


def test_merge_records_trace(tool, vectors: Path, tmp_path: Path) -> None:
    cfg, svc = _setup(vectors, tmp_path)
    trace = tmp_path / "trace.bin"
    trace.write_bytes(b"")
    out = tmp_path / "merged"
    tool("overlaybd-merge", "--service_config_path", svc, "--compress=false", cfg, out)
    assert out.read_bytes() == (vectors / "merge" / "L01.obdmerge").read_bytes()
    assert (tmp_path / "trace.result").read_text() == "success"
    assert (tmp_path / "trace.bin.ok").exists() and not (tmp_path / "trace.bin.lock").exists()
    records = read_trace(str(trace))
    assert {r.layer_index for r in records} == {0, 1}
    # offsets are in the unwrapped layer files' address space (the LSMT file inside the ZFile for layer 0)
    sizes = [_unwrapped_size(tmp_path / "L0.commit.z_lz4"), _unwrapped_size(tmp_path / "L1.commit")]
    for r in records:
        assert r.op == "R" and r.count > 0 and r.offset >= 0
        assert r.offset + r.count <= sizes[r.layer_index]


def test_merge_without_trace_file_records_nothing(tool, vectors: Path, tmp_path: Path) -> None:
    cfg, svc = _setup(vectors, tmp_path)  # recordTracePath names a missing file: no recording
    out = tmp_path / "merged"
    tool("overlaybd-merge", "--service_config_path", svc, "--compress=false", cfg, out)
    assert out.read_bytes() == (vectors / "merge" / "L01.obdmerge").read_bytes()
    assert not (tmp_path / "trace.bin").exists() and not (tmp_path / "trace.bin.ok").exists()


def test_merge_keeps_existing_trace(tool, vectors: Path, tmp_path: Path) -> None:
    cfg, svc = _setup(vectors, tmp_path)  # a non-empty trace would be replayed by a device; merge leaves it be
    shutil.copy(vectors / "trace" / "trace.bin", tmp_path / "trace.bin")
    tool("overlaybd-merge", "--service_config_path", svc, "--compress=false", cfg, tmp_path / "merged")
    assert (tmp_path / "trace.bin").read_bytes() == (vectors / "trace" / "trace.bin").read_bytes()
    assert not (tmp_path / "trace.bin.ok").exists()
