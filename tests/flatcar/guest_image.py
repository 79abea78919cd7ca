"""The systemd guest of the `flatcar` tier: a cached Debian 13 (trixie) root, a per-run ext4 disk, qemu boots.

Why Debian 13: it has the systemd (257) and glibc (2.41) of current Flatcar releases, so systemd-sysext,
`Upholds=`, `EXTENSION_RELOAD_MANAGER=1` and the frozen bundle behave as they do on a Flatcar host; its
os-release is replaced by a Flatcar one. The root is built once by debootstrap and cached under a key of
its package list and setup (rebuilt automatically when missing, e.g. in CI on a fresh machine). Each run
copies it, adds the host's kernel modules (trimmed), the test files and the Ignition result, and packs an
ext4 image with `mkfs.ext4 -d` (no loop mount). The guest boots the host's installed Debian kernel and
initrd under TCG (KVM here is nested PVM and cannot run a stock kernel); nothing connects it to the host
network: results come back through the disk itself, read with debugfs after poweroff.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from helpers.qemu import installed_kernel, qemu_cmd, run_qemu

REPO = Path(__file__).resolve().parents[2]
SUITE = "trixie"
MIRROR = os.environ.get("OVERLAYBD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the guest needs: systemd + systemd-sysext (systemd), systemd-sysupdate (systemd-container),
# containerd/runc/ctr, the in-guest registry, curl for the update-server checks, busybox for httpd.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "systemd-container",
    "udev",
    "kmod",
    "dbus",
    "containerd",
    "runc",
    "docker-registry",
    "curl",
    "e2fsprogs",
    "util-linux",
    "busybox",
    "ca-certificates",
)
# Bump when the base setup below changes, so cached roots are rebuilt.
BASE_SETUP_VERSION = "3"
CACHE_ROOT = Path(os.environ.get("OVERLAYBD_FLATCAR_CACHE", REPO / "build" / "flatcar-guest"))
# Kernel modules the scenarios load; their `depends` closure is copied (plus modules.builtin*).
GUEST_MODULES = (
    "target_core_user",
    "tcm_loop",
    "target_core_mod",
    "target_core_iblock",
    "target_core_file",
    "target_core_pscsi",
    "configfs",
    "uio",
    "loop",
    "overlay",
    "erofs",
    "squashfs",
    "fuse",
    "ext4",
    "sd_mod",
    "sg",
    "virtio_blk",
    "virtio_pci",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "9p",
    "9pnet_virtio",
    "dm_mod",
    "dm_verity",
    "autofs4",
    "nls_utf8",
    "crc32c_generic",
    "veth",
    "bridge",
)
# Units a minimal test guest does not need (timers would only steal TCG cycles).
MASKED = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
    "systemd-networkd-wait-online.service",
)
KVER = installed_kernel()
KERNEL = Path(f"/boot/vmlinuz-{KVER}")
INITRD = Path(f"/boot/initrd.img-{KVER}")


class GuestError(RuntimeError):
    """The guest could not be built or booted; carries the log that says why."""


def unavailable() -> str | None:
    """Why this tier cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mkfs.ext4 -d of a root-owned tree)"
    for tool in ("debootstrap", "qemu-system-x86_64", "mkfs.ext4", "debugfs", "modinfo", "depmod"):
        if not shutil.which(tool):
            return f"{tool} missing (.ci/install-deps installs it)"
    if not KERNEL.exists() or not INITRD.exists():
        return f"no installed kernel with initrd ({KERNEL}, {INITRD}): apt-get install linux-image-amd64"
    return None


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    """subprocess.run with captured text output; raises GuestError with the output on failure."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    res = subprocess.run(cmd, check=False, **kw)
    if res.returncode != 0:
        raise GuestError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def base_key() -> str:
    """Cache key of the debootstrap root: suite, mirror-independent package list and setup version."""
    text = "\n".join([SUITE, BASE_SETUP_VERSION, *PACKAGES, *MASKED])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_root() -> Path:
    """The cached trixie root (built by debootstrap when missing); never modified after it is complete."""
    d = CACHE_ROOT / f"trixie-{base_key()}"
    root = d / "root"
    if (d / "complete").exists():
        return root
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    debs = CACHE_ROOT / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--cache-dir={debs}",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(root),
                MIRROR,
            ],
            timeout=1800,
        )
    except (GuestError, subprocess.TimeoutExpired) as e:
        raise GuestError(f"debootstrap of the {SUITE} guest failed (needs Debian's mirror): {e}") from None
    _setup_base(root)
    (d / "build-seconds").write_text(f"{time.monotonic() - start:.1f}\n")
    (d / "complete").write_text(base_key() + "\n")
    for old in CACHE_ROOT.glob("trixie-*"):
        if old != d:
            shutil.rmtree(old, ignore_errors=True)
    return root


def _setup_base(root: Path) -> None:
    """Boot setup that does not depend on the run: fstab, root login, masked timers, a smaller tree."""
    (root / "etc/fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
    (root / "etc/hostname").write_text("flatcar-guest\n")
    run(["chroot", str(root), "passwd", "-d", "root"])
    for unit in MASKED:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for d in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "var/lib/apt/lists"):
        shutil.rmtree(root / d, ignore_errors=True)
        (root / d).mkdir(parents=True, exist_ok=True)
    for p in (root / "var/cache/apt").glob("*.bin"):
        p.unlink()
    # The in-guest registry and containerd start only when a scenario wants them.
    for unit in ("docker-registry.service",):
        (root / "etc/systemd/system/multi-user.target.wants" / unit).unlink(missing_ok=True)


def module_closure(names: tuple[str, ...]) -> list[Path]:
    """Module files of `names` plus their dependencies and softdeps, from the kernel's modules.dep."""
    base = Path(f"/lib/modules/{KVER}")
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        deps[name] = (path, [Path(d).name.split(".ko")[0].replace("-", "_") for d in rest.split()])
    soft: dict[str, list[str]] = {}
    softfile = base / "modules.softdep"
    for line in softfile.read_text().splitlines() if softfile.exists() else []:
        parts = line.split()
        if len(parts) > 2 and parts[0] == "softdep":
            soft[parts[1].replace("-", "_")] = [w.replace("-", "_") for w in parts[2:] if not w.endswith(":")]
    found: dict[str, str] = {}
    todo = [n.replace("-", "_") for n in names]
    while todo:
        name = todo.pop()
        if name in found or name not in deps:
            continue  # done, built in, or not in this kernel
        path, needs = deps[name]
        found[name] = path
        todo.extend(needs)
        todo.extend(soft.get(name, []))
    return sorted(base / p for p in found.values())


