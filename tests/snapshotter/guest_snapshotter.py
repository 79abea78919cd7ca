"""Runs INSIDE the qemu guest (real configfs/TCMU/tcm_loop): the snapshotter's TCMU device path.

Usage: python guest_snapshotter.py SCRATCH. Writes SCRATCH/results.json {check: "ok" | "FAIL ..."}.
Drives `Snapshotter` in-process (no containerd in the guest): a local overlaybd layer committed as
containerd would unpack it, a container snapshot on it (device attached through configfs + tcm_loop,
mounted read-only, overlay on top), a writable `dir` snapshot sealed by Commit, and removal detaching
every device.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
import traceback

S = sys.argv[1]
BIN = os.path.dirname(sys.executable)  # the checkout's .venv/bin (the guest runs it over 9p)
results: dict[str, str] = {}


def check(name: str, ok: bool, detail: str = "") -> None:
    results[name] = "ok" if ok else f"FAIL {detail}"
    print(f"CHECK {name} {results[name]}", flush=True)


def main() -> None:
    for m in ("configfs", "target_core_mod", "target_core_user", "tcm_loop", "overlay", "ext4"):
        subprocess.run(["modprobe", m], capture_output=True)
    if not os.path.isdir("/sys/kernel/config/target"):
        subprocess.run(["mount", "-t", "configfs", "none", "/sys/kernel/config"], check=True)
    with open(f"{S}/overlaybd.json", "w") as f:
        json.dump({"logConfig": {"logLevel": 1, "logPath": f"{S}/overlaybd.log"}, "enableAudit": False}, f)
    log = open(f"{S}/daemon.log", "wb")  # lives as long as the daemon
    daemon = subprocess.Popen(
        [f"{BIN}/python", "-m", "overlaybd.cli.tcmu", f"{S}/overlaybd.json", "--frontend", "tcmu"],
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 120
    while "ready" not in open(f"{S}/daemon.log", errors="replace").read():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("daemon did not become ready: " + open(f"{S}/daemon.log").read())
        time.sleep(0.2)

    from overlaybd.config.snapshotter import config_from_dict
    from overlaybd.snapshotter.device_backend import TcmuBackend, default_backend
    from overlaybd.snapshotter.service import Snapshotter

    root = "/tmp/snaproot"  # guest tmpfs: SQLite WAL needs shared memory, which 9p cannot map
    sn = Snapshotter(config_from_dict({"root": root, "address": f"{S}/sn.sock"}), default_backend(-1, ""))
    # the backend is chosen at each use (issue 10, start order): in this guest it must resolve to TCMU
    chosen = sn.devices.current() if hasattr(sn.devices, "current") else sn.devices
    check("tcmu_backend", isinstance(chosen, TcmuBackend), type(chosen).__name__)
    m = sn.prepare("a", "", {})
    shutil.copy(f"{S}/layer.commit", os.path.join(m[0].source, "overlaybd.commit"))
    sn.commit("A", "a", {})
    a = sn.stat("A")
    check("local_layer_adopted", os.path.exists(f"{root}/snapshots/{a.id}/block/config.v1.json"))

    m = sn.prepare("c", "A", {})
    lower = [o for o in m[0].options if o.startswith("lowerdir=")][0][len("lowerdir=") :]
    mark = open(f"{root}/snapshots/{a.id}/block/backstore_mark").read()
    check("scsi_device", mark.startswith("/dev/sd"), mark)
    check("ro_device_content", open(f"{lower}/etc/motd").read() == "lazy hello\n")
    naa = glob.glob("/sys/kernel/config/target/loopback/naa.199*")
    check("tcm_loop_naa", bool(naa), str(naa))

    m = sn.prepare("w", "A", {"containerd.io/snapshot/overlaybd.writable": "dir"})
    check("writable_bind", m[0].type == "bind" and m[0].source.endswith("/block/mountpoint"), str(m))
    with open(f"{m[0].source}/etc/guest-note", "w") as f:
        f.write("sealed in the guest\n")
    sn.commit("W", "w", {})
    w = sn.stat("W")
    check("sealed", os.path.exists(f"{root}/snapshots/{w.id}/fs/overlaybd.sealed"))
    m = sn.prepare("c2", "W", {})
    lower = [o for o in m[0].options if o.startswith("lowerdir=")][0][len("lowerdir=") :]
    check("sealed_content", open(f"{lower}/etc/guest-note").read() == "sealed in the guest\n")

    for key in ("c2", "W", "c", "A"):
        sn.remove(key)
    left = glob.glob("/sys/kernel/config/target/core/user_999999999/dev_*")
    check("devices_detached", not left, str(left))
    sn.close()
    daemon.terminate()
    daemon.wait(60)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        results["exception"] = traceback.format_exc()
        print(results["exception"], flush=True)
    with open(f"{S}/results.json", "w") as f:
        json.dump(results, f)
