"""Runs INSIDE the qemu guest (real kernel with target_core_user): the TCMU end-to-end scenario.

Prints one `CHECK <name> ok|FAIL <detail>` line per check and writes results.json to the scratch
dir; the host-side test asserts on those. Files prepared by the host test are in the scratch dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback

from overlaybd.tcmu import configfs

S = sys.argv[1]
BIN = os.path.dirname(sys.executable)  # the checkout's .venv/bin (the guest runs it over 9p)
DAEMON = sys.argv[2] if len(sys.argv) > 2 else f"{BIN}/overlaybd-tcmu"  # e.g. the frozen bundle's
QUICK = len(sys.argv) > 3 and sys.argv[3] == "quick"  # only the read-only vector part
BLOB = bytes((7 * i + 3) & 255 for i in range(20000))
CMP_BYTES = 64 << 20  # the ext4 metadata and files; the rest of the 1 GiB is unmapped
results: dict[str, str] = {}


def check(name: str, ok: bool, detail: str = "") -> bool:
    results[name] = "ok" if ok else f"FAIL {detail}"
    print(f"CHECK {name} {results[name]}", flush=True)
    return ok


def sh(*cmd: str, check_rc: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check_rc and r.returncode != 0:
        raise RuntimeError(f"{cmd}: rc {r.returncode}: {r.stderr.strip()}")
    return r


class Daemon:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(f"{S}/daemon-{self.starts}.log", "wb")  # lives as long as the daemon
        self.proc = subprocess.Popen([DAEMON, f"{S}/overlaybd.json"], stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = open(f"{S}/daemon-{self.starts}.log", errors="replace").read()
            if "tcmu: ready" in text:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {text}")
            time.sleep(0.2)
        raise RuntimeError("daemon not ready")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)


def config(name: str, lowers: list[str], upper: tuple[str, str] | None = None) -> str:
    cfg: dict = {"lowers": [{"file": f} for f in lowers], "resultFile": f"{S}/{name}.result"}
    if upper:
        cfg["upper"] = {"data": upper[0], "index": upper[1]}
    path = f"{S}/{name}.json"
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def attach(dev: str, cfg: str, dev_id: str) -> str:
    configfs.create_backstore(dev, cfg, dev_id)
    return configfs.attach_loop(dev)


def detach(dev: str) -> None:
    configfs.detach_loop(dev)
    configfs.remove_backstore(dev)


def mount(blk: str, opts: str) -> str:
    mnt = f"{S}/mnt"
    os.makedirs(mnt, exist_ok=True)
    sh("mount", "-t", "ext4", "-o", opts, blk, mnt)
    return mnt


def main() -> None:
    # no udev and the kernel's request_module runs the initramfs' modprobe: load what we use
    for m in ("configfs", "target_core_mod", "target_core_user", "tcm_loop", "sd_mod", "ext4"):
        sh("modprobe", m)
    if not os.path.isdir("/sys/kernel/config/target"):
        sh("mount", "-t", "configfs", "none", "/sys/kernel/config")
    with open(f"{S}/overlaybd.json", "w") as f:
        json.dump({"logConfig": {"logLevel": 1, "logPath": f"{S}/overlaybd.log"}}, f)
    d = Daemon()
    d.start()
    check("frontend_tcmu", "frontend: tcmu" in open(f"{S}/daemon-1.log").read())
    ap = f"{S}/ap.commit"

    # 1. read-only vector image
    blk = attach("dev_1", config("vec", [ap]), "1")
    check("attach_ro", blk.startswith("/dev/sd"), blk)
    check("result_success", open(f"{S}/vec.result").read() == "success")
    r = sh("cmp", "-n", str(CMP_BYTES), blk, f"{S}/vec.dump", check_rc=False)
    check("cmp_dump", r.returncode == 0, r.stdout + r.stderr)
    check("ro_flag", sh("blockdev", "--getro", blk).stdout.strip() == "1")
    check("size", sh("blockdev", "--getsize64", blk).stdout.strip() == str(1 << 30))
    mnt = mount(blk, "ro,noload")
    check("hello", open(f"{mnt}/etc/hello.txt", "rb").read() == b"hello overlaybd\n")
    check("blob", open(f"{mnt}/bin/blob", "rb").read() == BLOB)
    sh("umount", mnt)
    detach("dev_1")
    check(
        "detached",
        not os.path.exists(blk) or not os.path.exists(configfs.backstore_path(configfs.DEFAULT_HBA, "dev_1")),
    )

    if QUICK:
        check("daemon_stops", d.stop() == 0)
        return

    # 2. a config that cannot be opened fails the enable and says why in resultFile
    try:
        configfs.create_backstore("dev_2", config("bad", [f"{S}/missing.commit"]), "2")
        check("bad_enable_fails", False, "enable succeeded")
    except configfs.ConfigfsError as e:
        check("bad_enable_fails", "enable" in str(e), str(e))
    check("bad_result", open(f"{S}/bad.result").read().startswith("failed:"))
    configfs.remove_backstore("dev_2")

    # 3. writable upper: write, crash the daemon, recover, commit, re-open
    rw_cfg = config("rw", [ap], (f"{S}/upper.data", f"{S}/upper.index"))
    blk = attach("dev_3", rw_cfg, "3")
    check("rw_flag", sh("blockdev", "--getro", blk).stdout.strip() == "0")
    mnt = mount(blk, "rw,discard")
    payload = bytes(range(256)) * 4096
    with open(f"{mnt}/etc/new.bin", "wb") as f:
        f.write(payload)
    with open(f"{mnt}/scratch.bin", "wb") as f:
        f.write(os.urandom(4 << 20))
    sh("sync")
    os.unlink(f"{mnt}/scratch.bin")
    r = sh("fstrim", "-v", mnt, check_rc=False)
    check("fstrim", r.returncode == 0, r.stderr)
    # crash: SIGKILL, then a read queued while no daemon runs completes after the restart
    d.stop(signal.SIGKILL)
    sh("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
    reader = subprocess.Popen(
        ["dd", f"if={blk}", "of=/dev/null", "bs=1M", "count=4", "skip=300", "iflag=direct"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(2)
    check("read_waits_for_daemon", reader.poll() is None, f"dd rc {reader.poll()}")
    d.start()
    check("recovered", "recovered uio" in open(f"{S}/daemon-2.log").read())
    try:
        rc = reader.wait(120)
    except subprocess.TimeoutExpired:
        reader.kill()
        rc = -1
    check("inflight_read_completes", rc == 0, reader.stderr.read().decode() if reader.stderr else "")
    with open(f"{mnt}/etc/after-restart.txt", "w") as f:
        f.write("written after recovery\n")
    sh("sync")
    sh("umount", mnt)
    detach("dev_3")
    r = sh(f"{BIN}/overlaybd-commit", f"{S}/upper.data", f"{S}/upper.index", f"{S}/upper.commit", check_rc=False)
    check("commit", r.returncode == 0, r.stderr)
    blk = attach("dev_4", config("reopen", [ap, f"{S}/upper.commit"]), "4")
    mnt = mount(blk, "ro,noload")
    check("reopen_new", open(f"{mnt}/etc/new.bin", "rb").read() == payload)
    check("reopen_after_restart", open(f"{mnt}/etc/after-restart.txt").read() == "written after recovery\n")
    check("reopen_deleted", not os.path.exists(f"{mnt}/scratch.bin"))
    check("reopen_hello", open(f"{mnt}/etc/hello.txt", "rb").read() == b"hello overlaybd\n")
    sh("umount", mnt)
    detach("dev_4")

    # 4. blkdiscard on a writable-only image reads back zeros (UNMAP / WRITE SAME path)
    blk = attach("dev_5", config("blank", [], (f"{S}/blank.data", f"{S}/blank.index")), "5")
    data = os.urandom(4 << 20)
    with open(f"{S}/pattern", "wb") as f:
        f.write(data)
    sh("dd", f"if={S}/pattern", f"of={blk}", "bs=1M", "oflag=direct")
    r = sh("blkdiscard", "-o", str(1 << 20), "-l", str(1 << 20), blk, check_rc=False)
    check("blkdiscard", r.returncode == 0, r.stderr)
    with open(blk, "rb", buffering=0) as f:
        got = f.read(4 << 20)
    check("discarded_zero", got[1 << 20 : 2 << 20] == bytes(1 << 20))
    check("rest_kept", got[: 1 << 20] == data[: 1 << 20] and got[2 << 20 :] == data[2 << 20 :])
    detach("dev_5")
    check("daemon_stops", d.stop() == 0)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        results["exception"] = traceback.format_exc()
    with open(f"{S}/results.json", "w") as f:
        json.dump(results, f, indent=1)
    print("GUEST DONE")
