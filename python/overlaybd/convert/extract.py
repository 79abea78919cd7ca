"""Applying an OCI layer tar onto a mounted filesystem with overlay whiteout semantics.

Why our own loop instead of `tarfile.extractall`: whiteouts (`.wh.<name>` deletes a lower
entry, `.wh..wh..opq` empties a directory) must be applied, entries must replace whatever
type was there before, and nothing may be written outside the target — neither through
`..`/absolute names nor through a symlink created by an earlier entry.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from typing import IO

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class LayerError(ValueError):
    """A layer entry that cannot be applied safely; names the layer and the entry."""

    def __init__(self, layer: str, entry: str, message: str) -> None:
        super().__init__(f"{layer}: {entry}: {message}")


def _clean(name: str, layer: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise LayerError(layer, name, "path escapes the layer root")
    return "/".join(parts)


def _inside(root: str, path: str, layer: str, entry: str) -> None:
    """The parent of `path` must resolve inside `root` (no symlinked directory on the way)."""
    parent = os.path.realpath(os.path.dirname(path))
    if parent != root and not parent.startswith(root + "/"):
        raise LayerError(layer, entry, "parent directory resolves outside the layer root (symlink)")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def apply_layer(stream: IO[bytes], root: str, layer_name: str = "<layer>") -> int:
    """Extract an uncompressed layer tar stream into `root`; returns the number of entries applied."""
    root = os.path.realpath(root)
    count = 0
    dirs: list[tuple[str, tarfile.TarInfo]] = []
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for m in tf:
            rel = _clean(m.name, layer_name)
            if not rel:
                continue
            base = os.path.basename(rel)
            target = os.path.join(root, rel)
            _inside(root, target, layer_name, m.name)
            if base == OPAQUE:
                d = os.path.dirname(target)
                if os.path.isdir(d):
                    for child in os.listdir(d):
                        _remove(os.path.join(d, child))
                continue
            if base.startswith(WHITEOUT):
                _remove(os.path.join(os.path.dirname(target), base[len(WHITEOUT) :]))
                continue
            if m.islnk():
                link = _clean(m.linkname, layer_name)
                src = os.path.join(root, link)
                _inside(root, src, layer_name, m.linkname)
                _remove(target)
                os.link(src, target, follow_symlinks=False)
                count += 1
                continue
            if os.path.lexists(target) and not (m.isdir() and os.path.isdir(target) and not os.path.islink(target)):
                _remove(target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tf.extract(m, root, set_attrs=True, numeric_owner=True, filter="fully_trusted")
            if m.isdir():
                dirs.append((target, m))
            count += 1
    for path, m in reversed(dirs):  # directory mtimes/modes last: extracting children changed them
        os.chmod(path, m.mode & 0o7777)
        os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
    return count
