"""Index algorithms against naive per-sector models (hypothesis), and corruption fuzzing."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from overlaybd.format import lsmt
from overlaybd.format.errors import FormatError
from overlaybd.format.fileio import LocalFile
from overlaybd.format.lsmt.index0 import Index0
from overlaybd.format.lsmt.mapping import Columns, merge_columns

SPAN = 256  # sectors covered by generated indexes

ops = st.lists(
    st.tuples(st.integers(0, SPAN - 1), st.integers(1, 48), st.integers(8, 10_000), st.booleans()), max_size=40
)


def expand(mappings: list[lsmt.Mapping]) -> dict[int, tuple]:
    """Per-sector meaning of an index: (tag, file sector) or (tag, 'zero')."""
    out: dict[int, tuple] = {}
    prev_end = -1
    for m in mappings:
        assert m.length > 0 and m.offset >= prev_end  # sorted, non-overlapping, no empties
        prev_end = m.end
        for k in range(m.length):
            out[m.offset + k] = (m.tag, "zero") if m.zeroed else (m.tag, m.moffset + k)
    return out


@settings(max_examples=150, deadline=None)
@given(ops)
def test_index0_insert_is_last_write_wins(operations) -> None:
    idx = Index0()
    model: dict[int, tuple] = {}
    for off, n, moff, zeroed in operations:
        idx.insert(off, n, moff, zeroed)
        for k in range(n):
            model[off + k] = (0, "zero") if zeroed else (0, moff + k)
    assert expand(idx.dump()) == model


def layer_index(draw_ops) -> list[lsmt.Mapping]:
    idx = Index0()
    for off, n, moff, zeroed in draw_ops:
        idx.insert(off, n, moff, zeroed)
    return idx.dump()


@settings(max_examples=100, deadline=None)
@given(st.lists(ops, min_size=1, max_size=5))
def test_merge_topmost_wins(layers_ops) -> None:
    top_down = [layer_index(o) for o in layers_ops]
    merged = merge_columns([Columns.from_mappings(x) for x in top_down]).to_mappings()
    model: dict[int, tuple] = {}
    for level in reversed(range(len(top_down))):  # paint bottom first, upper layers overwrite
        for sec, (_tag, where) in expand(top_down[level]).items():
            model[sec] = (level, where)
    assert expand(merged) == model
    assert lsmt.merge_indexes(top_down) == merged


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            # header struct, index records (8 real ones + padding), trailer struct, anywhere
            st.one_of(
                st.integers(0, 389),
                st.integers(1_114_624, 1_114_880),
                st.integers(1_118_720, 1_119_109),
                st.integers(0, 1_122_815),
            ),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_corrupted_commit_fails_cleanly(tmp_path_factory, vectors: Path, edits) -> None:
    """Random byte corruption either still opens (and reads) or raises a FormatError."""
    raw = bytearray((vectors / "commit/L0.commit").read_bytes())
    size = len(raw)
    for pos, value in edits:
        raw[pos % size] = value
    path = tmp_path_factory.mktemp("fuzz") / "c"
    path.write_bytes(bytes(raw))
    try:
        layer = lsmt.open_ro(LocalFile(path))
    except FormatError as e:
        assert e.path == str(path) and e.field
        return
    with layer:
        buf = memoryview(bytearray(1 << 20))
        for off in range(0, min(layer.vsize, 64 << 20), 1 << 20):
            layer.pread_into(buf, off)
