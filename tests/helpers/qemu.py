"""A reusable qemu guest for tests that need a kernel the host lacks (configfs, TCMU, tcm_loop).

Boots Debian's kernel under TCG (-accel tcg -cpu max; KVM here is nested PVM and cannot run it)
with a busybox-static initramfs. The guest root is the *host's* root filesystem shared read-only
over 9p, so the guest runs the very same <repo>/.venv python and the host's kmod/util-linux/
e2fsprogs, and modprobe finds the kernel's modules in the host's /lib/modules. A second 9p share,
writable, is the test's scratch dir (test images, writable layers, outputs), mounted at the same
path as on the host. Commands run as one shell script per boot; its output and exit code come
back through files in the scratch share (the serial console is kept as a log for diagnosis).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout whose .venv the guest runs


def installed_kernel() -> str:
    """The newest installed kernel that has its modules: /boot/vmlinuz-V with /lib/modules/V (or $OVERLAYBD_VM_KVER).

    Never a pinned version: Debian's linux-image-amd64 moves to a new ABI (6.1.0-56 -> -57 ...) and a pin
    would silently skip every VM test on a fresh machine.
    """
    forced = os.environ.get("OVERLAYBD_VM_KVER")
    if forced:
        return forced
    found = [
        p.name.removeprefix("vmlinuz-")
        for p in Path("/boot").glob("vmlinuz-*")
        if (Path("/lib/modules") / p.name.removeprefix("vmlinuz-") / "modules.dep").exists()
    ]
    if not found:
        return "none-installed"
    return max(found, key=_version_key)


def _version_key(kver: str) -> tuple[tuple[int, int, str], ...]:
    """Order kernel versions numerically part by part (6.1.0-57 after 6.1.0-9)."""
    import re

    return tuple((0, int(n), "") if n.isdigit() else (1, 0, n) for n in re.split(r"[.\-+]", kver))


KVER = installed_kernel()
KERNEL = Path(f"/boot/vmlinuz-{KVER}")
MODULE_DIR = Path(f"/lib/modules/{KVER}")
BUSYBOX = Path("/bin/busybox")
# only what is needed before the host root is reachable; the rest is modprobed from the host root
EARLY_MODULES = ["virtio_pci", "virtio_blk", "9pnet_virtio", "9p"]

INIT = r"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko 2>/dev/null; done
S=$(cat /scratch.path)
R=$(cat /repo.path)
mkdir -p /host /hostro
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host || echo "VM: no hostroot"
mount --bind /host /hostro
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mount -t tmpfs tmpfs /host/tmp
mount -t tmpfs tmpfs /host/run
# the checkout (and its .venv) may live under /tmp or /run, now hidden by the tmpfs: show it again
mkdir -p /host$R && mount --bind /hostro$R /host$R
mkdir -p /host$S
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 scratch /host$S || echo "VM: no scratch"
echo "VM: running script"
chroot /host /usr/bin/env -i PATH=$R/.venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  /bin/sh -c "cd $S && /bin/sh $S/guest-script.sh > $S/guest-output.log 2>&1; echo \$? > $S/guest-rc"
sync
echo "VM: done"
poweroff -f
"""


def qemu_cmd(initrd: Path, append: str, *, cpus: int, memory_mb: int, kernel: Path = KERNEL) -> list[str]:
    """qemu-system-x86_64 under TCG booting `kernel` + `initrd` with the serial console on stdio, no reboot
    (a guest reboot ends qemu); the caller adds its disks, shares and network."""
    return [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        str(cpus),
        "-m",
        str(memory_mb),
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        append,
    ]


