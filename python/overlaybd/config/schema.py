"""Table-driven config files: one settings table per file drives parsing, defaults and docs.

Why: upstream's C++/Go structs, its example files and its docs drift apart. As systemd's mkosi
does in `mkosi/config.py`, each file here is an explicit, typed, frozen dataclass (one nested
dataclass per JSON object) plus one table of `Setting` rows. A row names the JSON key as upstream
spells it, the dataclass field it fills, its kind, default, bounds, legacy aliases and meaning.
`parse_document`/`parse_section` are the only parser of all three files (overlaybd.json,
config.v1.json, the snapshotter's config.json), `markdown_tables` renders the README reference
from the same rows, and tests/config/test_tables.py checks that rows and fields agree.

Every input is bounded before it is trusted: file size, nesting depth, integer digits, string
length, list length, NUL characters; each failure is one `ConfigError` line naming file and field.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, TypeVar

log = logging.getLogger(__name__)

MAX_FILE_BYTES: Final = 1 << 20  # the largest real config (255 lowers) is ~100 KiB
MAX_DEPTH: Final = 32  # real files nest 3 deep; json's C scanner recurses per level
MAX_STRING: Final = 4096  # PATH_MAX; also bounds URLs and every error message echo
MAX_INT_DIGITS: Final = 20  # 2**64 has 20 digits; Python refuses int("9" * 4301) with a traceback
MAX_ITEMS: Final = 64  # list length unless a row says otherwise
MAX_UNKNOWN_WARNINGS: Final = 20  # per file, so a hostile file cannot flood the log

I32: Final = (-(2**31), 2**31 - 1)
U32: Final = (0, 2**32 - 1)
U64: Final = (0, 2**64 - 1)

Kind = Literal["bool", "int", "str", "section", "optional", "sections", "strings"]
"""`section`: nested object, absent = all its defaults; `optional`: nested object, absent = None;
`sections`: array of objects; `strings`: array of strings. Lists are tuples in the dataclasses."""

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file is missing, not JSON, too big/deep, or has a field of the wrong type/value.

    `str()` is one line naming the file and the dotted field, suitable for stderr/logs.
    """

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path = path
        self.field = field
        self.message = message
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")


class _Required:
    """Default of a row that has none: the key must be present."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()


@dataclass(frozen=True)
class Setting:
    """One row: JSON `key` -> dataclass `field`, how to check it, its default and its doc."""

    key: str
    field: str
    kind: Kind
    default: object
    doc: str
    lo: int = I32[0]  # int bounds, inclusive
    hi: int = I32[1]
    choices: tuple[str, ...] = ()  # str: allowed values
    check: Callable[[Any], str | None] | None = None  # extra rule: error message or None
    aliases: tuple[str, ...] = ()  # legacy top-level keys read when `key` is absent
    empty_is_unset: bool = False  # "" counts as absent (upstream's fallback rule)
    null_is_unset: bool = False  # JSON null counts as absent (Go's zero value)
    absolute: bool = False  # str: must be an absolute path
    max_len: int = MAX_STRING
    max_items: int = MAX_ITEMS
    table: Table[Any] | None = None  # section kinds: the nested table
    shown_default: str = ""  # README text when the default is computed or not a literal


@dataclass(frozen=True)
class Table(Generic[T]):
    """The rows of one JSON object and the frozen dataclass they fill."""

    cls: type[T]
    rows: tuple[Setting, ...]
    ignored: tuple[str, ...] = ()  # keys upstream writers emit but nobody reads (no warning)
    path_field: str = ""  # dataclass field that receives the file's path (not a JSON key)
    # cross-field rules and derived values: (parsed object, file, dotted prefix) -> object
    finish: Callable[[T, str, str], T] | None = field(default=None, compare=False)

    def subtables(self) -> list[Table[Any]]:
        """This table and every nested one, depth first (for docs and the agreement test)."""
        out: list[Table[Any]] = [self]
        for row in self.rows:
            if row.table is not None:
                out.extend(row.table.subtables())
        return out

    def alias_keys(self) -> set[str]:
        """Legacy top-level keys read by any row of this table or a nested one."""
        keys = {a for t in self.subtables() for row in t.rows for a in row.aliases}
        return keys


class _HugeInt:
    """What the JSON decoder yields for an integer of absurd length, reported later with its field."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(text: str) -> int | _HugeInt:
    return int(text) if len(text) <= MAX_INT_DIGITS else _HugeInt(len(text))


