"""Opening layer blobs in upstream's order: tar -> ZFile -> LSMT."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from overlaybd.format.atomic import AtomicOutput
from overlaybd.format.errors import BadChecksum
from overlaybd.format.fileio import LocalFile
from overlaybd.format.opener import open_layer, unwrap
from overlaybd.format.tarwrap import TarPayload, TarWrapWriter
from overlaybd.format.zfile import ZFileBuilder, ZFileReader

L0_IMAGE_SHA = "d42a6fb743ce3e3eebdf0ad2560c98de47252c0f4d3a2b561509c34f82728892"
L0_BLOBS = [
    "commit/L0.commit",
    "zfile/L0.commit.lz4.zf",
    "zfile/L0.commit.zstd.zf",
    "zfile/L0.commit.lz4bs64.zf",
    "zfile/L0.commit.lz4.nocrc.zf",
    "zfile/L0.commit.zstd.nocrc.zf",
    "zfile/L0.commit.z_lz4",
    "zfile/L0.commit.z_zstd64",
]


def _have_lsmt() -> bool:
    try:
        from overlaybd.format.lsmt import open_ro  # noqa: F401
    except ImportError:
        return False
    return True


needs_lsmt = pytest.mark.skipif(not _have_lsmt(), reason="overlaybd.format.lsmt.open_ro not available yet")


def test_plain_file_is_returned_as_is(vectors: Path) -> None:
    f = LocalFile(vectors / "commit/L0.commit")
    assert unwrap(f) is f
    f.close()


@pytest.mark.parametrize("name", L0_BLOBS[1:])
def test_zfile_unwraps_to_commit(vectors: Path, name: str) -> None:
    ref = (vectors / "commit/L0.commit").read_bytes()
    with unwrap(LocalFile(vectors / name)) as f:
        assert isinstance(f, ZFileReader)
        assert f.size() == len(ref)
        assert f.pread(len(ref), 0) == ref


def test_tar_around_zfile(vectors: Path) -> None:
    with unwrap(LocalFile(vectors / "zfile/L1.commit.z_lz4.tar")) as f:
        assert isinstance(f, ZFileReader) and isinstance(f._f, TarPayload)
        assert f.pread(f.size(), 0) == (vectors / "commit/L1.commit").read_bytes()


def _tar_of(path: Path, payload: bytes, zfile: bool) -> Path:
    with AtomicOutput(path) as out:
        tw = TarWrapWriter(out)
        if zfile:
            with ZFileBuilder(tw, algorithm="zstd", overwrite_header=True) as zb:
                zb.write(payload)
        else:
            tw.write(payload)
        tw.close()
    return path


def test_tar_around_plain_layer(vectors: Path, tmp_path: Path) -> None:
    ref = (vectors / "commit/L1.commit").read_bytes()
    with unwrap(LocalFile(_tar_of(tmp_path / "p.tar", ref, zfile=False))) as f:
        assert isinstance(f, TarPayload)
        assert f.pread(len(ref) + 100, 0) == ref


def test_zfile_around_tar_is_not_peeled_twice(vectors: Path, tmp_path: Path) -> None:
    """Upstream order is tar then ZFile; a tar inside a ZFile stays a tar (as upstream)."""
    inner = _tar_of(tmp_path / "inner.tar", (vectors / "commit/L1.commit").read_bytes(), zfile=False).read_bytes()
    with AtomicOutput(tmp_path / "outer.zf") as out, ZFileBuilder(out, algorithm="lz4") as zb:
        zb.write(inner)
    with unwrap(LocalFile(tmp_path / "outer.zf")) as f:
        assert isinstance(f, ZFileReader)
        assert f.pread(len(inner), 0) == inner


def _image_sha(layer) -> str:
    h = hashlib.sha256()
    buf = memoryview(bytearray(4 << 20))
    pos = 0
    while pos < layer.vsize:
        n = layer.pread_into(buf[: min(len(buf), layer.vsize - pos)], pos)
        assert n > 0
        h.update(buf[:n])
        pos += n
    return h.hexdigest()


@needs_lsmt
@pytest.mark.parametrize("name", L0_BLOBS)
def test_open_layer_l0_image_hash(vectors: Path, name: str) -> None:
    with open_layer(LocalFile(vectors / name)) as layer:
        assert layer.vsize == 64 << 20
        assert _image_sha(layer) == L0_IMAGE_SHA


@needs_lsmt
def test_open_layer_tar_equals_plain(vectors: Path) -> None:
    with (
        open_layer(LocalFile(vectors / "commit/L1.commit")) as plain,
        open_layer(LocalFile(vectors / "zfile/L1.commit.z_lz4.tar")) as wrapped,
    ):
        assert plain.vsize == wrapped.vsize
        assert _image_sha(plain) == _image_sha(wrapped)


def test_damaged_zfile_reports_zfile_error(vectors: Path, tmp_path: Path) -> None:
    data = bytearray((vectors / "zfile/L0.commit.lz4.zf").read_bytes())
    data[300] ^= 1  # inside the header block: digest no longer matches
    p = tmp_path / "d.zf"
    p.write_bytes(bytes(data))
    with pytest.raises(BadChecksum) as e:
        unwrap(LocalFile(p))
    assert e.value.path == str(p) and e.value.field == "header.digest"
