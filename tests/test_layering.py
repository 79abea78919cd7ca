"""The import rules of docs/architecture.md, checked on the source (ast), so a violating import fails here.

Why a test: the rules keep data flowing one way (frontends -> image -> layer files -> registry,
host plumbing at the bottom); an upward import only shows up later as a cycle or a frozen-bundle
surprise. Every import counts, including ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "python" / "overlaybd"
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())


def _module_name(path: Path) -> tuple[str, str]:
    """(module, the package its relative imports start from) for a file under ROOT."""
    parts = ["overlaybd", *path.relative_to(ROOT).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, dotted target) of every import in the file, relative ones resolved."""
    _, package = _module_name(path)
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _edges() -> list[tuple[str, int, str, str]]:
    """(file, line, importing package, imported package) for imports between project packages."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if len(rel.parts) < 2:
            continue  # overlaybd/__init__.py: the version only
        src = rel.parts[0]
        for line, target in _imported(path):
            parts = target.split(".")
            if parts[0] != "overlaybd" or len(parts) < 2 or parts[1] not in PACKAGES:
                continue
            if parts[1] != src:
                edges.append((f"python/overlaybd/{rel}", line, src, parts[1]))
    return edges


EDGES = _edges()

RULES = {
    "format/ imports no other package": lambda src, dst: src == "format",
    "host/ imports no other package": lambda src, dst: src == "host",
    "tcmu/ and fuse/ never import each other": lambda src, dst: {src, dst} == {"tcmu", "fuse"},
    "frontends never import the daemon": lambda src, dst: src in ("tcmu", "fuse") and dst == "daemon",
    "nothing imports cli/": lambda src, dst: dst == "cli",
}


def test_the_parser_sees_the_packages() -> None:
    assert {"format", "host", "tcmu", "fuse", "daemon", "image", "cli"} <= set(PACKAGES)
    assert ("python/overlaybd/fuse/server.py", "image") in {(f, dst) for f, _, _, dst in EDGES}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_import_rule(rule: str) -> None:
    broken = [f"{f}:{line}: {src} -> {dst}" for f, line, src, dst in EDGES if RULES[rule](src, dst)]
    assert not broken, f"{rule}:\n  " + "\n  ".join(broken)
