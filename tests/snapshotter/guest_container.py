"""Runs INSIDE the qemu guest (real configfs/TCMU/tcm_loop): a container whose rootfs is an overlaybd TCMU device.

Usage: python guest_container.py SCRATCH. Expects SCRATCH/obd.tar (an overlaybd image as an OCI layout tar,
made on the host by overlaybd-convert) and writes SCRATCH/results.json {check: "ok" | "FAIL ..."}.

Why this shape: the whole production stack runs here as separate processes, exactly as on a node —
overlaybd-tcmu (TCMU frontend), overlaybd-snapshotter (TcmuBackend) and the host's containerd 1.6, ctr
and runc (reached over the read-only 9p root). `ctr image import` unpacks the overlaybd layer blob
itself, which the snapshotter adopts as a local block layer; `ctr run` then gets that layer as a
/dev/sdX exported by tcm_loop, mounted read-only under the container's overlay. State lives on the
guest's tmpfs /tmp and /run (SQLite WAL and unix sockets do not work on 9p).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import traceback

S = sys.argv[1]
BIN = os.path.dirname(sys.executable)  # the checkout's .venv/bin (the guest runs it over 9p)
BASE = "/tmp/ctrvm"
RUN = "/run/ctrvm"
SOCK = f"{RUN}/containerd.sock"
SN_SOCK = f"{RUN}/snapshotter.sock"
SN_ROOT = f"{BASE}/snap"
IMAGE = "obd"  # the name overlaybd-convert gives the image in the layout (io.containerd.image.name)
HELLO = "hello from a tcmu device\n"
# what the container sees, then it waits to be killed (so the guest can look at its mounts meanwhile)
IN_CONTAINER = (
    "cat /etc/hello.txt && echo scribble > /etc/hello.txt && cat /etc/hello.txt && "
    "grep ' / ' /proc/self/mounts && echo READY && exec sleep 600"
)
TCMU_DEVS = "/sys/kernel/config/target/core/user_999999999/dev_*"
results: dict[str, str] = {}
procs: list[subprocess.Popen] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results[name] = "ok" if ok else f"FAIL {detail}"
    print(f"CHECK {name} {results[name]}", flush=True)


def sh(*cmd: str, check_rc: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(cmd)} -> {r.returncode}\n{r.stdout}{r.stderr}", flush=True)
    if check_rc and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
    return r


def ctr(*args: str, check_rc: bool = True) -> subprocess.CompletedProcess:
    return sh("ctr", "--address", SOCK, *args, check_rc=check_rc)


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > end:
            raise RuntimeError(f"{what} did not come up")
        time.sleep(0.2)


def start(name: str, cmd: list[str]) -> subprocess.Popen:
    log = open(f"{S}/{name}.log", "wb")  # lives as long as the process
    p = subprocess.Popen(cmd, stdout=log, stderr=log)
    procs.append(p)
    return p


def prepare_guest() -> None:
    """What a node's init would have done: kernel modules, configfs, cgroup2, devpts, shm, loopback."""
    for m in ("configfs", "target_core_mod", "target_core_user", "tcm_loop", "sd_mod", "ext4", "loop", "overlay"):
        sh("modprobe", m, check_rc=False)
    if not os.path.isdir("/sys/kernel/config/target"):
        sh("mount", "-t", "configfs", "none", "/sys/kernel/config")
    sh("mount", "-t", "cgroup2", "none", "/sys/fs/cgroup")
    os.makedirs("/dev/pts", exist_ok=True)
    sh("mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts", "/dev/pts")
    os.makedirs("/dev/shm", exist_ok=True)
    sh("mount", "-t", "tmpfs", "shm", "/dev/shm")
    sh("ip", "link", "set", "lo", "up")
    os.makedirs(BASE, exist_ok=True)
    os.makedirs(RUN, exist_ok=True)


def start_stack() -> None:
    with open(f"{BASE}/overlaybd.json", "w") as f:
        json.dump(
            {
                "logConfig": {"logLevel": 1, "logPath": f"{S}/overlaybd.log"},
                "cacheConfig": {"cacheType": "file", "cacheDir": f"{BASE}/cache", "cacheSizeGB": 1},
                "enableAudit": False,
            },
            f,
        )
    daemon = start(
        "daemon", [f"{BIN}/python", "-m", "overlaybd.cli.tcmu", f"{BASE}/overlaybd.json", "--frontend", "tcmu"]
    )
    wait_for(lambda: "ready" in open(f"{S}/daemon.log", errors="replace").read(), 120, "overlaybd-tcmu", daemon)

    with open(f"{BASE}/snapshotter.json", "w") as f:
        json.dump({"root": SN_ROOT, "address": SN_SOCK, "verbose": "debug"}, f)
    sn = start("snapshotter", [f"{BIN}/overlaybd-snapshotter", f"{BASE}/snapshotter.json"])
    wait_for(lambda: os.path.exists(SN_SOCK), 120, "overlaybd-snapshotter", sn)

    with open(f"{BASE}/containerd.toml", "w") as f:
        f.write(f"""version = 2
root = "{BASE}/root"
state = "{RUN}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{SOCK}"
[ttrpc]
  address = "{SOCK}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{BASE}/opt"
[plugins."io.containerd.gc.v1.scheduler"]
  mutation_threshold = 1000000
  deletion_threshold = 0
[proxy_plugins.overlaybd]
  type = "snapshot"
  address = "{SN_SOCK}"
""")
    cd = start("containerd", ["containerd", "--config", f"{BASE}/containerd.toml"])
    wait_for(
        lambda: (
            os.path.exists(SOCK)
            and subprocess.run(["ctr", "--address", SOCK, "version"], capture_output=True).returncode == 0
        ),
        120,
        "containerd",
        cd,
    )


