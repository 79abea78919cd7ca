"""The frozen PyInstaller bundle's overlaybd-tcmu (out/bundle, `make bundle`) against the real kernel.

Shorter scenario than test_tcmu_vm.py: the read-only vector through TCMU + tcm_loop + ext4, proving
the frozen daemon's netlink, mmap of the UIO ring and configfs handling work outside the venv.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_tcmu_vm import RO_CHECKS, run_scenario

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
BUNDLE_TCMU = REPO / "out" / "bundle" / "bin" / "overlaybd-tcmu"
QUICK_CHECKS = [*RO_CHECKS, "daemon_stops"]


@pytest.fixture(scope="module")
def bundle_results(guest, vectors):
    if not BUNDLE_TCMU.exists():  # the sysext tier builds it; alone, build it here as `make bundle` does
        res = subprocess.run([str(REPO / "build.sh"), "--bundle-only"], cwd=REPO, capture_output=True, text=True)
        assert res.returncode == 0 and BUNDLE_TCMU.exists(), f"build.sh --bundle-only failed:\n{res.stderr[-3000:]}"
    return run_scenario(guest, vectors, str(BUNDLE_TCMU), "quick")


@pytest.mark.parametrize("name", QUICK_CHECKS)
def test_bundle_check(bundle_results, name):
    assert bundle_results.get(name) == "ok", f"{name}: {bundle_results.get(name)}\n{bundle_results['_output'][-4000:]}"
