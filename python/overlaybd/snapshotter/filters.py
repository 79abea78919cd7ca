"""containerd's filter language for List (`labels."containerd.io/snapshot.ref"==x,parent=="y"`).

Why here: containerd's metadata layer finds a remote snapshot by calling List with such a
filter; answering with the filtered set keeps the stream small. Grammar (containerd
`filters` package): a request's filter strings are OR-ed; inside one, selectors separated by
`,` are AND-ed; a selector is a field path (`name`, `parent`, `kind`, `labels.<key>`; parts
may be double-quoted) optionally followed by `==`, `!=` or `~=` (regexp) and a value
(double-quoted, `/regexp/`, or bare up to the next comma). A bare path tests presence.

Regexps are RE2 (`google-re2`), as containerd's Go `regexp`: matching is linear in the input, so no
pattern (e.g. `^(a+)+$`) can make a List request backtrack for seconds; constructs RE2 lacks
(backreferences, lookaround) are refused with InvalidArgument, as containerd refuses them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import re2

from .errors import InvalidArgument
from .labels import esc
from .store import KIND_NAMES, Snapshot

MAX_REGEXP_MEMORY = 8 << 20  # RE2's own default: a pattern whose program needs more is refused


def _re2_options() -> Any:
    opts = re2.Options()
    opts.log_errors = False  # a client's bad pattern is its InvalidArgument, not a line on our stderr
    opts.max_mem = MAX_REGEXP_MEMORY
    return opts


_RE2_OPTIONS = _re2_options()


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str  # "", "==", "!=", "~="
    value: str
    regexp: Any = field(default=None, compare=False)  # compiled RE2 pattern of a `~=` selector


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, msg: str) -> InvalidArgument:
        return InvalidArgument(f"filter {esc(self.text, 200)!r}: {msg} at offset {self.pos}: invalid argument")

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def quoted(self) -> str:
        end = self.pos + 1
        while end < len(self.text):
            if self.text[end] == "\\":
                end += 2
                continue
            if self.text[end] == '"':
                break
            end += 1
        else:
            raise self.error("unterminated quoted string")
        try:
            value = json.loads(self.text[self.pos : end + 1])
        except ValueError as e:
            raise self.error("bad quoted string") from e
        self.pos = end + 1
        return value

    def regexp(self) -> str:
        end = self.text.find("/", self.pos + 1)
        while end > 0 and self.text[end - 1] == "\\":
            end = self.text.find("/", end + 1)
        if end < 0:
            raise self.error("unterminated /regexp/")
        value = self.text[self.pos + 1 : end].replace("\\/", "/")
        self.pos = end + 1
        return value

    def field(self) -> str:
        if self.peek('"'):
            return self.quoted()
        m = re.compile(r"[A-Za-z0-9_\-]+").match(self.text, self.pos)
        if not m:
            raise self.error("expected a field name")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        if self.peek('"'):
            return self.quoted()
        if self.peek("/"):
            return self.regexp()
        end = self.text.find(",", self.pos)
        end = len(self.text) if end < 0 else end
        value = self.text[self.pos : end]
        self.pos = end
        return value


def parse(text: str) -> list[Selector]:
    """One filter string -> its AND-ed selectors; InvalidArgument on syntax errors."""
    lx = _Lexer(text.strip())
    out: list[Selector] = []
    while True:
        path = [lx.field()]
        while lx.peek("."):
            lx.pos += 1
            path.append(lx.field())
        op, value = "", ""
        for candidate in ("==", "!=", "~="):
            if lx.peek(candidate):
                op = candidate
                lx.pos += 2
                value = lx.value()
                break
        compiled = None
        if op == "~=":
            try:
                compiled = re2.compile(value, _RE2_OPTIONS)
            except re2.error as e:
                detail = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
                raise lx.error(f"bad regexp {esc(value, 80)!r}: {esc(detail, 120)}") from e
        out.append(Selector(tuple(path), op, value, compiled))
        if lx.at_end():
            return out
        if not lx.peek(","):
            raise lx.error("expected ',' or an operator")
        lx.pos += 1


def _field(s: Snapshot, path: tuple[str, ...]) -> str | None:
    head = path[0]
    if head == "labels" and len(path) > 1:
        return s.labels.get(".".join(path[1:]))
    if len(path) != 1:
        return None
    if head == "name":
        return s.key
    if head == "parent":
        return s.parent
    if head == "kind":
        return KIND_NAMES.get(s.kind, "unknown")
    return None


def _match(s: Snapshot, sel: Selector) -> bool:
    value = _field(s, sel.path)
    if sel.op == "":
        return bool(value)
    if sel.op == "==":
        return value == sel.value
    if sel.op == "!=":
        return value != sel.value
    return value is not None and sel.regexp.search(value) is not None


def compile_filters(texts: list[str]) -> Callable[[Snapshot], bool]:
    """A predicate for a List request: any filter matches (no filters: everything)."""
    parsed = [parse(t) for t in texts if t.strip()]
    if not parsed:
        return lambda s: True
    return lambda s: any(all(_match(s, sel) for sel in sels) for sels in parsed)