def show(value: object, limit: int = 60) -> str:
    """A short JSON rendering of `value` for error messages (never echoes a huge input)."""
    if isinstance(value, _HugeInt):
        return f"a {value.digits}-digit number"
    if isinstance(value, str) and len(value) > limit:
        return json.dumps(value[:limit]) + "..."
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _check_depth(path: str, text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before json.loads recurses into it."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    depth = 0
    for m in _TOKENS.finditer(text):
        c = m.group()
        if c == "[" or c == "{":
            depth += 1
            if depth > MAX_DEPTH:
                pos = m.start()
                line = text.count("\n", 0, pos) + 1
                col = pos - text.rfind("\n", 0, pos)
                raise ConfigError(path, f"line {line} column {col}", f"nested deeper than {MAX_DEPTH} levels")
        elif c == "]" or c == "}":
            depth -= 1


def read_json(path: str | os.PathLike[str]) -> object:
    """Load a JSON file in bounded time and memory; errors name the file (and line/column)."""
    p = os.fspath(path)
    if "\0" in p:
        raise ConfigError(p.replace("\0", "\\0"), "", "path contains a NUL character")
    try:
        # O_NONBLOCK: a FIFO must not hang the reader; it is refused below as not a regular file.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise ConfigError(p, "", "file not found") from e
    except IsADirectoryError as e:
        raise ConfigError(p, "", "is a directory, expected a JSON file") from e
    except OSError as e:
        raise ConfigError(p, "", f"cannot read: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(p, "", "is a directory, expected a JSON file")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(p, "", "not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ConfigError(p, "", f"file larger than {MAX_FILE_BYTES >> 20} MiB, not a config file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(p, "", f"cannot read: {e.strerror}") from e
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(p, "", f"file larger than {MAX_FILE_BYTES >> 20} MiB, not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(p, "", f"not UTF-8 at byte {e.start}") from e
    return parse_json_text(text, p)


def parse_json_text(text: str, path: str) -> object:
    """`json.loads` with the depth and integer-size bounds; errors name `path`."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(path, "", f"larger than {MAX_FILE_BYTES >> 20} MiB, not a config file")
    _check_depth(path, text)
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise ConfigError(path, f"line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}") from e
    except (ValueError, RecursionError) as e:  # belt and braces: the bounds above should prevent these
        raise ConfigError(path, "", f"invalid JSON: {str(e)[:80]}") from e


@dataclass
class _Ctx:
    """Per-document parse state: the file, its top-level object (for aliases), warnings so far."""

    path: str
    root: Mapping[str, object]
    unknown: int = 0

    def warn_unknown(self, field: str) -> None:
        self.unknown += 1
        if self.unknown <= MAX_UNKNOWN_WARNINGS:
            log.warning("%s: %s: unknown field ignored", self.path, show(field)[1:-1])
        elif self.unknown == MAX_UNKNOWN_WARNINGS + 1:
            log.warning("%s: more unknown fields ignored without warning", self.path)


def _type_error(ctx: _Ctx, where: str, want: str, value: object) -> ConfigError:
    return ConfigError(ctx.path, where, f"expected {want}, got {show(value)}")


def _scalar(row: Setting, value: object, ctx: _Ctx, where: str) -> object:
    """Check one bool/int/str value against its row; returns the Python value."""
    if row.kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(ctx, where, "boolean", value)
        out: object = value
    elif row.kind == "int":
        if isinstance(value, _HugeInt):
            raise ConfigError(ctx.path, where, f"{show(value)} is out of range")
        # upstream's JSON library accepts 4.0 for an integer; we do too, nothing else.
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(ctx, where, "integer", value)
        if value < row.lo:
            what = "non-negative integer" if row.lo == 0 else f"integer >= {row.lo}"
            raise ConfigError(ctx.path, where, f"expected {what}, got {show(value)}")
        if value > row.hi:
            raise ConfigError(ctx.path, where, f"must be <= {row.hi}, got {show(value)}")
        out = value
    else:
        out = _string(row, value, ctx, where)
    if row.check is not None:
        msg = row.check(out)
        if msg:
            raise ConfigError(ctx.path, where, msg)
    return out


def _string(row: Setting, value: object, ctx: _Ctx, where: str) -> str:
    if not isinstance(value, str):
        raise _type_error(ctx, where, "string", value)
    if len(value) > row.max_len:
        raise ConfigError(ctx.path, where, f"longer than {row.max_len} characters")
    if "\0" in value:
        raise ConfigError(ctx.path, where, "contains a NUL character")
    if row.choices and value not in row.choices:
        allowed = ", ".join(json.dumps(c) for c in row.choices)
        raise ConfigError(ctx.path, where, f"expected one of {allowed}, got {show(value)}")
    if row.absolute and not os.path.isabs(value):
        raise ConfigError(ctx.path, where, f"must be an absolute path, got {show(value)}")
    return value


def _unset(row: Setting, value: object) -> bool:
    return (row.null_is_unset and value is None) or (row.empty_is_unset and value == "")


def _value(row: Setting, value: object, ctx: _Ctx, where: str) -> object:
    """Check the JSON value of one row (any kind); returns what its dataclass field holds."""
    if row.kind in ("section", "optional"):
        assert row.table is not None
        return _section(row.table, value, ctx, where)
    if row.kind in ("sections", "strings"):
        if not isinstance(value, list):
            raise _type_error(ctx, where, "array", value)
        if len(value) > row.max_items:
            raise ConfigError(ctx.path, where, f"{len(value)} items, at most {row.max_items} are supported")
        if row.kind == "strings":
            return tuple(_string(row, v, ctx, f"{where}[{i}]") for i, v in enumerate(value))
        assert row.table is not None
        return tuple(_section(row.table, v, ctx, f"{where}[{i}]") for i, v in enumerate(value))
    return _scalar(row, value, ctx, where)


def _default(row: Setting, ctx: _Ctx, where: str) -> object:
    if isinstance(row.default, _Required):
        raise ConfigError(ctx.path, where, "must be set")
    if row.kind == "section":
        assert row.table is not None
        return _section(row.table, {}, ctx, where)
    return row.default


def _section(table: Table[T], data: object, ctx: _Ctx, prefix: str) -> T:
    """Build `table.cls` from one decoded JSON object; unknown keys are logged, not fatal."""
    if not isinstance(data, dict):
        raise _type_error(ctx, prefix or "(top level)", "object", data)
    known = {row.key for row in table.rows}
    if not prefix:
        known |= table.alias_keys()
    for key in data:
        if key not in known and key not in table.ignored:
            ctx.warn_unknown(f"{prefix}.{key}" if prefix else key)
    kwargs: dict[str, object] = {}
    for row in table.rows:
        where = f"{prefix}.{row.key}" if prefix else row.key
        if row.key in data and not _unset(row, data[row.key]):
            kwargs[row.field] = _value(row, data[row.key], ctx, where)
            continue
        for alias in row.aliases:
            if alias in ctx.root and not _unset(row, ctx.root[alias]):
                kwargs[row.field] = _value(row, ctx.root[alias], ctx, alias)
                break
        else:
            kwargs[row.field] = _default(row, ctx, where)
    if table.path_field:
        kwargs[table.path_field] = ctx.path
    obj = table.cls(**kwargs)
    return table.finish(obj, ctx.path, prefix) if table.finish is not None else obj


def parse_section(table: Table[T], data: object, path: str) -> T:
    """The one parser: a decoded JSON document -> the frozen dataclass of `table`."""
    root: Mapping[str, object] = data if isinstance(data, dict) else {}
    return _section(table, data, _Ctx(path, root), "")


def load_file(table: Table[T], path: str | os.PathLike[str]) -> T:
    """Read, bound and parse one config file. Raises ConfigError naming the file and field."""
    p = os.fspath(path)
    return parse_section(table, read_json(p), p)


def to_json_dict(table: Table[Any], obj: object, *, skip_defaults: bool = False) -> dict[str, object]:
    """The JSON object (upstream key spelling) for a dataclass instance of `table`."""
    out: dict[str, object] = {}
    for row in table.rows:
        value: object = getattr(obj, row.field)
        if row.table is not None:
            if value is None:
                continue
            if row.kind == "sections" and isinstance(value, tuple):
                items = [to_json_dict(row.table, v, skip_defaults=skip_defaults) for v in value]
                if items or not skip_defaults:
                    out[row.key] = items
                continue
            sub = to_json_dict(row.table, value, skip_defaults=skip_defaults)
            if sub or not skip_defaults or row.kind == "optional":
                out[row.key] = sub
        elif not (skip_defaults and value == row.default):
            out[row.key] = list(value) if isinstance(value, tuple) else value
    return out


# --- reference docs -----------------------------------------------------------------------------


def _type_text(row: Setting) -> str:
    if row.kind == "int":
        if (row.lo, row.hi) == I32:
            return "integer"
        if row.lo == 0 and row.hi in (U32[1], U64[1]):
            return "integer >= 0"
        return f"integer {row.lo}..{row.hi}"
    if row.kind == "str" and row.choices:
        return "one of " + ", ".join(f"`{c}`" for c in row.choices)
    return {
        "bool": "boolean",
        "str": "absolute path" if row.absolute else "string",
        "section": "object",
        "optional": "object",
        "sections": "array of objects",
        "strings": "array of strings",
    }[row.kind]


def _default_text(row: Setting) -> str:
    if row.shown_default:
        return row.shown_default
    if isinstance(row.default, _Required):
        return "required"
    if row.kind == "optional":
        return "none"
    value = list(row.default) if isinstance(row.default, tuple) else row.default
    return f"`{json.dumps(value)}`"


def _doc_text(row: Setting) -> str:
    doc = row.doc
    if row.empty_is_unset:
        doc += '; `""` means the default'
    if row.aliases:
        doc += " (legacy top-level key: " + ", ".join(f"`{a}`" for a in row.aliases) + ")"
    return doc


def _rows(table: Table[Any], key_prefix: str, attr_prefix: str, later: list[tuple[str, Setting]]) -> list[str]:
    lines: list[str] = []
    for row in table.rows:
        key = f"{key_prefix}{row.key}"
        attr = f"{attr_prefix}{row.field}"
        if row.kind == "section" and row.table is not None:
            lines.extend(_rows(row.table, f"{key}.", f"{attr}.", later))
            continue
        if row.table is not None:
            later.append((key + ("[]" if row.kind == "sections" else ""), row))
        lines.append(f"| `{key}` | `{attr}` | {_type_text(row)} | {_default_text(row)} | {_doc_text(row)} |")
    return lines


_HEADER = "| field | attribute | type | default | meaning |\n| --- | --- | --- | --- | --- |\n"


def markdown_tables(table: Table[Any]) -> str:
    """Markdown reference of `table`: nested objects inline as dotted keys, arrays of objects and
    optional objects as their own tables after it (rendered from the rows the parser uses)."""
    later: list[tuple[str, Setting]] = []
    parts = [_HEADER + "\n".join(_rows(table, "", "", later)) + "\n"]
    while later:
        name, row = later.pop(0)
        assert row.table is not None
        sub: list[tuple[str, Setting]] = []
        parts.append(f"`{name}`:\n\n" + _HEADER + "\n".join(_rows(row.table, "", "", sub)) + "\n")
        later.extend((f"{name}.{n}", r) for n, r in sub)
    return "\n".join(parts)