def lower_mount_source(lowerdir: str) -> str:
    """The device mounted at `lowerdir` in the guest's mount table ('' if none)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            src, mp = line.split()[:2]
            if mp == lowerdir:
                return src
    return ""


def main() -> None:
    prepare_guest()
    start_stack()
    from overlaybd.snapshotter.device_backend import tcmu_available

    check("tcmu_available", tcmu_available())

    ctr("image", "import", "--snapshotter", "overlaybd", f"{S}/obd.tar")
    marks = glob.glob(f"{SN_ROOT}/snapshots/*/block/config.v1.json")
    check("local_layer_adopted", bool(marks), str(glob.glob(f"{SN_ROOT}/snapshots/*/*")))

    r = ctr("run", "--rm", "--snapshotter", "overlaybd", IMAGE, "c1", "/bin/cat", "/etc/hello.txt", check_rc=False)
    check("run_rm_output", r.returncode == 0 and r.stdout == HELLO, f"rc {r.returncode}: {r.stdout!r} {r.stderr}")

    # `ctr task exec` cannot be used here: the guest's mount namespace root is the initramfs (the stack runs
    # chrooted into the 9p host root), so runc's setns lands an exec'd process there, not in the container's
    # root. The container's own init is pivot_rooted correctly, so it reports what it sees and then waits.
    out_path = f"{BASE}/c2.out"
    with open(out_path, "wb") as out:
        c2 = subprocess.Popen(
            [
                "ctr",
                "--address",
                SOCK,
                "run",
                "--rm",
                "--snapshotter",
                "overlaybd",
                IMAGE,
                "c2",
                "/bin/sh",
                "-c",
                IN_CONTAINER,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    procs.append(c2)
    wait_for(lambda: "READY" in open(out_path, errors="replace").read(), 120, "container c2", c2)
    seen = open(out_path, errors="replace").read()
    print(f"container c2 saw:\n{seen}", flush=True)
    check("write_on_overlay", seen.startswith(HELLO + "scribble\n"), repr(seen))
    root = [ln for ln in seen.splitlines() if ln.split()[1:2] == ["/"]]
    opts = root[0].split()[3].split(",") if root else []
    lowers = [o[len("lowerdir=") :] for o in opts if o.startswith("lowerdir=")]
    check("rootfs_overlay", bool(root) and root[0].split()[2] == "overlay" and len(lowers) == 1, repr(seen))
    src = lower_mount_source(lowers[0].split(":")[0]) if lowers else ""
    print(f"container lowerdir {lowers} is mounted from {src!r}", flush=True)
    check("rootfs_from_scsi_device", src.startswith("/dev/sd"), f"lowerdir {lowers} mounted from {src!r}")
    sysfs = f"/sys/block/{os.path.basename(src)}/device/vendor" if src else ""
    vendor = open(sysfs).read().strip() if sysfs and os.path.exists(sysfs) else ""
    check("device_is_lio", vendor == "LIO-ORG", f"{sysfs}: {vendor!r}")
    check("tcmu_backstore", bool(glob.glob(TCMU_DEVS)), str(glob.glob(TCMU_DEVS)))
    ctr("task", "kill", "-s", "SIGKILL", "c2")
    c2.wait(120)
    check("container_removed", not ctr("container", "ls", "-q").stdout.split(), "c2 still listed")

    r = ctr("run", "--rm", "--snapshotter", "overlaybd", IMAGE, "c3", "/bin/cat", "/etc/hello.txt", check_rc=False)
    check("layer_unchanged", r.stdout == HELLO, f"{r.stdout!r} {r.stderr}")

    ctr("image", "rm", "--sync", IMAGE)
    for _ in range(150):  # GC removes the layer snapshots; their devices go with them
        if not glob.glob(TCMU_DEVS):
            break
        time.sleep(0.2)
    check("devices_detached", not glob.glob(TCMU_DEVS), str(glob.glob(TCMU_DEVS)))
    with open("/proc/self/mounts") as f:
        left = [ln for ln in f if SN_ROOT in ln]
    check("mounts_released", not left, str(left))


def stop_all() -> None:
    for p in reversed(procs):  # containerd, then the snapshotter, then the daemon
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        results["exception"] = traceback.format_exc()
        print(results["exception"], flush=True)
    finally:
        stop_all()
    with open(f"{S}/results.json", "w") as f:
        json.dump(results, f)
