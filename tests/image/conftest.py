"""Fixtures of the image tests: config.v1.json files pointing at the upstream vectors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def write_config(tmp_path: Path):
    """write_config(dict, name="config.v1.json") -> Path of the written config."""

    def write(doc: dict, name: str = "config.v1.json") -> Path:
        p = tmp_path / name
        p.write_text(json.dumps(doc))
        return p

    return write


@pytest.fixture
def rw_copy(tmp_path: Path, vectors: Path):
    """rw_copy("L1") -> (data, index) copies of rw/<name>.* in tmp_path (sparse, writable)."""

    def copy(name: str) -> tuple[Path, Path]:
        out = []
        for ext in ("data", "index"):
            dst = tmp_path / f"{name}.{ext}"
            subprocess.run(["cp", "--sparse=always", str(vectors / "rw" / f"{name}.{ext}"), str(dst)], check=True)
            dst.chmod(0o644)
            out.append(dst)
        return out[0], out[1]

    return copy


@pytest.fixture
def layer_dir(tmp_path: Path):
    """layer_dir(src, name) -> a fresh dir holding a copy of `src` named `name` (for lowers[].dir)."""
    count = [0]

    def make(src: Path, name: str) -> Path:
        count[0] += 1
        d = tmp_path / f"layerdir{count[0]}"
        d.mkdir()
        shutil.copy(src, d / name)
        return d

    return make
