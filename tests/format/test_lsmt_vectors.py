"""LSMT layers against the upstream-made vectors: logical hashes and byte-identical outputs."""

from __future__ import annotations

import bisect
import io
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.vectors import logical_sha256
from overlaybd.format import lsmt
from overlaybd.format.fileio import LocalFile

L0_SHA = "d42a6fb743ce3e3eebdf0ad2560c98de47252c0f4d3a2b561509c34f82728892"
L01_SHA = "7d136d857b79c2979f663ea122311b599c9df0fa25a468f99d97fe6677c6eafa"
VSIZE = 64 << 20
UUID = "0f5e3a10-0000-4000-8000-0000000000"


def ro(path: Path) -> lsmt.ReadOnlyLayer:
    return lsmt.open_ro(LocalFile(path))


def rw(vectors: Path, name: str) -> lsmt.WritableLayer:
    return lsmt.open_rw(vectors / "rw" / f"{name}.data", vectors / "rw" / f"{name}.index", readonly=True)


def committed(source, **kw) -> bytes:
    out = io.BytesIO()
    lsmt.commit(source, out, **kw)
    return out.getvalue()


@pytest.mark.parametrize("rel", ["commit/L0.commit", "commit/S0.commit", "sealed/L0.sealed"])
def test_ro_layer_hash_l0(vectors: Path, rel: str) -> None:
    with ro(vectors / rel) as layer:
        assert layer.vsize == VSIZE
        assert logical_sha256(layer) == L0_SHA


@pytest.mark.parametrize("rel", ["merge/L01.merged", "merge/L01.obdmerge"])
def test_merged_layer_hash(vectors: Path, rel: str) -> None:
    with ro(vectors / rel) as layer:
        assert all(m.tag == 0 for m in layer.mappings)  # tags on disk are 0/1, readers reset them
        assert logical_sha256(layer) == L01_SHA


@pytest.mark.parametrize("name", ["L0", "S0"])
def test_rw_layer_hash_l0(vectors: Path, name: str) -> None:
    with rw(vectors, name) as layer:
        assert layer.vsize == VSIZE
        assert layer.sparse == (name == "S0")
        assert logical_sha256(layer) == L0_SHA


def test_rw_l1_equals_its_commit(vectors: Path) -> None:
    with rw(vectors, "L1") as layer, ro(vectors / "commit/L1.commit") as c:
        assert layer.parent_uuid == (UUID + "c0").upper()
        assert logical_sha256(layer) == logical_sha256(c)


def test_cli_created_empty_layer(vectors: Path) -> None:
    with rw(vectors, "cli-create") as layer:
        assert layer.vsize == 1 << 30
        assert layer.mappings() == []
        assert layer.pread(4096, 12345 * 512) == bytes(4096)


def test_stacks_give_l01(vectors: Path) -> None:
    with lsmt.Stack([ro(vectors / "commit/L0.commit"), ro(vectors / "commit/L1.commit")], check_order=True) as s:
        assert s.read_only and s.vsize == VSIZE
        assert logical_sha256(s) == L01_SHA
    with lsmt.Stack([ro(vectors / "commit/L0.commit")], upper=rw(vectors, "L1"), check_order=True) as s:
        assert logical_sha256(s) == L01_SHA


@pytest.mark.parametrize(
    ("name", "uuid", "tag"),
    [("L0", UUID + "c0", b"vector L0"), ("L1", UUID + "c1", b"vector L1"), ("S0", UUID + "d0", b"")],
)
def test_commit_rw_byte_identical(vectors: Path, name: str, uuid: str, tag: bytes) -> None:
    with rw(vectors, name) as layer:
        got = committed(layer, uuid=uuid, user_tag=tag)
    assert got == (vectors / "commit" / f"{name}.commit").read_bytes()


