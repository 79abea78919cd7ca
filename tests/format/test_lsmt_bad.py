"""Corrupt and hostile LSMT files: every case fails with the specific error naming file and field."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from overlaybd.format import lsmt
from overlaybd.format.errors import BadIndex, BadMagic, FormatError, Truncated
from overlaybd.format.fileio import LocalFile

T_FLAGS, T_IOFF, T_ISIZE = 28, 32, 40  # field offsets inside the 4096-byte header/trailer


def corrupt(src: Path, dst: Path, edit: Callable[[bytearray], object]) -> Path:
    buf = bytearray(src.read_bytes())
    edit(buf)
    dst.write_bytes(bytes(buf))
    return dst


def put(buf: bytearray, pos: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, buf, pos, value)


def trailer_pos(buf: bytearray) -> int:
    return len(buf) - 4096


def index_pos(buf: bytearray) -> int:
    return struct.unpack_from("<Q", buf, trailer_pos(buf) + T_IOFF)[0]


def set_record(buf: bytearray, k: int, m: lsmt.Mapping) -> None:
    pos = index_pos(buf) + 16 * k
    buf[pos : pos + 16] = m.pack()


def get_record(buf: bytearray, k: int) -> lsmt.Mapping:
    return lsmt.Mapping.unpack(buf, index_pos(buf) + 16 * k)


def _overlap(b: bytearray) -> None:
    set_record(b, 1, get_record(b, 1)._replace(offset=get_record(b, 0).offset + 1))


def _unsorted(b: bytearray) -> None:
    first, second = get_record(b, 0), get_record(b, 1)
    set_record(b, 0, second)
    set_record(b, 1, first)


def _moffset_beyond(b: bytearray) -> None:
    set_record(b, 0, get_record(b, 0)._replace(moffset=index_pos(b) // 512))


def _moffset_in_header(b: bytearray) -> None:
    set_record(b, 0, get_record(b, 0)._replace(moffset=3))


RO_CASES = {
    "header.magic0": (lambda b: b.__setitem__(0, 0x4D), BadMagic),
    "header.magic1": (lambda b: b.__setitem__(8, 0), BadMagic),
    "trailer.magic0": (lambda b: b.__setitem__(trailer_pos(b), 0), BadMagic),
    "header.flags": (lambda b: put(b, T_FLAGS, "<I", 0x05), BadMagic),  # not a data file
    "trailer.flags": (lambda b: put(b, trailer_pos(b) + T_FLAGS, "<I", 0x02), BadMagic),  # not sealed
    "trailer.index_size": (lambda b: put(b, trailer_pos(b) + T_ISIZE, "<Q", 10**15), BadIndex),  # absurd
    "trailer.index_offset": (lambda b: put(b, trailer_pos(b) + T_IOFF, "<Q", 512), BadIndex),
    "index[1].offset": (_overlap, BadIndex),
    "index[0].moffset": (_moffset_beyond, BadIndex),
}


@pytest.mark.parametrize("field", sorted(RO_CASES))
def test_ro_corruption(vectors: Path, tmp_path: Path, field: str) -> None:
    edit, exc = RO_CASES[field]
    bad = corrupt(vectors / "commit/L0.commit", tmp_path / "bad.commit", edit)
    with pytest.raises(exc) as e:
        lsmt.open_ro(LocalFile(bad))
    assert e.value.path == str(bad)
    assert e.value.field == field
    assert str(bad) in str(e.value)


@pytest.mark.parametrize(
    ("edit", "field"),
    [(_unsorted, "index[1].offset"), (_moffset_in_header, "index[0].moffset")],
)
def test_ro_index_order_and_range(vectors: Path, tmp_path: Path, edit, field: str) -> None:
    bad = corrupt(vectors / "commit/L0.commit", tmp_path / "bad.commit", edit)
    with pytest.raises(BadIndex) as e:
        lsmt.open_ro(LocalFile(bad))
    assert e.value.field == field


def test_ro_index_size_larger_than_file(vectors: Path, tmp_path: Path) -> None:
    # within the 1,000,000 cap but more records than the file holds: checked before any allocation
    src = vectors / "commit/L0.commit"
    bad = corrupt(src, tmp_path / "b", lambda b: put(b, trailer_pos(b) + T_ISIZE, "<Q", 999_999))
    with pytest.raises(Truncated) as e:
        lsmt.open_ro(LocalFile(bad))
    assert e.value.field == "trailer.index_size"
    bad = corrupt(src, tmp_path / "c", lambda b: put(b, trailer_pos(b) + T_IOFF, "<Q", 2**62))
    with pytest.raises(Truncated) as e:
        lsmt.open_ro(LocalFile(bad))
    assert e.value.field == "trailer.index_offset"


def test_ro_truncated_files(vectors: Path, tmp_path: Path) -> None:
    src = (vectors / "commit/L0.commit").read_bytes()
    cases = [(0, Truncated, "size"), (3000, Truncated, "size"), (5000, Truncated, "size")]
    cases.append((len(src) - 100, BadMagic, "trailer.magic0"))
    for n, exc, field in cases:
        p = tmp_path / f"t{n}"
        p.write_bytes(src[:n])
        with pytest.raises(exc) as e:
            lsmt.open_ro(LocalFile(p))
        assert e.value.field == field and e.value.path == str(p)


def test_ro_rejects_rw_files(vectors: Path) -> None:
    with pytest.raises(BadMagic) as e:
        lsmt.open_ro(LocalFile(vectors / "rw/L0.data"))  # no trailer
    assert e.value.field == "trailer.magic0" and "not sealed" in str(e.value)
    with pytest.raises(BadMagic) as e:
        lsmt.open_ro(LocalFile(vectors / "rw/L0.index"))
    assert e.value.field == "header.flags" and "index file" in str(e.value)


def copy_rw(vectors: Path, tmp_path: Path, name: str = "L0") -> tuple[Path, Path]:
    d, i = tmp_path / f"{name}.data", tmp_path / f"{name}.index"
    d.write_bytes((vectors / "rw" / f"{name}.data").read_bytes())
    i.write_bytes((vectors / "rw" / f"{name}.index").read_bytes())
    return d, i


def test_rw_index_record_outside_data(vectors: Path, tmp_path: Path) -> None:
    d, i = copy_rw(vectors, tmp_path)
    raw = bytearray(i.read_bytes())
    rec = lsmt.Mapping.unpack(raw, 4096 + 16 * 2)._replace(moffset=d.stat().st_size // 512)
    raw[4096 + 32 : 4096 + 48] = rec.pack()
    i.write_bytes(bytes(raw))
    with pytest.raises(BadIndex) as e:
        lsmt.open_rw(d, i)
    assert e.value.field == "record[2].moffset" and e.value.path == str(i)


def test_rw_header_problems(vectors: Path, tmp_path: Path) -> None:
    d, i = copy_rw(vectors, tmp_path)
    good_index = i.read_bytes()
    # index header with index_offset != 4096
    raw = bytearray(good_index)
    put(raw, T_IOFF, "<Q", 8192)
    i.write_bytes(bytes(raw))
    with pytest.raises(BadIndex) as e:
        lsmt.open_rw(d, i)
    assert e.value.field == "header.index_offset"
    # data file given as index file
    with pytest.raises(BadMagic) as e:
        lsmt.open_rw(d, d)
    assert e.value.field == "header.flags" and e.value.path == str(d)
    # committed layer given as RW data file
    with pytest.raises(BadMagic) as e:
        lsmt.open_rw(vectors / "commit/L0.commit", vectors / "rw/L0.index", readonly=True)
    assert e.value.field == "header.flags"
    # truncated / garbage headers
    i.write_bytes(good_index[:100])
    with pytest.raises(Truncated):
        lsmt.open_rw(d, i)
    i.write_bytes(bytes(4096))
    with pytest.raises(BadMagic) as e:
        lsmt.open_rw(d, i)
    assert e.value.field == "header.magic0" and e.value.path == str(i)
    with pytest.raises(FormatError) as e:
        lsmt.open_rw(tmp_path / "missing.data", i)
    assert e.value.path == str(tmp_path / "missing.data")


def test_rw_partial_trailing_record_is_ignored(vectors: Path, tmp_path: Path) -> None:
    d, i = copy_rw(vectors, tmp_path)
    with lsmt.open_rw(d, i, readonly=True) as layer:
        want = layer.mappings()
    with open(i, "ab") as f:
        f.write(b"\x01" * 7)  # a torn append
    with lsmt.open_rw(d, i, readonly=True) as layer:
        assert layer.mappings() == want


def test_seal_refuses_sparse(vectors: Path, tmp_path: Path) -> None:
    d, i = tmp_path / "d", tmp_path / "i"
    lsmt.create_rw(d, i, 1 << 20, sparse=True).close()
    with pytest.raises(FormatError) as e:
        lsmt.seal(d, i)
    assert e.value.field == "header.flags"


def test_header_user_tag_too_long() -> None:
    with pytest.raises(ValueError):
        lsmt.HeaderTrailer(flags=7, user_tag=b"x" * 257).pack()
