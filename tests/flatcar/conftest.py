"""The flatcar tier's session fixture: one prepared disk, up to four boots, results shared by every test."""

from __future__ import annotations

import json
import time
import traceback

import pytest

from . import harness

_failed: list[str] = []  # a failed preparation is reported to every test, not retried per test


@pytest.fixture(scope="session")
def flatcar(tmp_path_factory: pytest.TempPathFactory) -> harness.Results:
    """Run the whole tier once (build, provision, boot); skip with the reason when it cannot run here."""
    why = harness.unavailable()
    if why:
        pytest.skip(why)
    if _failed:
        pytest.fail(f"the flatcar tier's preparation failed (see the first error):\n{_failed[0]}", pytrace=False)
    work = tmp_path_factory.mktemp("flatcar")
    start = time.monotonic()
    try:
        res = harness.run_tier(work)
    except Exception:
        _failed.append(traceback.format_exc()[-6000:])
        raise
    res.timings["total"] = time.monotonic() - start
    (work / "timings.json").write_text(json.dumps(res.timings, indent=1))
    print(f"\nflatcar tier timings (s): {json.dumps({k: round(v, 1) for k, v in res.timings.items()})}")
    return res
