"""A container whose rootfs is an overlaybd TCMU device: containerd + overlaybd-snapshotter + overlaybd-tcmu
in a qemu TCG guest (the host has no configfs/TCMU, so only a guest kernel can run this path).

One boot runs guest_container.py; each check it reports is a test here. The image is made on the host
(a busybox layer with /etc/hello.txt, converted by overlaybd-convert into an OCI layout tar in the scratch
dir shared with the guest); in the guest `ctr image import` unpacks it onto the overlaybd snapshotter and
`ctr run` starts containers on a /dev/sdX exported by tcm_loop. The guest powers off at the end, so every
process, mount and device it made is gone with it; the host side only leaves pytest tmp dirs.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from helpers.oci_images import busybox_layer, write_layout
from overlaybd.cli.convert import main as convert_main

pytestmark = [pytest.mark.vm, pytest.mark.containerd]

HERE = Path(__file__).resolve().parent
HELLO = b"hello from a tcmu device\n"
CHECKS = [
    "tcmu_available",
    "local_layer_adopted",
    "run_rm_output",
    "write_on_overlay",
    "rootfs_overlay",
    "rootfs_from_scsi_device",
    "device_is_lio",
    "tcmu_backstore",
    "container_removed",
    "layer_unchanged",
    "devices_detached",
    "mounts_released",
]


def _tar_layout(layout: Path, out: Path) -> None:
    with tarfile.open(out, "w") as tf:
        for p in sorted(layout.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(layout)), recursive=False)


@pytest.fixture(scope="module")
def guest_results(tmp_path_factory):
    from helpers.qemu import Guest

    why = Guest.available()
    if why:
        pytest.skip(why)
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} missing (apt-get install containerd runc)")
    work = tmp_path_factory.mktemp("ctr-vm-work")
    s = tmp_path_factory.mktemp("ctr-vm-scratch")
    src, dst = work / "src", work / "dst"
    write_layout(src, "localhost/t/hello:1", [busybox_layer(extra={"etc/hello.txt": HELLO})])
    assert convert_main([f"oci:{src}", f"oci:{dst}:obd", "--vsize", "1", "--work-dir", str(work)]) == 0
    _tar_layout(dst, s / "obd.tar")
    shutil.copy(HERE / "guest_container.py", s / "guest_container.py")
    r = Guest(s, work).run(f"python {s}/guest_container.py {s}\n", timeout=300)
    results_file = s / "results.json"
    logs = "".join(
        f"\n--- {n}\n" + (s / f"{n}.log").read_text(errors="replace")[-2000:]
        for n in ("daemon", "snapshotter", "containerd")
        if (s / f"{n}.log").exists()
    )
    if not results_file.exists():
        pytest.fail(f"guest wrote no results (rc {r.rc}):\n{r.output[-3000:]}{logs}\n{r.console[-2000:]}")
    results = json.loads(results_file.read_text())
    results["_output"] = r.output[-4000:] + logs
    return results


@pytest.mark.parametrize("name", CHECKS)
def test_guest_check(guest_results, name):
    assert "exception" not in guest_results, guest_results["exception"] + guest_results["_output"]
    assert guest_results.get(name) == "ok", f"{name}: {guest_results.get(name)}\n{guest_results['_output']}"
