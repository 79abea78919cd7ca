"""Shared fixtures: where the upstream-made vectors live, scratch dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VECTORS = Path(os.environ.get("OVERLAYBD_VECTORS", REPO.parent / "shared" / "vectors"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ci_may_skip: a skip that is a legitimate race, not a missing tier")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`root` tests skip for other users (in CI, which runs as root, a skip would fail: see below)."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (marked `root`)")
    for item in items:
        if item.get_closest_marker("root"):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In CI (`CI` set) a tier that cannot run fails with its reason: a skip there would hide a broken product."""
    outcome = yield
    rep = outcome.get_result()
    if not os.environ.get("CI") or not rep.skipped or item.get_closest_marker("ci_may_skip"):
        return
    if hasattr(rep, "wasxfail"):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    rep.outcome = "failed"
    rep.longrepr = f"skipped in CI (CI is set, so this tier must run): {reason}"


@pytest.fixture(scope="session")
def vectors() -> Path:
    """Path to ../shared/vectors (upstream-made test files)."""
    if not VECTORS.is_dir():
        pytest.fail(f"vectors not found at {VECTORS} (set OVERLAYBD_VECTORS)")
    return VECTORS
