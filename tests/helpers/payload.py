"""Helpers of the update_payload tests (a module of its own: every test dir has a conftest.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Keys:
    private: Path
    public: Path
    other_private: Path
    other_public: Path


def flip(path: Path, offset: int) -> None:
    """Invert one byte of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def no_stray_files(directory: Path, allowed: set[str]) -> None:
    left = set(os.listdir(directory)) - allowed
    assert not left, f"left behind: {left}"