def install_modules(root: Path) -> None:
    """Copy the trimmed module set of the host kernel into the guest and index it with depmod."""
    src = Path(f"/lib/modules/{KVER}")
    dst = root / "lib/modules" / KVER
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.glob("modules.builtin*"):
        shutil.copy2(f, dst / f.name)
    shutil.copy2(src / "modules.order", dst / "modules.order")
    for ko in module_closure(GUEST_MODULES):
        target = dst / ko.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ko, target)
    run(["depmod", "-b", str(root), KVER])


def os_release(version: str) -> str:
    """A Flatcar /usr/lib/os-release (the fields systemd-sysext and the update scripts read), per release."""
    return (
        'NAME="Flatcar Container Linux by Kinvolk"\n'
        "ID=flatcar\n"
        "ID_LIKE=coreos\n"
        f"VERSION={version}\n"
        f"VERSION_ID={version}\n"
        f"BUILD_ID=obd-test-{version}\n"
        "SYSEXT_LEVEL=1.0\n"
        f'PRETTY_NAME="Flatcar Container Linux by Kinvolk {version} (obd test guest)"\n'
        'ANSI_COLOR="38;5;75"\n'
        'HOME_URL="https://flatcar.org/"\n'
        "FLATCAR_BOARD=amd64-usr\n"
        'CPE_NAME="cpe:2.3:o:flatcar-linux:flatcar_linux:' + version + ':*:*:*:*:*:*:*"\n'
    )


def stage_root(dest: Path) -> Path:
    """A writable copy of the cached base root at dest (with this run's kernel modules)."""
    base = base_root()
    if dest.exists():
        shutil.rmtree(dest)
    run(["cp", "-a", "--sparse=always", str(base), str(dest)])
    install_modules(dest)
    return dest


def make_disk(root: Path, image: Path, size: str = "4G") -> Path:
    """Pack the staged root into an ext4 image (mkfs.ext4 -d: no mount, no loop device)."""
    image.unlink(missing_ok=True)
    run(["truncate", "-s", size, str(image)])
    run(["mkfs.ext4", "-q", "-F", "-L", "ROOT", "-E", "root_owner=0:0", "-d", str(root), str(image)], timeout=600)
    return image


def read_dir(image: Path, guest_dir: str, dest: Path) -> Path:
    """Copy a directory out of the (powered-off) guest disk with debugfs rdump."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    run(["debugfs", "-R", f"rdump {guest_dir} {dest}", str(image)], timeout=120)
    return dest / Path(guest_dir).name


@dataclass
class Boot:
    """One boot of the guest: how it ended and its serial console."""

    rc: int
    seconds: float
    console: str


def boot(image: Path, console_log: Path, *, timeout: float = 900, memory_mb: int = 2048) -> Boot:
    """Boot the disk once (systemd, no network), wait until the guest powers off or reboots (-no-reboot)."""
    append = (
        "console=ttyS0 root=/dev/vda rw panic=-1 quiet loglevel=4 systemd.show_status=error "
        "systemd.journald.forward_to_console=0 net.ifnames=0"
    )
    cmd = qemu_cmd(INITRD, append, cpus=2, memory_mb=memory_mb, kernel=KERNEL)
    cmd += ["-nic", "none", "-drive", f"file={image},format=raw,if=virtio,cache=unsafe"]
    start = time.monotonic()
    rc = run_qemu(cmd, console_log, timeout)
    if rc is None:
        tail = console_log.read_text(errors="replace")[-5000:]
        raise GuestError(f"guest did not power off within {timeout:.0f}s; console:\n{tail}")
    return Boot(rc, time.monotonic() - start, console_log.read_text(errors="replace"))
