"""overlaybd-merge / -dump / -info on the vectors: upstream merge bytes, image hashes, sparse dumps, errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

L0_SHA = "d42a6fb743ce3e3eebdf0ad2560c98de47252c0f4d3a2b561509c34f82728892"
L01_SHA = "7d136d857b79c2979f663ea122311b599c9df0fa25a468f99d97fe6677c6eafa"


@pytest.fixture
def svc(vectors: Path, tmp_path: Path) -> Path:
    p = tmp_path / "svc.json"
    p.write_text((vectors / "config" / "svc.json").read_text().replace("WORKDIR", str(tmp_path)))
    return p


def config(tmp_path: Path, doc: dict, name: str = "config.v1.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_merge_uncompressed_matches_upstream(tool, vectors: Path, tmp_path: Path, svc: Path) -> None:
    text = (vectors / "config" / "merge.config.v1.json").read_text()
    cfg = tmp_path / "merge.config.v1.json"
    cfg.write_text(
        text.replace("WORKDIR/merge.result", str(tmp_path / "merge.result")).replace("WORKDIR", str(vectors / "commit"))
    )
    out = tmp_path / "L01.obdmerge"
    tool("overlaybd-merge", "--service_config_path", svc, "--compress=false", cfg, out)
    assert out.read_bytes() == (vectors / "merge" / "L01.obdmerge").read_bytes()
    assert (tmp_path / "merge.result").read_text() == "success"
    zf = tmp_path / "L01.obdmerge.zf"
    tool("overlaybd-merge", "--service_config_path", svc, cfg, zf)
    info = json.loads(tool("overlaybd-info", zf).stdout)
    assert info["zfile"]["header_overwritten"] is False and info["zfile"]["flags"] == "0x16"  # trailer
    assert info["zfile"]["block_crc"]
    raw = tmp_path / "raw"
    tool("overlaybd-zfile", "-x", zf, raw)
    assert raw.read_bytes() == out.read_bytes()


def test_merge_of_zfile_and_tar_lowers(tool, vectors: Path, tmp_path: Path, svc: Path) -> None:
    cfg = config(
        tmp_path,
        {
            "lowers": [
                {"file": str(vectors / "zfile" / "L0.commit.z_lz4")},
                {"file": str(vectors / "zfile" / "L1.commit.z_lz4.tar")},
            ]
        },
    )
    out = tmp_path / "m.tar"
    tool("overlaybd-merge", "--service_config_path", svc, "-t", cfg, out)
    assert json.loads(tool("overlaybd-info", out).stdout)["tar"]["payload_offset"] == 1536
    assert tool("overlaybd-dump", "--sha256", out).stdout.decode().strip() == L01_SHA


def test_merge_compress_threads(tool, vectors: Path, tmp_path: Path, svc: Path) -> None:
    """--compress_threads picks the ZFile compression threads; the bytes do not depend on it."""
    cfg = config(tmp_path, {"lowers": [{"file": str(vectors / "commit" / "L0.commit")}]})
    outs = []
    for n in ("1", "3"):
        outs.append(tmp_path / f"m{n}.zf")
        tool("overlaybd-merge", "--service_config_path", svc, "--compress_threads", n, cfg, outs[-1])
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert tool("overlaybd-dump", "--sha256", outs[0]).stdout.decode().strip() == L0_SHA
    r = tool(
        "overlaybd-merge", "--service_config_path", svc, "--compress_threads", "0", cfg, tmp_path / "x", check=False
    )
    assert r.returncode != 0 and b"thread count" in r.stderr


def test_merge_errors(tool, vectors: Path, tmp_path: Path, svc: Path) -> None:
    result = tmp_path / "result"
    cfg = config(tmp_path, {"lowers": [{"file": str(tmp_path / "missing")}], "resultFile": str(result)})
    r = tool("overlaybd-merge", "--service_config_path", svc, cfg, tmp_path / "o", check=False)
    assert r.returncode == 1 and b"lowers[0]" in r.stderr and b"Traceback" not in r.stderr
    assert result.read_text().startswith("failed:") and not (tmp_path / "o").exists()
    bad_svc = tmp_path / "bad.json"
    bad_svc.write_text('{"cacheConfig": {"cacheSizeGB": "4"}}')
    r = tool("overlaybd-merge", "--service_config_path", bad_svc, cfg, tmp_path / "o", check=False)
    assert r.returncode == 1 and b"cacheConfig.cacheSizeGB" in r.stderr
    r = tool("overlaybd-merge", "--compress=maybe", cfg, tmp_path / "o", check=False)
    assert r.returncode != 0 and b"--compress" in r.stderr


@pytest.mark.parametrize(
    "files, sha",
    [
        (["commit/L0.commit", "commit/L1.commit"], L01_SHA),
        (["zfile/L0.commit.z_lz4", "zfile/L1.commit.z_lz4.tar"], L01_SHA),
        (["zfile/L0.commit.zstd.zf"], L0_SHA),
    ],
)
def test_dump_sha256_of_configs(tool, vectors: Path, tmp_path: Path, files: list[str], sha: str) -> None:
    cfg = config(tmp_path, {"lowers": [{"file": str(vectors / f)} for f in files]})
    assert tool("overlaybd-dump", "--sha256", cfg).stdout.decode().strip() == sha


def test_dump_rw_upper_config(tool, vectors: Path, tmp_path: Path) -> None:
    copies = {}
    for ext in ("data", "index"):
        copies[ext] = tmp_path / f"L1.{ext}"
        subprocess.run(["cp", "--sparse=always", str(vectors / "rw" / f"L1.{ext}"), str(copies[ext])], check=True)
        copies[ext].chmod(0o644)
    cfg = config(
        tmp_path,
        {
            "lowers": [{"file": str(vectors / "commit" / "L0.commit")}],
            "upper": {"data": str(copies["data"]), "index": str(copies["index"])},
        },
    )
    assert tool("overlaybd-dump", "--sha256", cfg).stdout.decode().strip() == L01_SHA


def test_dump_writes_sparse_file(tool, vectors: Path, tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        {"lowers": [{"file": str(vectors / "commit" / "L0.commit")}, {"file": str(vectors / "commit" / "L1.commit")}]},
    )
    out = tmp_path / "disk.img"
    tool("overlaybd-dump", cfg, out)
    st = os.stat(out)
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 4 << 20  # ~1.1 MiB of data in a 64 MiB disk
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == L01_SHA
    r = tool("overlaybd-dump", cfg, out, check=False)
    assert r.returncode == 1 and b"exists" in r.stderr


def test_dump_to_stdout(tool, vectors: Path) -> None:
    r = tool("overlaybd-dump", vectors / "commit" / "L0.commit")
    assert hashlib.sha256(r.stdout).hexdigest() == L0_SHA


def test_dump_errors(tool, vectors: Path, tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text('{"lowers": [{"file": 5}]}')
    r = tool("overlaybd-dump", "--sha256", bad, check=False)
    assert r.returncode == 1
    assert r.stderr.decode().strip() == f"overlaybd-dump: {bad}: lowers[0].file: expected string, got 5"
    r = tool("overlaybd-dump", "--sha256", vectors / "ext4" / "small.tar", check=False)
    assert r.returncode == 1 and b"small.tar" in r.stderr and b"Traceback" not in r.stderr


def test_info_kinds(tool, vectors: Path) -> None:
    kinds = {
        "commit/L0.commit": "committed",
        "sealed/L0.sealed": "sealed",
        "rw/L0.data": "rw-data",
        "rw/L0.index": "rw-index",
        "rw/S0.data": "rw-data-sparse",
        "merge/L01.obdmerge.zf": "committed",
        "zfile/L1.commit.z_lz4.tar": "committed",
    }
    for name, kind in kinds.items():
        info = json.loads(tool("overlaybd-info", vectors / name).stdout)
        assert info["lsmt"]["kind"] == kind, name
    info = json.loads(tool("overlaybd-info", vectors / "commit" / "L0.commit").stdout)["lsmt"]
    assert info["trailer"]["index_size"] == 256 and info["index"]["entries"] == 8
    assert info["header"]["user_tag"] == "vector L0"
    r = tool("overlaybd-info", vectors / "ext4" / "small.tar", check=False)
    assert r.returncode == 1 and b"not an overlaybd layer" in r.stderr
