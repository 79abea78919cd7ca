"""TCMU against the real kernel (qemu TCG guest): configfs backstores, tcm_loop, ext4, crash recovery.

One boot runs tests/vm/guest_tcmu.py (about a minute under TCG); each check it reports is a test here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

HERE = Path(__file__).parent
VENV_BIN = HERE.parents[1] / ".venv" / "bin"
RO_CHECKS = [  # the read-only vector part: all that guest_tcmu.py runs in `quick` mode, then daemon_stops
    "frontend_tcmu",
    "attach_ro",
    "result_success",
    "cmp_dump",
    "ro_flag",
    "size",
    "hello",
    "blob",
    "detached",
]
CHECKS = [
    *RO_CHECKS,
    "bad_enable_fails",
    "bad_result",
    "rw_flag",
    "fstrim",
    "read_waits_for_daemon",
    "recovered",
    "inflight_read_completes",
    "commit",
    "reopen_new",
    "reopen_after_restart",
    "reopen_deleted",
    "reopen_hello",
    "blkdiscard",
    "discarded_zero",
    "rest_kept",
    "daemon_stops",
]


def prepare(s: Path, vectors: Path) -> None:
    """Files the guest scenario needs, made on the host with the project's own tools."""
    shutil.copy(vectors / "ext4/ap.commit", s / "ap.commit")
    (s / "dump.json").write_text(json.dumps({"lowers": [{"file": str(s / "ap.commit")}]}))
    subprocess.run([str(VENV_BIN / "overlaybd-dump"), str(s / "dump.json"), str(s / "vec.dump")], check=True)
    subprocess.run([str(VENV_BIN / "overlaybd-create"), str(s / "upper.data"), str(s / "upper.index"), "1"], check=True)
    subprocess.run(
        [str(VENV_BIN / "overlaybd-create"), str(s / "blank.data"), str(s / "blank.index"), "64MiB"], check=True
    )
    shutil.copy(HERE / "guest_tcmu.py", s / "guest_tcmu.py")


def run_scenario(guest, vectors: Path, *extra: str) -> dict:
    s = guest.scratch
    prepare(s, vectors)
    r = guest.run(f"python {s}/guest_tcmu.py {s} {' '.join(extra)}\n", timeout=900)
    results_file = s / "results.json"
    if not results_file.exists():
        pytest.fail(f"guest wrote no results (rc {r.rc}):\n{r.output[-3000:]}\n{r.console[-2000:]}")
    results = json.loads(results_file.read_text())
    results["_output"] = r.output
    for log in sorted(s.glob("daemon-*.log")):
        results["_output"] += f"\n--- {log.name}\n" + log.read_text(errors="replace")[-3000:]
    return results


@pytest.fixture(scope="module")
def guest_results(guest, vectors):
    return run_scenario(guest, vectors)


@pytest.mark.parametrize("name", CHECKS)
def test_guest_check(guest_results, name):
    assert "exception" not in guest_results or name in guest_results, guest_results.get("exception")
    assert guest_results.get(name) == "ok", f"{name}: {guest_results.get(name)}\n{guest_results['_output'][-4000:]}"
