"""The ZFile reader's one-call block read for sources that name a descriptor (`fd_span`).

Tar payloads of local files and registry blobs with verified cache pages offer `fd_span(offset, length)
-> (fd, file offset) | None`; full-block reads then go through the C helper (pread + CRC + decompress).
The block CRC is what makes that safe: a descriptor whose bytes are wrong (a cache page changed under the
read) must fall back to the source's own pread_into and still return the right bytes.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from overlaybd.format import zfile
from overlaybd.format.fileio import LocalFile
from overlaybd.format.zfile.codec import ACCEL

BS = 4096


def _zfile(tmp_path: Path) -> tuple[bytes, Path]:
    rnd = random.Random(7)
    data = b"".join(rnd.choice([bytes(BS), rnd.randbytes(BS), b"ab" * (BS // 2)]) for _ in range(64))
    src = tmp_path / "raw"
    src.write_bytes(data)
    out = tmp_path / "z"
    with LocalFile(str(src)) as f, open(out, "wb") as o:
        zfile.compress(f, o, algorithm="lz4", block_size=BS, verify=True, threads=1)
    return data, out


class SpanSource:
    """A RandomAccessFile reading `good`, whose fd_span names a descriptor of `span_path` (maybe damaged)."""

    def __init__(self, good: Path, span_path: Path) -> None:
        self.good = LocalFile(str(good))
        self.name = self.good.name
        self.span_fd = os.open(span_path, os.O_RDONLY)
        self.spans = 0

    def size(self) -> int:
        return self.good.size()

    def pread_into(self, buf: memoryview, offset: int) -> int:
        return self.good.pread_into(buf, offset)

    def pread(self, size: int, offset: int) -> bytes:
        return self.good.pread(size, offset)

    def fd_span(self, offset: int, length: int) -> tuple[int, int] | None:
        self.spans += 1
        return (self.span_fd, offset)

    def close(self) -> None:
        os.close(self.span_fd)
        self.good.close()


@pytest.mark.skipif(ACCEL is None, reason="the optional C helper is not built (pure-Python install)")
@pytest.mark.parametrize("damage", [False, True])
def test_span_reads_are_right_and_damage_falls_back(tmp_path: Path, damage: bool) -> None:
    data, zpath = _zfile(tmp_path)
    span_copy = tmp_path / "span"
    blob = bytearray(zpath.read_bytes())
    if damage:  # what a cache page replaced under the read would look like: every stored block wrong
        for i in range(512, len(blob) - 512, 97):
            blob[i] ^= 0x5A
    span_copy.write_bytes(blob)
    src = SpanSource(zpath, span_copy)
    try:
        reader = zfile.open_zfile(src)
        buf = bytearray(BS)
        for k in random.Random(1).sample(range(63), 40):  # full blocks, not the last one
            assert reader.pread_into(memoryview(buf), k * BS) == BS
            assert bytes(buf) == data[k * BS : (k + 1) * BS], f"block {k}"
        assert src.spans >= 40  # the span path was taken for each full-block read
        part = bytearray(100)  # a partial read takes the general path
        assert reader.pread_into(memoryview(part), 5 * BS + 7) == 100
        assert bytes(part) == data[5 * BS + 7 : 5 * BS + 107]
    finally:
        src.close()


def test_local_file_and_tar_payload_name_their_descriptor(tmp_path: Path) -> None:
    from overlaybd.format.tarwrap import TarPayload

    p = tmp_path / "f"
    p.write_bytes(bytes(10000))
    with LocalFile(str(p)) as f:
        assert f.fd_span(100, 50) == (f.fd, 100)
        payload = TarPayload(f, 512, 4096)
        assert payload.fd_span(8, 100) == (f.fd, 520)
        assert payload.fd_span(4000, 200) is None  # past the payload
