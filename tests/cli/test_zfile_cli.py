"""overlaybd-zfile against the upstream-made vectors: byte-identical output, -x, --verify, stdin, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers.tools import sha256_file


def test_zstd_compress_matches_upstream(tool, vectors: Path, tmp_path: Path) -> None:
    out = tmp_path / "L0.commit.zstd.zf"
    tool("overlaybd-zfile", "--algorithm", "zstd", vectors / "commit" / "L0.commit", out)
    assert out.read_bytes() == (vectors / "zfile" / "L0.commit.zstd.zf").read_bytes()


def test_extract_round_trip(tool, vectors: Path, tmp_path: Path) -> None:
    for name in ("L0.commit.lz4.zf", "L0.commit.zstd.zf", "L0.commit.lz4bs64.zf", "L0.commit.lz4.nocrc.zf"):
        out = tmp_path / (name + ".raw")
        tool("overlaybd-zfile", "-x", vectors / "zfile" / name, out)
        assert sha256_file(out) == "2b91215a37bfa969fa9376e925814dbe29e9778681d69eda56885b500e43285b", name


def test_compress_then_extract_lz4(tool, vectors: Path, tmp_path: Path) -> None:
    zf, raw = tmp_path / "c.zf", tmp_path / "c.raw"
    tool("overlaybd-zfile", "--bs", "16", vectors / "commit" / "L1.commit", zf)
    tool("overlaybd-zfile", "-x", zf, raw)
    assert raw.read_bytes() == (vectors / "commit" / "L1.commit").read_bytes()


def test_tar_wrapped(tool, vectors: Path, tmp_path: Path) -> None:
    out = tmp_path / "l1.tar"
    tool("overlaybd-zfile", "-t", vectors / "commit" / "L1.commit", out)
    assert out.read_bytes()[257:262] == b"ustar"
    r = tool("overlaybd-zfile", "--verify", out)
    assert b"valid zfile" in r.stdout
    raw = tmp_path / "l1.raw"
    tool("overlaybd-zfile", "-x", vectors / "zfile" / "L1.commit.z_lz4.tar", raw)
    assert raw.read_bytes() == (vectors / "commit" / "L1.commit").read_bytes()


def test_stdin_compress(tool, vectors: Path, tmp_path: Path) -> None:
    out = tmp_path / "stdin.zf"
    data = (vectors / "commit" / "L0.commit").read_bytes()
    tool("overlaybd-zfile", "--algorithm", "zstd", out, input=data)
    assert out.read_bytes() == (vectors / "zfile" / "L0.commit.zstd.zf").read_bytes()
    r = tool("overlaybd-zfile", "-x", out, check=False)
    assert r.returncode == 1 and b"stdin" in r.stderr


def test_verify_good_files(tool, vectors: Path) -> None:
    for name in ("L0.commit.lz4.zf", "L0.commit.zstd.zf", "L0.commit.z_lz4", "L1.commit.z_lz4.tar"):
        r = tool("overlaybd-zfile", "--verify", vectors / "zfile" / name)
        assert b"is a valid zfile blob" in r.stdout


def test_verify_corrupted_block_names_block(tool, vectors: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.zf"
    shutil.copy(vectors / "zfile" / "L0.commit.lz4.zf", bad)
    bad.chmod(0o644)
    with open(bad, "r+b") as f:
        f.seek(512 + 3000)
        byte = f.read(1)
        f.seek(512 + 3000)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = tool("overlaybd-zfile", "--verify", bad, check=False)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert str(bad) in err and "block" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_verify_not_a_zfile(tool, vectors: Path) -> None:
    r = tool("overlaybd-zfile", "--verify", vectors / "commit" / "L0.commit", check=False)
    assert r.returncode == 1 and b"not a ZFile" in r.stderr


def test_existing_output_needs_f(tool, vectors: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.zf"
    out.write_bytes(b"old")
    r = tool("overlaybd-zfile", vectors / "commit" / "L1.commit", out, check=False)
    assert r.returncode == 1 and b"exists" in r.stderr and out.read_bytes() == b"old"
    tool("overlaybd-zfile", "-f", vectors / "commit" / "L1.commit", out)
    assert out.read_bytes()[:5] == b"ZFile"


def test_threads_option_does_not_change_bytes(tool, vectors: Path, tmp_path: Path) -> None:
    src = vectors / "commit" / "L0.commit"
    for n in ("1", "3"):
        out = tmp_path / f"zstd.{n}"
        tool("overlaybd-zfile", "--threads", n, "--algorithm", "zstd", src, out)
        assert out.read_bytes() == (vectors / "zfile" / "L0.commit.zstd.zf").read_bytes()
    tool("overlaybd-zfile", "--threads", "1", src, tmp_path / "lz4.1")
    tool("overlaybd-zfile", "--threads", "4", src, tmp_path / "lz4.4")
    assert (tmp_path / "lz4.1").read_bytes() == (tmp_path / "lz4.4").read_bytes()
    r = tool("overlaybd-zfile", "--threads", "0", src, tmp_path / "x", check=False)
    assert r.returncode != 0 and b"thread count" in r.stderr and not (tmp_path / "x").exists()


def test_bad_options(tool, vectors: Path, tmp_path: Path) -> None:
    r = tool("overlaybd-zfile", "--bs", "3", vectors / "commit" / "L1.commit", tmp_path / "x", check=False)
    assert r.returncode != 0 and b"--bs" in r.stderr
    r = tool("overlaybd-zfile", tmp_path / "missing", tmp_path / "x", check=False)
    assert r.returncode == 1 and b"missing" in r.stderr and b"Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_version(tool) -> None:
    for name in (
        "overlaybd-zfile",
        "overlaybd-commit",
        "overlaybd-create",
        "overlaybd-merge",
        "overlaybd-dump",
        "overlaybd-info",
    ):
        r = tool(name, "--version")
        assert r.stdout.decode().startswith(f"{name} ")
