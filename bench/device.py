#!/usr/bin/env python3
"""Device frontends vs a plain block device, measured in the same run (ratios, not absolute numbers).

  host : FUSE frontend (+ loop) over an overlaybd image  vs  a plain loop device on a raw file
  guest: TCMU device (tcm_loop /dev/sdX) in a qemu TCG guest  vs  a plain virtio disk in that guest

Workloads (fio, O_DIRECT, libaio): sequential 1 MiB reads; random 4 KiB reads at iodepth 1 and 32.
Both sides hold the same bytes: DATA_MIB of random data written through the image layer into a
writable layer and committed with overlaybd-commit (so the overlaybd side reads a real LSMT layer).

Usage: .venv/bin/python bench/device.py [--host] [--guest] [--mib N] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
sys.path.insert(0, str(REPO / "tests"))

JOBS = [
    ("seq-1M", ["--rw=read", "--bs=1M", "--iodepth=4"]),
    ("rand-4K-qd1", ["--rw=randread", "--bs=4k", "--iodepth=1"]),
    ("rand-4K-qd32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
]


def fio(dev: str, args: list[str], seconds: int, fio_bin: str = "fio") -> dict:
    cmd = [
        fio_bin,
        "--name=b",
        f"--filename={dev}",
        "--direct=1",
        "--ioengine=libaio",
        "--readonly",
        f"--runtime={seconds}",
        "--time_based",
        "--output-format=json",
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    read = json.loads(out[out.index("{") :])["jobs"][0]["read"]
    return {"MBps": read["bw_bytes"] / 1e6, "iops": read["iops"]}


def make_image(work: Path, mib: int) -> tuple[Path, Path]:
    """A committed LSMT layer with `mib` MiB of random data, and the same bytes as a raw file."""
    from overlaybd.image import open_image

    raw = work / "raw.img"
    data, index = work / "up.data", work / "up.index"
    subprocess.run([str(BIN / "overlaybd-create"), str(data), str(index), f"{mib}MiB"], check=True)
    cfg = work / "rw.json"
    cfg.write_text(json.dumps({"lowers": [], "upper": {"data": str(data), "index": str(index)}}))
    img = open_image(str(cfg))
    with open(raw, "wb") as f:
        for i in range(mib):
            chunk = os.urandom(1 << 20)
            f.write(chunk)
            img.pwrite(chunk, i << 20)
    img.fsync()
    img.close()
    commit = work / "layer.commit"
    subprocess.run([str(BIN / "overlaybd-commit"), str(data), str(index), str(commit)], check=True)
    data.unlink()
    index.unlink()
    return commit, raw


def drop_caches() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)


def report(title: str, ours: str, ref: str, rows: dict[str, tuple[dict, dict]]) -> None:
    print(f"\n{title}: {ours} vs {ref}")
    print(f"{'workload':<14} {ours + ' MB/s':>16} {ref + ' MB/s':>16} {'iops ratio':>11}")
    for name, (a, b) in rows.items():
        print(f"{name:<14} {a['MBps']:>16.1f} {b['MBps']:>16.1f} {a['iops'] / max(b['iops'], 1e-9):>11.2f}")


def bench_host(work: Path, commit: Path, raw: Path, seconds: int) -> None:
    from overlaybd.fuse.control import FuseFrontend
    from overlaybd.host import loop
    from overlaybd.image.frontend import default_opener

    cfg = work / "ro.json"
    cfg.write_text(json.dumps({"lowers": [{"file": str(commit)}]}))
    fe = FuseFrontend(default_opener(None), socket_path=str(work / "fuse.sock"), run_dir=str(work / "run"))
    dev = fe.attach(str(cfg), "bench", read_only=True)
    plain = loop.attach(str(raw), read_only=True)
    rows = {}
    try:
        for name, args in JOBS:
            drop_caches()
            a = fio(dev.device, args, seconds)
            drop_caches()
            b = fio(plain, args, seconds)
            rows[name] = (a, b)
    finally:
        loop.detach(plain)
        fe.shutdown()
    report("host", "fuse+loop", "plain loop", rows)


GUEST_SCRIPT = r"""
set -e
S={scratch}
for m in configfs target_core_mod target_core_user tcm_loop; do modprobe $m; done
[ -d /sys/kernel/config/target ] || mount -t configfs none /sys/kernel/config
echo '{{"logConfig": {{"logLevel": 1, "logPath": "'$S'/overlaybd.log"}}}}' > $S/overlaybd.json
overlaybd-tcmu $S/overlaybd.json > $S/daemon.log 2>&1 &
DAEMON=$!
for i in $(seq 600); do grep -q "tcmu: ready" $S/daemon.log && break; sleep 0.2; done
python - <<'EOF'
import json, subprocess
from overlaybd.tcmu import configfs
dev = configfs.create_backstore("dev_9", "{scratch}/ro.json", "9") and configfs.attach_loop("dev_9")
open("{scratch}/tcmu.dev", "w").write(dev)
EOF
DEV=$(cat $S/tcmu.dev)
python {scratch}/bench_device.py --guest-inner $DEV /dev/vda {seconds} > $S/guest-bench.json
python - <<'EOF'
from overlaybd.tcmu import configfs
configfs.detach_loop("dev_9"); configfs.remove_backstore("dev_9")
EOF
kill $DAEMON; wait $DAEMON || true
"""


def bench_guest(work: Path, commit: Path, raw: Path, seconds: int) -> None:
    from helpers.qemu import Guest

    why = Guest.available()
    if why:
        print(f"guest: skipped ({why})")
        return
    scratch = work / "scratch"
    scratch.mkdir()
    shutil.copy(commit, scratch / "layer.commit")
    (scratch / "ro.json").write_text(json.dumps({"lowers": [{"file": str(scratch / "layer.commit")}]}))
    shutil.copy(__file__, scratch / "bench_device.py")
    g = Guest(scratch, work)
    r = g.run(GUEST_SCRIPT.format(scratch=scratch, seconds=seconds), timeout=1800, disks=[raw])
    out = scratch / "guest-bench.json"
    if r.rc != 0 or not out.exists():
        print(f"guest: failed rc {r.rc}\n{r.output[-3000:]}")
        return
    rows = {k: tuple(v) for k, v in json.loads(out.read_text()).items()}
    report("guest (TCG, numbers only comparable within this table)", "tcmu", "virtio", rows)


def guest_inner(dev: str, ref: str, seconds: int) -> None:
    """Runs in the guest: fio on both devices, JSON to stdout."""
    rows = {}
    for name, args in JOBS:
        drop_caches()
        a = fio(dev, args, seconds)
        drop_caches()
        b = fio(ref, args, seconds)
        rows[name] = (a, b)
    print(json.dumps(rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", action="store_true")
    p.add_argument("--guest", action="store_true")
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--guest-inner", nargs=3, metavar=("DEV", "REF", "SECONDS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.guest_inner:
        guest_inner(a.guest_inner[0], a.guest_inner[1], int(a.guest_inner[2]))
        return 0
    if os.geteuid() != 0:
        print("needs root (loop devices, FUSE mounts, drop_caches)", file=sys.stderr)
        return 2
    both = not (a.host or a.guest)
    with tempfile.TemporaryDirectory(prefix="obd-bench-") as d:
        work = Path(d)
        commit, raw = make_image(work, a.mib)
        if a.host or both:
            bench_host(work, commit, raw, a.seconds)
        if a.guest or both:
            bench_guest(work, commit, raw, a.seconds)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