def run_qemu(cmd: list[str], console_log: Path, timeout: float) -> int | None:
    """Run qemu with its console (stdout and stderr) to console_log; its exit code, or None when it was
    still running at `timeout` and was killed."""
    with open(console_log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None


class VmError(RuntimeError):
    """The guest did not boot or did not finish in time; carries the console log."""


@dataclass
class GuestResult:
    rc: int
    output: str
    console: str


def module_closure(names: list[str], kver: str = KVER) -> list[Path]:
    """Modules plus their `depends` closure, dependencies first (the order insmod needs)."""
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        deps = subprocess.run(
            ["modinfo", "-k", kver, "-F", "depends", name], capture_output=True, text=True, check=True
        ).stdout.strip()
        for d in filter(None, deps.split(",")):
            visit(d)
        path = subprocess.run(
            ["modinfo", "-k", kver, "-n", name], capture_output=True, text=True, check=True
        ).stdout.strip()
        if path.startswith("/"):
            order.append(Path(path))

    for n in names:
        visit(n)
    return order


def build_initramfs(out: Path, scratch: str) -> Path:
    """busybox-static + early modules + /init, as a gzip'd newc cpio (about 1 s)."""
    root = out.with_suffix(".root")
    if root.exists():
        shutil.rmtree(root)
    for d in ("bin", "sbin", "proc", "sys", "dev", "modules", "usr/bin", "usr/sbin", "host"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        p = root / a
        if p.name == "busybox" or p.exists():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to("/bin/busybox")
    names = []
    for ko in module_closure(EARLY_MODULES):
        data = ko.read_bytes()
        if ko.suffix == ".xz" or ko.suffix == ".zst":
            raise VmError(f"{ko}: compressed modules not supported by this harness")
        name = ko.name.removesuffix(".ko")
        (root / "modules" / f"{name}.ko").write_bytes(data)
        names.append(name)
    (root / "modules.order").write_text("\n".join(names) + "\n")
    (root / "scratch.path").write_text(scratch + "\n")
    (root / "repo.path").write_text(str(REPO) + "\n")
    init = root / "init"
    init.write_text(INIT)
    init.chmod(0o755)
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, capture_output=True, check=True
    ).stdout
    out.write_bytes(gzip.compress(cpio, 6))
    shutil.rmtree(root)
    return out


class Guest:
    """Boot-per-script qemu guest over a scratch dir shared with the host."""

    def __init__(self, scratch: Path, work: Path, *, memory_mb: int = 1536, cpus: int = 2):
        self.scratch = scratch.resolve()
        self.work = work
        self.memory_mb = memory_mb
        self.cpus = cpus
        key = hashlib.sha256((INIT + str(self.scratch) + str(REPO) + KVER).encode()).hexdigest()[:12]
        self.initrd = work / f"initramfs-{key}.cpio.gz"
        if not self.initrd.exists():
            build_initramfs(self.initrd, str(self.scratch))
        self.boots = 0

    @staticmethod
    def available() -> str | None:
        """Why a guest cannot run here, or None."""
        if not KERNEL.exists():
            return f"{KERNEL} missing (apt-get install linux-image-amd64)"
        if not shutil.which("qemu-system-x86_64"):
            return "qemu-system-x86_64 missing"
        if not BUSYBOX.exists():
            return f"{BUSYBOX} missing (busybox-static)"
        return None

    def run(self, script: str, *, timeout: float = 600, disks: list[Path] | None = None) -> GuestResult:
        """Boot, run `script` with /bin/sh in the guest (cwd = scratch), power off; returns rc + output."""
        for f in ("guest-output.log", "guest-rc"):
            (self.scratch / f).unlink(missing_ok=True)
        (self.scratch / "guest-script.sh").write_text(script)
        console_path = self.work / f"console-{self.boots}.log"
        self.boots += 1
        cmd = qemu_cmd(self.initrd, "console=ttyS0 panic=-1 loglevel=4 quiet", cpus=self.cpus, memory_mb=self.memory_mb)
        cmd += [
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={self.scratch},mount_tag=scratch,security_model=none,multidevs=remap",
        ]
        for d in disks or []:
            cmd += ["-drive", f"file={d},format=raw,if=virtio,cache=none,aio=threads"]
        start = time.monotonic()
        qemu_rc = run_qemu(cmd, console_path, timeout)
        if qemu_rc is None:
            tail = console_path.read_text(errors="replace")[-4000:]
            raise VmError(f"guest timed out after {timeout}s; console:\n{tail}")
        log = console_path.read_text(errors="replace")
        rc_file = self.scratch / "guest-rc"
        if not rc_file.exists():
            raise VmError(f"guest script did not finish (qemu rc {qemu_rc}); console:\n{log[-4000:]}")
        out = (self.scratch / "guest-output.log").read_text(errors="replace")
        self.last_seconds = time.monotonic() - start
        return GuestResult(int(rc_file.read_text().strip() or -1), out, log)