def test_commit_from_sealed_byte_identical(vectors: Path) -> None:
    with ro(vectors / "sealed/L0.sealed") as layer:
        got = committed(layer, uuid=UUID + "c0", user_tag=b"vector L0")
    assert got == (vectors / "commit/L0.commit").read_bytes()


def test_seal_matches_upstream_except_padding(vectors: Path, tmp_path: Path) -> None:
    data = tmp_path / "L0.sealed"
    subprocess.run(["cp", "--sparse=always", str(vectors / "rw/L0.data"), str(data)], check=True)
    data.chmod(0o644)
    index = tmp_path / "L0.index"
    shutil.copyfile(vectors / "rw/L0.index", index)
    lsmt.seal(data, index)
    got = data.read_bytes()
    want = (vectors / "sealed/L0.sealed").read_bytes()
    assert len(got) == len(want)
    index_offset = (vectors / "rw/L0.data").stat().st_size
    real = 10 * 16  # 10 records; upstream pads to 512 bytes with uninitialised memory
    assert got[: index_offset + real] == want[: index_offset + real]
    assert got[index_offset + real : index_offset + 512] == bytes(512 - real)  # we pad with zeros
    assert got[index_offset + 512 :] == want[index_offset + 512 :]
    with ro(data) as layer:
        assert layer.uuid == (UUID + "a0").upper()
        assert logical_sha256(layer) == L0_SHA
        assert committed(layer, uuid=UUID + "c0", user_tag=b"vector L0") == (vectors / "commit/L0.commit").read_bytes()


def test_merge_byte_identical(vectors: Path) -> None:
    layers = [ro(vectors / "commit/L0.commit"), ro(vectors / "commit/L1.commit")]
    try:
        out = io.BytesIO()
        lsmt.merge(layers, out, uuid=UUID + "ee")
        assert out.getvalue() == (vectors / "merge/L01.merged").read_bytes()
        out = io.BytesIO()
        lsmt.merge(layers, out)
        assert out.getvalue() == (vectors / "merge/L01.obdmerge").read_bytes()
    finally:
        for la in layers:
            la.close()


def test_merged_tags_on_disk_are_layer_from_top(vectors: Path) -> None:
    raw = (vectors / "merge/L01.merged").read_bytes()
    trailer = lsmt.HeaderTrailer.unpack(raw[-4096:], "L01.merged", "trailer")
    recs = list(lsmt.unpack_records(raw[trailer.index_offset : trailer.index_offset + trailer.index_size * 16]))
    real = [m for m in recs if m.offset != lsmt.INVALID_OFFSET]
    assert {m.tag for m in real} == {0, 1}
    assert len(recs) == 256 and trailer.index_size == 256  # padding counted
    with ro(vectors / "commit/L0.commit") as l0, ro(vectors / "commit/L1.commit") as l1:
        merged = lsmt.merge_indexes([l1.mappings, l0.mappings])
    starts = [m.offset for m in merged]
    for rec in real:  # every on-disk record carries the tag of the layer that wins at its offset
        i = bisect.bisect_right(starts, rec.offset) - 1
        assert merged[i].offset <= rec.offset < merged[i].end
        assert (merged[i].tag, merged[i].zeroed) == (rec.tag, rec.zeroed)


@pytest.mark.parametrize(
    "rel", ["rw/L0.data", "rw/L0.index", "rw/S0.data", "commit/L1.commit", "merge/L01.merged", "sealed/L0.sealed"]
)
def test_header_trailer_roundtrip(vectors: Path, rel: str) -> None:
    path = vectors / rel
    with open(path, "rb") as f:
        head = f.read(4096)
        f.seek(-4096, 2)
        tail = f.read(4096)
    assert lsmt.HeaderTrailer.unpack(head, str(path)).pack() == head
    if rel.startswith(("commit", "merge", "sealed")):
        t = lsmt.HeaderTrailer.unpack(tail, str(path), "trailer")
        assert t.flags == 0x06 and t.pack() == tail
