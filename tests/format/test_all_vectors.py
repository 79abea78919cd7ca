"""Every file under shared/vectors opens with its reader and matches the README's hashes.

One table (`CASES`, keyed by path relative to the vectors dir) says how each file is read and
what it must yield; the single test is parametrised over the files actually present, so a new
vector without a table entry fails instead of being silently skipped. File-level sha256/size
come from parsing the README's "Files" table; logical image hashes are the README's constants.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.vectors import logical_sha256
from overlaybd.config.image_config import load_device_config
from overlaybd.config.service import load_service_config
from overlaybd.format import lsmt
from overlaybd.format.fileio import LocalFile
from overlaybd.format.lsmt.header import HeaderTrailer
from overlaybd.format.opener import open_layer, unwrap
from overlaybd.format.trace import read_trace
from overlaybd.registry.credentials import CredentialProvider

L0_SHA = "d42a6fb743ce3e3eebdf0ad2560c98de47252c0f4d3a2b561509c34f82728892"
L01_SHA = "7d136d857b79c2979f663ea122311b599c9df0fa25a468f99d97fe6677c6eafa"
AP_SHA = "d42283c5d21fa460c9e5ab23c3ff91311f2e12030a5ba02434e006171fed233c"
TOCI_SHA = "691cb80c6a3450794e6d26442e6033d821ea8eb3443a59064c91c48915cc6c04"
MIB, GIB = 1 << 20, 1 << 30
BLOB_URL = "https://registry.example/v2/library/app/blobs/sha256:" + "0" * 64

# same location rule as the `vectors` fixture (tests/conftest.py); needed at collection time
VECTORS = Path(os.environ.get("OVERLAYBD_VECTORS", Path(__file__).resolve().parents[3] / "shared" / "vectors"))

Check = Callable[[Path, Path, Path], None]  # (file, vectors dir, tmp_path)


# -- helpers ---------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def layer(vectors: Path, rel: str) -> lsmt.ReadOnlyLayer:
    return open_layer(LocalFile(vectors / rel))


def image(*lowers: str, vsize: int = 64 * MIB, sha: str) -> Check:
    """The file is the top read-only layer (any blob form) over `lowers` (bottom first)."""

    def check(path: Path, vectors: Path, tmp_path: Path) -> None:
        with lsmt.Stack([layer(vectors, rel) for rel in lowers] + [open_layer(LocalFile(path))]) as img:
            assert img.vsize == vsize
            assert logical_sha256(img) == sha

    return check


def rw_pair(*lowers: str, vsize: int = 64 * MIB, sha: str | None, empty: bool = False) -> Check:
    """The file is the data file of a writable layer (index beside it) over `lowers`."""

    def check(path: Path, vectors: Path, tmp_path: Path) -> None:
        upper = lsmt.open_rw(path, path.with_suffix(".index"), readonly=True)
        with lsmt.Stack([layer(vectors, rel) for rel in lowers], upper) as img:
            assert img.vsize == vsize
            if empty:
                assert upper.mappings() == [] and img.pread(MIB, vsize - MIB) == bytes(MIB)
            if sha is not None:
                assert logical_sha256(img) == sha

    return check


def rw_index(records: int, sparse_pair: bool = False) -> Check:
    """The file is a writable layer's index: header 0x01 and `records` raw mappings (or empty for
    a sparse layer, whose index file upstream creates but never uses)."""

    def check(path: Path, vectors: Path, tmp_path: Path) -> None:
        raw = path.read_bytes()
        if sparse_pair:
            assert raw == b""
            with lsmt.open_rw(path.with_suffix(".data"), path, readonly=True) as rw:
                assert rw.sparse
            return
        hdr = HeaderTrailer.unpack(raw[:4096], path.name)
        assert (hdr.flags, hdr.index_offset) == (0x01, 4096)
        assert len(raw) == 4096 + 16 * records

    return check


def zfile_of(rel: str, sha: str, *lowers: str) -> Check:
    """A ZFile whose contents are exactly the vector `rel`; as a layer it yields `sha`."""

    def check(path: Path, vectors: Path, tmp_path: Path) -> None:
        plain = (vectors / rel).read_bytes()
        with unwrap(LocalFile(path)) as inner:
            assert inner.size() == len(plain)
            assert inner.pread(len(plain), 0) == plain
        vsize = GIB if sha == AP_SHA else 64 * MIB
        image(*lowers, vsize=vsize, sha=sha)(path, vectors, tmp_path)

    return check


def substituted(path: Path, tmp_path: Path, workdir: Path) -> Path:
    """Copy of a config with the WORKDIR placeholder replaced (placeholder must be present)."""
    text = path.read_text()
    assert "WORKDIR" in text
    out = tmp_path / path.name
    out.write_text(text.replace("WORKDIR", str(workdir)))
    return out


def device_config(lowers: int, writable: bool, root: bool = False, extra: Callable | None = None) -> Check:
    """A config.v1.json; WORKDIR = the vectors root when the paths name a sub-dir, else the file's dir."""

    def check(path: Path, vectors: Path, tmp_path: Path) -> None:
        cfg = load_device_config(substituted(path, tmp_path, vectors if root else path.parent))
        assert len(cfg.lowers) == lowers
        assert cfg.writable == writable
        if extra is not None:
            extra(cfg, vectors)

    return check


