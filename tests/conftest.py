"""Shared fixtures: where the upstream-made vectors live, scratch dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VECTORS = Path(os.environ.get("OVERLAYBD_VECTORS", REPO.parent / "shared" / "vectors"))


@pytest.fixture(scope="session")
def vectors() -> Path:
    """Path to ../shared/vectors (upstream-made test files)."""
    if not VECTORS.is_dir():
        pytest.fail(f"vectors not found at {VECTORS} (set OVERLAYBD_VECTORS)")
    return VECTORS
