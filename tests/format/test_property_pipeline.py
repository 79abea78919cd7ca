"""Property test of the whole layer pipeline against an in-memory model disk.

Random writes/discards go into a writable layer (append-only and sparse). Every stage is
then compared byte-for-byte with the model: the live RW layer, after reopen, committed,
sealed, committed-from-sealed, stacked on a lower (live and reopened), merged with that
lower, and the merged layer as ZFile (lz4 and zstd, optionally tar-wrapped).

Model semantics (spec §1.3/§1.4/§1.7): a write maps data; an append-layer discard is a
zeroed mapping that reads zero and MASKS lower layers; a sparse-layer discard punches a
hole, which after reopen is unmapped and FALLS THROUGH to lower layers. Sparse layers are
exercised with 4 KiB-aligned operations, because reopening a sparse layer maps whole host
file-system blocks (upstream behaviour, spec §1.4).
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from overlaybd.format import lsmt, opener
from overlaybd.format.fileio import LocalFile
from overlaybd.format.tarwrap import TarWrapWriter
from overlaybd.format.zfile import ZFileBuilder

VSIZE = 4 << 20
SECTOR = 512
DATA, ZERO, HOLE = 1, 2, 0  # per-sector state of a layer in the model


class ModelLayer:
    """What a layer contains: bytes plus per-sector state (hole / data / zeroed)."""

    def __init__(self, sparse: bool) -> None:
        self.sparse = sparse
        self.bytes = bytearray(VSIZE)
        self.state = bytearray(VSIZE // SECTOR)

    def write(self, offset: int, data: bytes) -> None:
        self.bytes[offset : offset + len(data)] = data
        s = offset // SECTOR
        self.state[s : s + len(data) // SECTOR] = bytes([DATA]) * (len(data) // SECTOR)

    def discard(self, offset: int, length: int) -> None:
        self.bytes[offset : offset + length] = bytes(length)
        s = offset // SECTOR
        self.state[s : s + length // SECTOR] = bytes([HOLE if self.sparse else ZERO]) * (length // SECTOR)

    def alone(self) -> bytes:
        """The disk this layer shows on its own (holes and zeroed read as zeros)."""
        return bytes(self.bytes)

    def over(self, lower: bytes) -> bytes:
        """The disk of this layer stacked on a lower disk: only holes fall through."""
        out = bytearray(lower)
        for s, st_ in enumerate(self.state):
            if st_ != HOLE:
                out[s * SECTOR : (s + 1) * SECTOR] = self.bytes[s * SECTOR : (s + 1) * SECTOR]
        return bytes(out)


def payload(rng: random.Random, length: int) -> bytes:
    """Half incompressible, half compressible data so both ZFile paths see real blocks."""
    if rng.random() < 0.5:
        return rng.randbytes(length)
    line = f"obd {rng.randrange(1 << 30)}\n".encode()
    return (line * (length // len(line) + 1))[:length]


def ops_strategy(align_sectors: int):
    units = VSIZE // SECTOR // align_sectors
    op = st.tuples(
        st.sampled_from(["w", "w", "w", "d"]),
        st.integers(0, units - 1),
        st.one_of(st.integers(1, 16), st.integers(1, 512), st.integers(1, units)),
    )
    return st.lists(op, min_size=1, max_size=25)


def apply_ops(layer, model: ModelLayer, ops, align_sectors: int, seed: int) -> None:
    rng = random.Random(seed)
    unit = align_sectors * SECTOR
    for kind, start, count in ops:
        offset = start * unit
        length = min(count * unit, VSIZE - offset)
        if kind == "w":
            data = payload(rng, length)
            layer.pwrite(data, offset)
            model.write(offset, data)
        else:
            layer.discard(offset, length)
            model.discard(offset, length)


def read_all(f) -> bytes:
    buf = bytearray(f.size())
    n = f.pread_into(memoryview(buf), 0)
    assert n == len(buf)
    return bytes(buf)


def first_diff(a: bytes, b: bytes) -> str:
    for i in range(0, len(a), SECTOR):
        if a[i : i + SECTOR] != b[i : i + SECTOR]:
            return f"first differing sector {i // SECTOR}"
    return "lengths differ" if len(a) != len(b) else "equal"


def check(stage: str, got: bytes, want: bytes) -> None:
    assert len(got) == len(want), f"{stage}: size {len(got)} != {len(want)}"
    assert got == want, f"{stage}: {first_diff(got, want)}"


def open_layer_file(path: Path):
    return opener.open_layer(LocalFile(path))


def commit_to(path: Path, source) -> None:
    with open(path, "wb") as f:
        lsmt.commit(source, f)


def make_lower(tmp: Path, ops, seed: int) -> tuple[Path, bytes]:
    """A committed append layer built from random ops; returns its path and disk."""
    model = ModelLayer(sparse=False)
    d, i = tmp / "lower.data", tmp / "lower.index"
    with lsmt.create_rw(d, i, VSIZE) as layer:
        apply_ops(layer, model, ops, 1, seed)
    path = tmp / "lower.commit"
    with lsmt.open_rw(d, i, readonly=True) as rw:
        commit_to(path, rw)
    return path, model.alone()


def zfile_bytes(src: Path, algorithm: str, tar: bool) -> bytes:
    raw = src.read_bytes()
    buf = _BytesSink()
    sink = TarWrapWriter(buf) if tar else buf
    b = ZFileBuilder(sink, algorithm=algorithm, block_size=4096, verify=True, overwrite_header=True, threads=1)
    b.write(raw)
    b.close()
    if tar:
        sink.close()
    return buf.getvalue()


class _BytesSink(io.BytesIO):
    def pwrite(self, data, offset: int) -> int:
        pos = self.tell()
        self.seek(offset)
        n = self.write(data)
        self.seek(pos)
        return n


def run_pipeline(tmp: Path, sparse: bool, upper_ops, lower_ops, seed: int) -> None:
    for p in tmp.iterdir():
        p.unlink()
    align = 8 if sparse else 1
    data, index = tmp / "up.data", tmp / "up.index"
    model = ModelLayer(sparse)

    # 1. live writable layer
    with lsmt.create_rw(data, index, VSIZE, sparse=sparse) as rw:
        apply_ops(rw, model, upper_ops, align, seed)
        rw.fsync()
        check("rw live", read_all(rw), model.alone())

    # 2. reopened
    with lsmt.open_rw(data, index, readonly=True) as rw:
        check("rw reopened", read_all(rw), model.alone())
        commit_to(tmp / "up.commit", rw)
    with open_layer_file(tmp / "up.commit") as ro:
        check("committed", read_all(ro), model.alone())

    # 3. stacked on a lower: live RW upper, committed upper, merge
    lower_path, lower_disk = make_lower(tmp, lower_ops, seed + 1)
    want = model.over(lower_disk)
    with lsmt.Stack([open_layer_file(lower_path)], upper=lsmt.open_rw(data, index, readonly=True)) as stack:
        check("stack lower+rw", read_all(stack), want)
    with lsmt.Stack([open_layer_file(lower_path), open_layer_file(tmp / "up.commit")]) as stack:
        check("stack lower+committed", read_all(stack), want)
    layers = [open_layer_file(lower_path), open_layer_file(tmp / "up.commit")]
    with open(tmp / "merged", "wb") as f:
        lsmt.merge(layers, f)
    for la in layers:
        la.close()
    with open_layer_file(tmp / "merged") as ro:
        check("merged", read_all(ro), want)

    # 4. ZFile of the merged layer (lz4 and zstd; tar-wrapped too)
    for algorithm, tar in (("lz4", False), ("zstd", True)):
        zpath = tmp / f"merged.{algorithm}"
        zpath.write_bytes(zfile_bytes(tmp / "merged", algorithm, tar))
        with open_layer_file(zpath) as ro:
            check(f"merged zfile {algorithm} tar={tar}", read_all(ro), want)

    # 5. seal in place, then commit from sealed: same bytes as the direct commit
    if sparse:
        return  # sparse writable layers are not sealed (format.lsmt refuses; their data sits at 4096+offset)
    lsmt.seal(data, index)
    with open_layer_file(data) as sealed:
        check("sealed", read_all(sealed), model.alone())
        commit_to(tmp / "up.commit2", sealed)
    assert (tmp / "up.commit2").read_bytes() == (tmp / "up.commit").read_bytes(), "commit from sealed differs"


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    d = tmp_path / "p"
    d.mkdir()
    return d


@settings(max_examples=int(os.environ.get("OBD_PROPERTY_EXAMPLES", "50")), **SETTINGS)
@given(upper=ops_strategy(1), lower=ops_strategy(1), seed=st.integers(0, 2**32))
def test_pipeline_append(scratch: Path, upper, lower, seed: int) -> None:
    run_pipeline(scratch, False, upper, lower, seed)


@settings(max_examples=int(os.environ.get("OBD_PROPERTY_EXAMPLES", "50")), **SETTINGS)
@given(upper=ops_strategy(8), lower=ops_strategy(1), seed=st.integers(0, 2**32))
def test_pipeline_sparse(scratch: Path, upper, lower, seed: int) -> None:
    run_pipeline(scratch, True, upper, lower, seed)


@pytest.mark.slow
@settings(max_examples=300, **SETTINGS)
@given(sparse=st.booleans(), upper=ops_strategy(8), lower=ops_strategy(1), seed=st.integers(0, 2**32))
def test_pipeline_long(scratch: Path, sparse: bool, upper, lower, seed: int) -> None:
    run_pipeline(scratch, sparse, upper, lower, seed)