def open_toci_config(cfg, vectors: Path) -> None:
    """What overlaybd.image does for a lower with targetFile: a warp layer over the target."""
    (lower,) = cfg.lowers
    assert lower.target_file == str(vectors / "turbooci" / "layer.tar")
    warp = lsmt.open_warp_ro(unwrap(LocalFile(lower.file)), LocalFile(lower.target_file))
    with lsmt.Stack([warp]) as img:
        assert logical_sha256(img) == TOCI_SHA


def warp_upper_config(cfg, vectors: Path) -> None:
    assert cfg.upper.target.endswith("/turbooci/layer.tar")


def trace_config(cfg, vectors: Path) -> None:
    assert cfg.record_trace_path == str(vectors / "trace" / "trace.bin")


def service_config(path: Path, vectors: Path, tmp_path: Path) -> None:
    svc = load_service_config(substituted(path, tmp_path, path.parent))
    assert svc.credential_config.mode == "file"
    assert svc.credential_config.path == str(path.parent / "cred.json")
    assert CredentialProvider.from_service(svc).lookup(BLOB_URL) is None  # cred.json has no auths


def credentials(path: Path, vectors: Path, tmp_path: Path) -> None:
    assert CredentialProvider("file", str(path)).lookup(BLOB_URL) is None


def small_tar(path: Path, vectors: Path, tmp_path: Path) -> None:
    """The OCI layer both ext4/ and turbooci/ were made from (same bytes in both places)."""
    assert path.read_bytes() == (vectors / "ext4" / "small.tar").read_bytes()
    with tarfile.open(path) as tf:
        hello = tf.extractfile("./etc/hello.txt")
        blob = tf.extractfile("./bin/blob")
        assert hello is not None and blob is not None
        assert hello.read() == b"hello overlaybd\n"
        assert blob.read() == bytes((7 * i + 3) & 255 for i in range(20000))
        assert tf.getmember("./bin/link").linkname == "../etc/hello.txt"


def warp_layer(path: Path, vectors: Path, tmp_path: Path) -> None:
    target = LocalFile(vectors / "turbooci" / "layer.tar")
    with lsmt.open_warp_ro(unwrap(LocalFile(path)), target) as warp:
        assert warp.vsize == GIB
        assert sorted(m.tag for m in warp.tagged_mappings) == [0] * 15 + [1] * 2
        assert logical_sha256(warp) == TOCI_SHA


def trace(path: Path, vectors: Path, tmp_path: Path) -> None:
    records = read_trace(path)
    assert len(records) == 54
    assert {r.layer_index for r in records} <= {0, 1} and all(r.op in ("R", "W") for r in records)


def readme(path: Path, vectors: Path, tmp_path: Path) -> None:
    """The README's file table and CASES describe the same files."""
    listed = set(readme_files(vectors))
    assert len(listed) >= 25, f"README table parsed to only {len(listed)} files"
    assert listed - set(CASES) == set(), "README lists files without a CASES entry"
    assert {p for p in listed if not (vectors / p).exists()} == set(), "README lists missing files"


# -- the table -------------------------------------------------------------------------------

