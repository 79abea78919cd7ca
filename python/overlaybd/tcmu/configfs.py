"""LIO configfs: TCMU backstores (core/user_<hba>/<dev>) and tcm_loop LUNs that turn them into /dev/sdX.

One function per configfs sequence; paths are parameters so tests can run against a scratch tree.
The snapshotter's dev/dir modes use `create_backstore` + `attach_loop`; the daemon uses `scan`.
"""

from __future__ import annotations

import errno
import glob
import os
import subprocess
import time
from dataclasses import dataclass

CONFIGFS = "/sys/kernel/config/target"
SUBTYPE = "overlaybd"
DEFAULT_HBA = 999999999


class ConfigfsError(RuntimeError):
    """A configfs step failed; the message names the path."""


@dataclass
class CfgString:
    """`tcm-user/<hba>/<dev>/overlaybd/<config path>[;<dev_id>]` split into its parts."""

    hba: str
    dev: str
    subtype: str
    config_path: str
    dev_id: str


def parse_uio_name(name: str) -> CfgString | None:
    """Parse a TCMU uio name; None if it is not a tcm-user device."""
    parts = name.split("/", 3)
    if len(parts) != 4 or parts[0] != "tcm-user":
        return None
    _, hba, dev, cfg = parts
    subtype, _, rest = cfg.partition("/")
    config, _, dev_id = rest.partition(";")
    return CfgString(hba, dev, subtype, config, dev_id)


def _write(path: str, value: str, retries: int = 0) -> None:
    for attempt in range(retries + 1):
        try:
            with open(path, "w") as f:
                f.write(value)
            return
        except OSError as e:
            if e.errno == errno.EAGAIN and attempt < retries:
                time.sleep(0.05)
                continue
            raise ConfigfsError(f"{path}: write {value!r}: {e.strerror}") from e


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def backstore_path(hba: int | str, dev: str, root: str = CONFIGFS) -> str:
    return f"{root}/core/user_{hba}/{dev}"


def create_backstore(
    dev: str,
    config_path: str,
    dev_id: str = "",
    *,
    hba: int | str = DEFAULT_HBA,
    max_data_area_mb: int = 4,
    hw_max_sectors: int = 2048,
    root: str = CONFIGFS,
) -> str:
    """mkdir + control + enable (the ACI sequence); enable blocks until the daemon opened the image."""
    t = backstore_path(hba, dev, root)
    os.makedirs(t, exist_ok=True)
    cfg = f"{SUBTYPE}/{config_path}" + (f";{dev_id}" if dev_id else "")
    _write(f"{t}/control", f"dev_config={cfg}")
    _write(f"{t}/control", f"max_data_area_mb={max_data_area_mb}")
    if hw_max_sectors and os.path.exists(f"{t}/attrib/hw_max_sectors"):
        try:
            _write(f"{t}/attrib/hw_max_sectors", str(hw_max_sectors))
        except ConfigfsError:
            pass  # read-only on kernels that fix it
    _write(f"{t}/enable", "1", retries=100)
    _write(f"{t}/attrib/cmd_time_out", "2147483")
    return t


def remove_backstore(dev: str, *, hba: int | str = DEFAULT_HBA, root: str = CONFIGFS) -> None:
    t = backstore_path(hba, dev, root)
    if os.path.isdir(t):
        os.rmdir(t)


@dataclass
class Backstore:
    """An existing overlaybd backstore found in configfs/sysfs (for crash recovery)."""

    uio_minor: int
    cfg: CfgString


def scan(sysfs_uio: str = "/sys/class/uio") -> list[Backstore]:
    """Every TCMU uio device whose handler subtype is ours."""
    found = []
    for name_file in sorted(glob.glob(f"{sysfs_uio}/uio*/name")):
        try:
            cfg = parse_uio_name(_read(name_file))
        except OSError:
            continue
        if cfg and cfg.subtype == SUBTYPE:
            minor = int(os.path.basename(os.path.dirname(name_file))[3:])
            found.append(Backstore(minor, cfg))
    return found


def naa_wwn(dev: str, prefix: str = "199") -> str:
    """A tcm_loop WWN: naa.<prefix><digits of dev zero-padded to 13>."""
    digits = "".join(c for c in dev if c.isdigit())[-13:]
    return f"naa.{prefix}{digits.zfill(13)}"


def attach_loop(
    dev: str, *, hba: int | str = DEFAULT_HBA, wwn: str | None = None, root: str = CONFIGFS, timeout: float = 30.0
) -> str:
    """Export a backstore through tcm_loop and return its /dev/sdX."""
    if not os.path.isdir("/sys/module/sd_mod"):
        subprocess.run(["modprobe", "sd_mod"], capture_output=True, check=False)  # no udev to load it for us
    t = backstore_path(hba, dev, root)
    wwn = wwn or naa_wwn(dev)
    loop = f"{root}/loopback/{wwn}"
    lun = f"{loop}/tpgt_1/lun/lun_0"
    os.makedirs(lun, exist_ok=True)
    _write(f"{loop}/tpgt_1/nexus", wwn)
    link = f"{lun}/{dev}"
    if not os.path.islink(link):
        os.symlink(t, link)
    address = _read(f"{loop}/tpgt_1/address")  # "H:C:T"
    deadline = time.monotonic() + timeout
    while True:
        blocks = glob.glob(f"/sys/class/scsi_device/{address}:0/device/block/*")
        if blocks:
            name = os.path.basename(blocks[0])
            try:
                _write(f"/sys/block/{name}/device/timeout", "2147483")
            except ConfigfsError:
                pass
            path = f"/dev/{name}"
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            return path
        if time.monotonic() > deadline:
            raise ConfigfsError(f"{loop}: no block device for SCSI address {address}:0 after {timeout}s")
        time.sleep(0.05)


def detach_loop(dev: str, *, wwn: str | None = None, root: str = CONFIGFS) -> None:
    """Reverse of attach_loop: unlink the LUN, remove lun/tpgt/loopback dirs."""
    wwn = wwn or naa_wwn(dev)
    loop = f"{root}/loopback/{wwn}"
    lun = f"{loop}/tpgt_1/lun/lun_0"
    if os.path.islink(f"{lun}/{dev}"):
        os.unlink(f"{lun}/{dev}")
    for d in (lun, f"{loop}/tpgt_1", loop):
        if os.path.isdir(d):
            try:
                os.rmdir(d)
            except OSError as e:
                raise ConfigfsError(f"{d}: rmdir: {e.strerror}") from e


def tcmu_available(modprobe: bool = True) -> tuple[bool, str]:
    """Whether this kernel can serve TCMU; the reason when not (logged by the daemon)."""
    if modprobe and not os.path.isdir("/sys/module/target_core_user"):
        subprocess.run(["modprobe", "target_core_user"], capture_output=True)
    if not os.path.isdir("/sys/module/target_core_user"):
        return False, "kernel module target_core_user not loaded (modprobe failed)"
    if not os.path.isdir(f"{CONFIGFS}/core"):
        return False, f"{CONFIGFS}/core missing (configfs not mounted?)"
    return True, "target_core_user loaded"
