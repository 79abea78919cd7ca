"""Tar wrapper: upstream's layout read and written byte for byte (spec §2.7)."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from overlaybd.format.atomic import AtomicOutput
from overlaybd.format.errors import FormatError, Truncated
from overlaybd.format.fileio import LocalFile
from overlaybd.format.opener import unwrap
from overlaybd.format.tarwrap import (
    HEADERS_SIZE,
    TarWrapWriter,
    build_headers,
    open_tar,
    pax_record,
)
from overlaybd.format.zfile import ZFileBuilder, ZFileReader, decompress

VECTOR = "zfile/L1.commit.z_lz4.tar"
PAYLOAD_OFFSET, PAYLOAD_SIZE = 1536, 6540  # of the vector


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: memoryview) -> None:
        self.data += b


def write_tar(path: Path, payload_writer) -> None:
    with AtomicOutput(path) as out:
        tw = TarWrapWriter(out)
        payload_writer(tw)
        tw.close()


def test_vector_opens(vectors: Path) -> None:
    with LocalFile(vectors / VECTOR) as f:
        p = open_tar(f)
        assert p is not None
        assert (p.offset, p.size()) == (PAYLOAD_OFFSET, PAYLOAD_SIZE)
        assert p.pread(8, 0) == b"ZFile\x00\x01\x00"
        assert p.pread(100, PAYLOAD_SIZE - 10) == (vectors / VECTOR).read_bytes()[1536 + 6530 : 1536 + 6540]


def test_vector_unwraps_to_l1_commit(vectors: Path) -> None:
    with unwrap(LocalFile(vectors / VECTOR)) as z:
        assert isinstance(z, ZFileReader)
        sink = Sink()
        decompress(z, sink)
    assert bytes(sink.data) == (vectors / "commit/L1.commit").read_bytes()


def test_headers_byte_identical_to_vector(vectors: Path) -> None:
    assert build_headers(PAYLOAD_SIZE) == (vectors / VECTOR).read_bytes()[:HEADERS_SIZE]


def test_rewrap_vector_payload_byte_identical(vectors: Path, tmp_path: Path) -> None:
    ref = (vectors / VECTOR).read_bytes()
    payload = ref[PAYLOAD_OFFSET : PAYLOAD_OFFSET + PAYLOAD_SIZE]
    out = tmp_path / "o.tar"
    write_tar(out, lambda tw: (tw.write(payload[:100]), tw.write(payload[100:])))
    assert out.read_bytes() == ref


def test_zstd_zfile_pipeline_layout(vectors: Path, tmp_path: Path) -> None:
    """commit -z -t shape: ZFile (header overwritten via pwrite) streamed into the tar writer."""
    l1 = (vectors / "commit/L1.commit").read_bytes()
    out = tmp_path / "l1.zstd.tar"

    def payload(tw: TarWrapWriter) -> None:
        with ZFileBuilder(tw, algorithm="zstd", overwrite_header=True) as zb:
            zb.write(l1)

    write_tar(out, payload)
    mine, ref = out.read_bytes(), (vectors / VECTOR).read_bytes()
    p = open_tar(LocalFile(out))
    assert p is not None and p.offset == 1536
    size = p.size()
    p.close()
    assert len(mine) == -(-(HEADERS_SIZE + size) // 512) * 512 + 1024
    assert mine[HEADERS_SIZE + size :] == bytes(len(mine) - HEADERS_SIZE - size)
    # ustar header: identical (its size field is 0 and mtime 0, so nothing depends on the payload)
    assert mine[1024:1536] == ref[1024:1536]
    # pax header: identical except the record-length (size) field and checksum
    mask = list(range(124, 136)) + list(range(148, 156))

    def unmasked(block: bytes) -> list[int]:
        return [b for i, b in enumerate(block) if i not in mask]

    assert unmasked(mine[:512]) == unmasked(ref[:512])
    assert mine[512:1024] == pax_record("size", str(size)).ljust(512, b"\0")
    # payload is the ZFile with the overwritten header
    assert mine[HEADERS_SIZE + 32] == 0x1B
    with unwrap(LocalFile(out)) as z:
        assert isinstance(z, ZFileReader) and z.algorithm == "zstd"
        assert z.pread(len(l1), 0) == l1


def test_standard_tar_tools_read_our_output(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 41 + b"tail"
    out = tmp_path / "p.tar"
    write_tar(out, lambda tw: tw.write(payload))
    with tarfile.open(out) as tf:
        (member,) = tf.getmembers()
        assert member.name == "overlaybd.commit" and member.size == len(payload)
        assert (member.uid, member.gid, member.mtime, member.mode & 0o7777) == (0, 0, 0, 0o644)
        assert tf.extractfile(member).read() == payload
    listing = subprocess.run(["tar", "-tvf", str(out)], check=True, capture_output=True, text=True).stdout
    assert "overlaybd.commit" in listing and str(len(payload)) in listing


def test_pwrite_targets_payload(tmp_path: Path) -> None:
    out = tmp_path / "pw.tar"

    def body(tw: TarWrapWriter) -> None:
        tw.write(b"a" * 1000)
        tw.pwrite(b"XY", 10)
        with pytest.raises(ValueError):
            tw.pwrite(b"Z", 1000)
        assert tw.tell() == 1000

    write_tar(out, body)
    p = open_tar(LocalFile(out))
    assert p is not None
    assert p.pread(1000, 0) == b"a" * 10 + b"XY" + b"a" * 988


def test_placeholder_is_not_a_tar_until_closed(tmp_path: Path) -> None:
    buf = io.BytesIO()

    class Out:
        def write(self, d: bytes) -> None:
            buf.write(d)

        def pwrite(self, d: bytes, off: int) -> None:
            pos = buf.tell()
            buf.seek(off)
            buf.write(d)
            buf.seek(pos)

    tw = TarWrapWriter(Out())
    tw.write(b"x" * 700)
    partial = tmp_path / "partial.tar"
    partial.write_bytes(buf.getvalue())
    assert b"xxtar" in buf.getvalue()[:512]
    assert open_tar(LocalFile(partial)) is None
    tw.close()
    done = tmp_path / "done.tar"
    done.write_bytes(buf.getvalue())
    assert open_tar(LocalFile(done)) is not None


@pytest.mark.parametrize("name", ["commit/L0.commit", "zfile/L0.commit.lz4.zf", "rw/S0.index"])
def test_non_tar_is_none(vectors: Path, name: str) -> None:
    assert open_tar(LocalFile(vectors / name)) is None


def test_bad_checksum_is_not_a_tar(vectors: Path, tmp_path: Path) -> None:
    d = bytearray((vectors / VECTOR).read_bytes())
    d[20] = 1
    (tmp_path / "c.tar").write_bytes(bytes(d))
    assert open_tar(LocalFile(tmp_path / "c.tar")) is None


def test_payload_past_eof(vectors: Path, tmp_path: Path) -> None:
    p = tmp_path / "short.tar"
    p.write_bytes((vectors / VECTOR).read_bytes()[:5000])
    with pytest.raises(Truncated) as e:
        open_tar(LocalFile(p))
    assert e.value.path == str(p) and e.value.field == "tar size"


def _with_pax_block(record: bytes, size_field: int | None = None) -> bytes:
    hdrs = bytearray(build_headers(10))
    hdrs[512:1024] = record.ljust(512, b"\0")
    hdrs[124:136] = b"%11o " % (len(record) if size_field is None else size_field)
    hdrs[148:156] = b" " * 8
    hdrs[148:156] = b"%6o \0" % sum(hdrs[:512])
    return bytes(hdrs) + bytes(1024)


@pytest.mark.parametrize(
    "record,size_field,field",
    [
        (b"13 size=6540\n", 100_000, "pax header size"),
        (b"99 size=6540\n", None, "pax record"),
        (b"13 size=65x0\n", None, "pax size"),
        (b"xx size=6540\n", None, "pax record"),
    ],
)
def test_bad_pax(tmp_path: Path, record: bytes, size_field: int | None, field: str) -> None:
    p = tmp_path / "bad.tar"
    p.write_bytes(_with_pax_block(record, size_field))
    with pytest.raises(FormatError) as e:
        open_tar(LocalFile(p))
    assert e.value.path == str(p) and e.value.field == field


def test_plain_ustar_without_pax(tmp_path: Path) -> None:
    """A payload in an ordinary single-member tar (no pax header) starts at 512 (upstream reader rule)."""
    payload = b"hello" * 300
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("overlaybd.commit")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    (tmp_path / "u.tar").write_bytes(buf.getvalue())
    p = open_tar(LocalFile(tmp_path / "u.tar"))
    assert p is not None and p.offset == 512 and p.pread(10_000, 0) == payload


def test_pax_record_length_counts_itself() -> None:
    assert pax_record("size", "6540") == b"13 size=6540\n"
    assert pax_record("size", "1") == b"9 size=1\n"
    assert pax_record("size", "1234567") == b"16 size=1234567\n"
    rec = pax_record("size", "9" * 90)
    assert int(rec.split(b" ")[0]) == len(rec)


def test_tar_file_hash(vectors: Path) -> None:
    digest = hashlib.sha256((vectors / VECTOR).read_bytes()).hexdigest()
    assert digest == "4dddc591af73b934d5021680f58424d920d5a7e3964b778d3c2feb4dd218e489"