CASES: dict[str, Check] = {
    "README.md": readme,
    "commit/L0.commit": image(sha=L0_SHA),
    "commit/L1.commit": image("commit/L0.commit", sha=L01_SHA),
    "commit/S0.commit": image(sha=L0_SHA),
    "config/cred.json": credentials,
    "config/merge.config.v1.json": device_config(2, False),
    "config/svc.json": service_config,
    "ext4/ap.commit": image(vsize=GIB, sha=AP_SHA),
    "ext4/ap.commit.zf": zfile_of("ext4/ap.commit", AP_SHA),
    "ext4/apply.config.v1.json": device_config(0, True),
    "ext4/small.tar": small_tar,
    "merge/L01.merged": image(sha=L01_SHA),
    "merge/L01.obdmerge": image(sha=L01_SHA),
    "merge/L01.obdmerge.zf": zfile_of("merge/L01.obdmerge", L01_SHA),
    "rw/L0.data": rw_pair(sha=L0_SHA),
    "rw/L0.index": rw_index(9),
    "rw/L1.data": rw_pair("commit/L0.commit", sha=L01_SHA),
    "rw/L1.index": rw_index(4),
    "rw/S0.data": rw_pair(sha=L0_SHA),
    "rw/S0.index": rw_index(0, sparse_pair=True),
    "rw/cli-create.data": rw_pair(vsize=GIB, sha=None, empty=True),
    "rw/cli-create.index": rw_index(0),
    "sealed/L0.sealed": image(sha=L0_SHA),
    "trace/trace.bin": trace,
    "trace/trace.config.v1.json": device_config(2, False, extra=trace_config),
    "turbooci/config.v1.json": device_config(0, True, root=True, extra=warp_upper_config),
    "turbooci/layer.tar": small_tar,
    "turbooci/ro.config.v1.json": device_config(1, False, root=True, extra=open_toci_config),
    "turbooci/toci.commit": warp_layer,
    "zfile/L0.commit.lz4.nocrc.zf": zfile_of("commit/L0.commit", L0_SHA),
    "zfile/L0.commit.lz4.zf": zfile_of("commit/L0.commit", L0_SHA),
    "zfile/L0.commit.lz4bs64.zf": zfile_of("commit/L0.commit", L0_SHA),
    "zfile/L0.commit.z_lz4": image(sha=L0_SHA),
    "zfile/L0.commit.z_zstd64": image(sha=L0_SHA),
    "zfile/L0.commit.zstd.nocrc.zf": zfile_of("commit/L0.commit", L0_SHA),
    "zfile/L0.commit.zstd.zf": zfile_of("commit/L0.commit", L0_SHA),
    "zfile/L1.commit.z_lz4.tar": image("zfile/L0.commit.z_lz4", sha=L01_SHA),
}


# -- README "Files" table --------------------------------------------------------------------

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PREFIX = re.compile(r"^([0-9a-f]{8,})…$")


def _split(cell: str) -> list[str]:
    return [c.strip().strip("`") for c in cell.split(" / ")]


def readme_files(vectors: Path) -> dict[str, tuple[int | None, str | None]]:
    """{path: (size, sha256 or its prefix)} from the README's "Files" table.

    A cell "a.data / .index" lists two files; size/sha cells then split the same way. Sizes
    like "67112960 (sparse, ...)" keep the number; "(decompressed = ...)" rows have no sha.
    """
    text = (vectors / "README.md").read_text()
    table = text.split("Files (sha256", 1)[1]
    out: dict[str, tuple[int | None, str | None]] = {}
    for line in table.splitlines()[1:]:
        if not line.startswith("|"):
            if out:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("file", "---") or set(cells[0]) <= {"-", " "}:
            continue
        names, sizes, shas = _split(cells[0]), _split(cells[1]), _split(cells[2])
        first = names[0]
        for i, name in enumerate(names):
            if name.startswith("."):
                name = first.rsplit(".", 1)[0] + name
            size_m = re.match(r"\d+", sizes[i] if i < len(sizes) else "")
            sha = shas[i] if i < len(shas) else ""
            if not (_HEX64.match(sha) or _PREFIX.match(sha)):
                sha = ""
            out[name] = (int(size_m.group()) if size_m else None, sha.rstrip("…") or None)
    return out


def _all_vector_files() -> list[str]:
    if not VECTORS.is_dir():
        return []
    return sorted(str(p.relative_to(VECTORS)) for p in VECTORS.rglob("*") if p.is_file())


@pytest.mark.parametrize("rel", _all_vector_files())
def test_vector_file(vectors: Path, tmp_path: Path, rel: str) -> None:
    path = vectors / rel
    assert rel in CASES, f"no reader registered for vector file {rel}: add it to CASES"
    size, sha = readme_files(vectors).get(rel, (None, None))
    if size is not None:
        assert path.stat().st_size == size
    if sha is not None:
        assert file_sha256(path).startswith(sha)
    CASES[rel](path, vectors, tmp_path)
