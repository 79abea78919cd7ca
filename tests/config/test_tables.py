"""The settings tables and the frozen dataclasses they fill agree, row for field.

Why: the table is the only place a setting's key, default and doc live, and the dataclass is
what consumers (and mypy) see. This test is what keeps the two from drifting: every field has
a row, every row a field of the matching type, every default passes its own row's checks.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest
from overlaybd.config.image_config import DEVICE
from overlaybd.config.schema import REQUIRED, ConfigError, Setting, Table, parse_section
from overlaybd.config.service import SERVICE
from overlaybd.config.snapshotter import SNAPSHOTTER

ROOTS = {"overlaybd.json": SERVICE, "config.v1.json": DEVICE, "snapshotter config.json": SNAPSHOTTER}
TABLES = [(f"{name}:{t.cls.__name__}", t) for name, root in ROOTS.items() for t in root.subtables()]


def _expected_type(row: Setting) -> Any:
    scalar = {"bool": bool, "int": int, "str": str}
    if row.kind in scalar:
        return scalar[row.kind]
    assert row.table is not None, row.key
    return {
        "section": row.table.cls,
        "optional": row.table.cls | None,
        "sections": tuple[row.table.cls, ...],
    }[row.kind]


@pytest.mark.parametrize("name, table", TABLES, ids=[n for n, _ in TABLES])
def test_rows_and_fields_agree(name: str, table: Table[Any]) -> None:
    assert dataclasses.is_dataclass(table.cls) and table.cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    fields = {f.name: f for f in dataclasses.fields(table.cls)}
    rows = {row.field: row for row in table.rows}
    assert len(rows) == len(table.rows), "two rows fill the same field"
    assert len({row.key for row in table.rows}) == len(table.rows), "two rows read the same key"
    expected = set(rows) | ({table.path_field} if table.path_field else set())
    assert set(fields) == expected, "every field needs a row and every row a field"
    for f in fields.values():  # the table is the only source of defaults
        assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name
    hints = typing.get_type_hints(table.cls)
    for row in table.rows:
        want = tuple[str, ...] if row.kind == "strings" else _expected_type(row)
        assert hints[row.field] == want, f"{row.key}: field {row.field} is {hints[row.field]}, row says {want}"
        assert (row.table is not None) == (row.kind in ("section", "optional", "sections")), row.key
    if table.path_field:
        assert hints[table.path_field] is str


@pytest.mark.parametrize("name, table", TABLES, ids=[n for n, _ in TABLES])
def test_defaults_pass_their_own_checks(name: str, table: Table[Any]) -> None:
    for row in table.rows:
        if row.default is REQUIRED:
            continue
        if row.kind == "section":
            assert row.default is None  # the nested table's defaults apply
        elif row.kind == "optional":
            assert row.default is None
        elif row.kind in ("sections", "strings"):
            assert isinstance(row.default, tuple)
            if row.kind == "strings":
                assert all(isinstance(v, str) for v in row.default)
        elif row.empty_is_unset and row.default == "":
            pass  # derived when unset (documented by shown_default)
        else:
            # the default, written into a document, parses back to itself
            single = Table(_One, (dataclasses.replace(row, field="value", aliases=()),))
            try:
                assert parse_section(single, {row.key: row.default}, "<default>").value == row.default
            except ConfigError as e:
                pytest.fail(f"{name}: default of {row.key} fails its own row: {e}")
        if row.empty_is_unset and row.default == "":
            assert row.shown_default, f"{row.key}: a derived default must say what it is"


@dataclasses.dataclass(frozen=True)
class _One:
    value: object


def test_aliases_are_legacy_top_level_keys_not_modern_ones() -> None:
    for root in ROOTS.values():
        top = {row.key for row in root.rows}
        assert not root.alias_keys() & top


def test_empty_documents_give_the_table_defaults() -> None:
    for name, root in ROOTS.items():
        cfg = parse_section(root, {}, name)
        for row in root.rows:
            if row.kind in ("bool", "int") or (row.kind == "str" and not row.empty_is_unset):
                assert getattr(cfg, row.field) == row.default, (name, row.key)
