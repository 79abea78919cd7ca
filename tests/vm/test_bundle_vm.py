"""The frozen PyInstaller bundle's overlaybd-tcmu (out/bundle, `make bundle`) against the real kernel.

Shorter scenario than test_tcmu_vm.py: the read-only vector through TCMU + tcm_loop + ext4, proving
the frozen daemon's netlink, mmap of the UIO ring and configfs handling work outside the venv.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_tcmu_vm import run_scenario

pytestmark = pytest.mark.vm

BUNDLE_TCMU = Path(__file__).resolve().parents[2] / "out" / "bundle" / "bin" / "overlaybd-tcmu"
QUICK_CHECKS = [
    "frontend_tcmu",
    "attach_ro",
    "result_success",
    "cmp_dump",
    "ro_flag",
    "size",
    "hello",
    "blob",
    "detached",
    "daemon_stops",
]


@pytest.fixture(scope="module")
def bundle_results(guest, vectors):
    if not BUNDLE_TCMU.exists():
        pytest.skip(f"{BUNDLE_TCMU} missing (make bundle)")
    return run_scenario(guest, vectors, str(BUNDLE_TCMU), "quick")


@pytest.mark.parametrize("name", QUICK_CHECKS)
def test_bundle_check(bundle_results, name):
    assert bundle_results.get(name) == "ok", f"{name}: {bundle_results.get(name)}\n{bundle_results['_output'][-4000:]}"
