"""Table-driven JSON config models: one table of settings drives parsing, defaults and docs.

Why: upstream's C++ config structs, its example files and its docs drift apart. Here
each config file is described once (`Section` of `Setting`s, JSON keys spelled as
upstream spells them); the Python dataclasses, the parser with its error messages and
the reference markdown are all generated from that description. Attribute names are
the JSON keys converted mechanically to snake_case (`cacheSizeGB` -> `cache_size_gb`,
`maxMBps` -> `max_mbps`), so nobody has to remember a second spelling.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

U32_MAX = 2**32 - 1


class ConfigError(ValueError):
    """A config file is missing, not JSON, or has a field of the wrong type/value.

    `str()` is one line naming the file and the dotted field, suitable for stderr/logs.
    """

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path = path
        self.field = field
        self.message = message
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")


def snake(key: str) -> str:
    """`cacheSizeGB` -> `cache_size_gb`, `maxMBps` -> `max_mbps`, `p2pConfig` -> `p2p_config`."""
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()


# kind -> (python type, JSON type name used in error messages)
KINDS: dict[str, tuple[type, str]] = {
    "u32": (int, "integer"),
    "int": (int, "integer"),
    "u64": (int, "integer"),
    "bool": (bool, "boolean"),
    "str": (str, "string"),
}


@dataclass(frozen=True)
class Setting:
    """One scalar JSON field: upstream key, kind, default, one-line doc, optional extra check."""

    key: str
    kind: str
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None  # returns an error message or None

    @property
    def attr(self) -> str:
        return snake(self.key)


@dataclass(frozen=True)
class Section:
    """A JSON object: its key in the parent ("" for the document root) and its members."""

    key: str
    class_name: str
    members: tuple[Setting | Section, ...]
    doc: str = ""
    ignored: tuple[str, ...] = ()  # keys upstream writers emit but nobody reads (no warning)

    @property
    def attr(self) -> str:
        return snake(self.key)


_CLASSES: dict[int, type] = {}


def model(section: Section, module: str = __name__) -> type:
    """The dataclass generated for `section` (built once, cached); `module` is where it is importable from."""
    cls = _CLASSES.get(id(section))
    if cls is not None:
        return cls
    fields: list[tuple[str, Any, Any]] = []
    for m in section.members:
        if isinstance(m, Section):
            sub = model(m, module)
            fields.append((m.attr, sub, dataclasses.field(default_factory=sub)))
        else:
            fields.append((m.attr, KINDS[m.kind][0], dataclasses.field(default=m.default)))
    cls = dataclasses.make_dataclass(section.class_name, fields)
    cls.__module__ = module
    cls.__doc__ = section.doc or f"{section.class_name} (generated from its settings table)."
    _CLASSES[id(section)] = cls
    return cls


def models(section: Section, module: str = __name__) -> dict[str, type]:
    """Every generated class of `section` and its subsections, by class name (to export from a module)."""
    out = {section.class_name: model(section, module)}
    for m in section.members:
        if isinstance(m, Section):
            out.update(models(m, module))
    return out


def _type_error(path: str, field: str, kind: str, value: Any) -> ConfigError:
    return ConfigError(path, field, f"expected {KINDS[kind][1]}, got {json.dumps(value)}")


def check_value(path: str, field: str, setting: Setting, value: Any) -> Any:
    """Validate one JSON value against its setting; return the Python value."""
    kind = setting.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(path, field, kind, value)
    elif kind in ("u32", "int", "u64"):
        if isinstance(value, bool) or not isinstance(value, int):
            # upstream's JSON library accepts 4.0 for an integer; we do too, nothing else.
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise _type_error(path, field, kind, value)
        if kind in ("u32", "u64") and value < 0:
            raise ConfigError(path, field, f"expected non-negative integer, got {value}")
        if kind == "u32" and value > U32_MAX:
            raise ConfigError(path, field, f"{value} is larger than {U32_MAX}")
        if kind == "int" and not -(2**31) <= value < 2**31:
            raise ConfigError(path, field, f"{value} does not fit a 32-bit integer")
    elif kind == "str":
        if not isinstance(value, str):
            raise _type_error(path, field, kind, value)
    if setting.check is not None:
        msg = setting.check(value)
        if msg:
            raise ConfigError(path, field, msg)
    return value


def parse_section(section: Section, data: Any, path: str, prefix: str = "") -> Any:
    """Build the dataclass of `section` from parsed JSON `data`; unknown keys are logged, not fatal."""
    where = prefix or "(top level)"
    if not isinstance(data, dict):
        raise ConfigError(path, where, f"expected object, got {json.dumps(data)[:60]}")
    cls = model(section)
    kwargs: dict[str, Any] = {}
    known = {m.key: m for m in section.members}
    for key, value in data.items():
        field = f"{prefix}.{key}" if prefix else key
        member = known.get(key)
        if member is None:
            if key not in section.ignored:
                log.warning("%s: %s: unknown field ignored", path, field)
            continue
        if isinstance(member, Section):
            kwargs[member.attr] = parse_section(member, value, path, field)
        else:
            kwargs[member.attr] = check_value(path, field, member, value)
    return cls(**kwargs)


def to_json_dict(section: Section, obj: Any, *, skip_defaults: bool = False) -> dict[str, Any]:
    """The JSON object (upstream key spelling) for a generated dataclass instance."""
    out: dict[str, Any] = {}
    for m in section.members:
        value = getattr(obj, m.attr)
        if isinstance(m, Section):
            sub = to_json_dict(m, value, skip_defaults=skip_defaults)
            if sub or not skip_defaults:
                out[m.key] = sub
        elif not (skip_defaults and value == m.default):
            out[m.key] = value
    return out


def read_json(path: str | os.PathLike[str]) -> Any:
    """Load a JSON file; errors name the file (and line/column for syntax errors)."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(16 << 20)
            if f.read(1):
                raise ConfigError(p, "", "file larger than 16 MiB, not a config file")
    except FileNotFoundError as e:
        raise ConfigError(p, "", "file not found") from e
    except IsADirectoryError as e:
        raise ConfigError(p, "", "is a directory, expected a JSON file") from e
    except OSError as e:
        raise ConfigError(p, "", f"cannot read: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(p, "", f"not UTF-8 at byte {e.start}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(p, f"line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}") from e


def _fmt_default(s: Setting) -> str:
    if s.kind == "str":
        return f'`"{s.default}"`'
    if s.kind == "bool":
        return "`true`" if s.default else "`false`"
    return f"`{s.default}`"


def reference_rows(section: Section, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(json field, attribute, type, default, doc) for every setting, depth first."""
    rows: list[tuple[str, str, str, str, str]] = []
    for m in section.members:
        key = f"{prefix}.{m.key}" if prefix else m.key
        attr = f"{snake(prefix)}.{m.attr}" if prefix else m.attr
        if isinstance(m, Section):
            rows.extend(reference_rows(m, key))
        else:
            rows.append((key, attr, KINDS[m.kind][1], _fmt_default(m), m.doc))
    return rows


def markdown_table(section: Section) -> str:
    lines = ["| field | attribute | type | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for key, attr, kind, default, doc in reference_rows(section):
        lines.append(f"| `{key}` | `{attr}` | {kind} | {default} | {doc} |")
    return "\n".join(lines) + "\n"
