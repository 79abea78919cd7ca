"""The snapshotter's TCMU device path against a real kernel (qemu TCG guest; the host has no configfs).

One boot runs guest_snapshotter.py; each check it reports is a test here. The overlaybd layer is made on
the host by overlaybd-convert (FUSE frontend) and unpacked the way containerd unpacks a layer blob.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from helpers.oci_images import busybox_layer, write_layout
from overlaybd.cli.convert import main as convert_main

pytestmark = pytest.mark.vm

HERE = Path(__file__).resolve().parent
CHECKS = [
    "tcmu_backend",
    "local_layer_adopted",
    "scsi_device",
    "ro_device_content",
    "tcm_loop_naa",
    "writable_bind",
    "sealed",
    "sealed_content",
    "devices_detached",
]


@pytest.fixture(scope="module")
def guest_results(tmp_path_factory):
    from helpers.qemu import Guest

    why = Guest.available()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("sn-vm-work")
    s = tmp_path_factory.mktemp("sn-vm-scratch")
    src, dst = work / "src", work / "dst"
    write_layout(src, "t/bb:1", [busybox_layer(extra={"etc/motd": b"lazy hello\n"})])  # one layer: whole tree
    assert convert_main([f"oci:{src}", f"oci:{dst}:obd", "--vsize", "1", "--work-dir", str(work)]) == 0
    idx = json.loads((dst / "index.json").read_text())
    manifest = json.loads((dst / "blobs/sha256" / idx["manifests"][0]["digest"][7:]).read_text())
    first = dst / "blobs/sha256" / manifest["layers"][-1]["digest"][7:]
    with tarfile.open(first) as tf:  # containerd's unpack of a layer blob: the overlaybd.commit payload
        tf.extract("overlaybd.commit", s, filter="data")
    (s / "overlaybd.commit").rename(s / "layer.commit")
    shutil.copy(HERE / "guest_snapshotter.py", s / "guest_snapshotter.py")
    r = Guest(s, work).run(f"python {s}/guest_snapshotter.py {s}\n", timeout=300)
    results_file = s / "results.json"
    if not results_file.exists():
        pytest.fail(f"guest wrote no results (rc {r.rc}):\n{r.output[-3000:]}\n{r.console[-2000:]}")
    results = json.loads(results_file.read_text())
    results["_output"] = r.output + "\n--- daemon\n" + (s / "daemon.log").read_text(errors="replace")[-3000:]
    return results


@pytest.mark.parametrize("name", CHECKS)
def test_guest_check(guest_results, name):
    assert "exception" not in guest_results, guest_results["exception"] + guest_results["_output"][-3000:]
    assert guest_results.get(name) == "ok", f"{name}: {guest_results.get(name)}\n{guest_results['_output'][-3000:]}"
