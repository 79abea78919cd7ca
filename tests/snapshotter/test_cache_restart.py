"""Issue 14's container-level check of the block cache: a container reads a 100 MiB file cold from a lazy
overlaybd image, the daemons restart with the registry stopped, and the file's sha256 is still right
(every byte comes from the on-disk cache; nothing is refetched, nothing is wrong)."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from helpers.containerd_stack import rpull
from helpers.oci_images import busybox_layer, files_layer, write_layout
from overlaybd.cli.convert import main as convert_main

pytestmark = [pytest.mark.containerd, pytest.mark.registry, pytest.mark.slow]


def test_cold_read_then_restart_with_registry_stopped(lazy_stack, registry, tmp_path, cname):
    big = random.Random(14).randbytes(100 << 20)  # incompressible: the ZFile layer is ~100 MiB as well
    want = hashlib.sha256(big).hexdigest()
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_layout(src, "localhost/t/big:1", [busybox_layer(), files_layer({"data/big": big})])
    del big
    assert convert_main([f"oci:{src}", f"oci:{dst}:obd", "--vsize", "1", "--work-dir", str(tmp_path)]) == 0
    ref = registry.push_layout(dst, "obd", "obd/big:1")
    rpull(lazy_stack, ref)
    cmd = ("run", "--rm", "--snapshotter", "overlaybd", ref)
    out = lazy_stack.ctr(*cmd, cname, "/bin/busybox", "sha256sum", "/data/big", timeout=600)
    assert out.stdout.split()[0] == want
    cached = sum(
        e.stat().st_blocks * 512 for e in os.scandir(lazy_stack.base / "cache") if not e.name.endswith(".meta")
    )
    assert cached >= 100 << 20  # the blocks read are on disk, not only in memory

    registry.stop()
    lazy_stack.kill_daemon()
    lazy_stack.start_daemon()
    lazy_stack.restart_snapshotter()
    out = lazy_stack.ctr(*cmd, cname + "b", "/bin/busybox", "sha256sum", "/data/big", check=False, timeout=600)
    assert out.returncode == 0 and out.stdout.split()[0] == want, (
        f"{out.stdout}\n{out.stderr}\n--- daemon ---\n{lazy_stack.log('daemon')[-4000:]}"
    )
