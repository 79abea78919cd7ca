"""The TCMU frontend: every TCMU backstore of this daemon, driven by TCM-USER netlink events.

ADDED_DEVICE opens the image named by the cfgstring and replies (so `enable` fails when the open
fails); REMOVED_DEVICE closes it. At start, backstores that already exist (the daemon was
restarted by systemd) are re-opened and the commands still on their rings are completed.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from overlaybd.image.frontend import ImageOpener
from overlaybd.tcmu import configfs
from overlaybd.tcmu.backstore import TcmuDevice, UioDevice
from overlaybd.tcmu.scsi import DeviceInfo, ScsiDisk

if TYPE_CHECKING:
    from overlaybd.tcmu.netlink import TcmuNetlink

log = logging.getLogger("overlaybd-tcmu")

TCMU_PARAMS = "/sys/module/target_core_user/parameters"


def _set_param(name: str, value: str) -> None:
    try:
        with open(f"{TCMU_PARAMS}/{name}", "w") as f:
            f.write(value)
    except OSError:
        pass  # older kernels lack block_netlink/reset_netlink


def _read_text(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


class TcmuFrontend:
    """All TCMU devices of this daemon."""

    def __init__(
        self,
        opener: ImageOpener,
        *,
        workers: int = 8,
        read_retry_seconds: float = 30.0,
        configfs_root: str = configfs.CONFIGFS,
    ):
        self.opener = opener
        self.workers = workers
        self.read_retry_seconds = read_retry_seconds
        self.root = configfs_root
        self.devices: dict[int, TcmuDevice] = {}
        self.netlink: TcmuNetlink | None = None

    def open_device(self, minor: int, cfg: configfs.CfgString) -> None:
        if minor in self.devices:
            return
        uio = UioDevice(minor)
        try:
            image = self.opener(cfg.config_path)
        except BaseException:
            uio.close()
            raise
        core = configfs.backstore_path(cfg.hba, cfg.dev, self.root)
        serial = _read_text(f"{core}/wwn/vpd_unit_serial").rpartition(":")[2].strip() or cfg.dev
        max_sectors = int(_read_text(f"{core}/attrib/hw_max_sectors", "128") or 128)
        info = DeviceInfo(serial=serial, max_transfer_blocks=max_sectors, read_retry_seconds=self.read_retry_seconds)
        dev = TcmuDevice(uio, ScsiDisk(image, info), workers=self.workers)
        dev.start()
        self.devices[minor] = dev
        log.info(
            "tcmu: opened uio%d %s/%s -> %s (%s, %d bytes)",
            minor,
            cfg.hba,
            cfg.dev,
            cfg.config_path,
            "ro" if dev.disk.read_only else "rw",
            image.size(),
        )

    def close_device(self, minor: int) -> None:
        dev = self.devices.pop(minor, None)
        if dev is None:
            return
        dev.stop()
        close = getattr(dev.disk.image, "close", None)
        if close:
            close()
        log.info("tcmu: closed uio%d", minor)

    def recover(self) -> None:
        """Re-open backstores that exist already (daemon restart); their queued commands then complete."""
        for bs in configfs.scan():
            try:
                self.open_device(bs.uio_minor, bs.cfg)
                log.info("tcmu: recovered uio%d (%s)", bs.uio_minor, bs.cfg.config_path)
            except Exception as e:  # one bad device must not stop the others
                log.error("tcmu: recovering uio%d (%s): %s", bs.uio_minor, bs.cfg.config_path, e)

    def start(self) -> None:
        from overlaybd.tcmu.netlink import TcmuNetlink

        _set_param("block_netlink", "1")
        _set_param("reset_netlink", "1")  # fail enables that waited on a previous, dead daemon
        self.netlink = TcmuNetlink()
        self.netlink.enable_replies()
        _set_param("block_netlink", "0")
        self.recover()

    def handle_events(self) -> None:
        from overlaybd.tcmu import netlink as nl

        netlink = self._started()
        for ev in netlink.receive():
            cfg = configfs.parse_uio_name(ev.device)
            status = 0
            if cfg is None or cfg.subtype != configfs.SUBTYPE:
                log.debug("tcmu: ignoring %s (another handler's device)", ev.device)
                continue  # another TCMU handler (e.g. tcmu-runner) answers for it
            if ev.cmd == nl.CMD_ADDED_DEVICE:
                try:
                    self.open_device(ev.minor, cfg)
                except Exception as e:  # reported to the kernel, enable fails
                    log.error("tcmu: open %s: %s", cfg.config_path, e)
                    status = -errno.EPERM
            elif ev.cmd == nl.CMD_REMOVED_DEVICE:
                try:
                    self.close_device(ev.minor)
                except Exception as e:  # the kernel still needs its reply
                    log.error("tcmu: close uio%d: %s", ev.minor, e)
            else:
                status = -errno.EOPNOTSUPP
            try:
                netlink.reply(ev, status)
            except OSError as e:
                log.warning("tcmu: reply for %s: %s", ev.device, e)

    def _started(self) -> TcmuNetlink:
        if self.netlink is None:
            raise RuntimeError("tcmu frontend not started")
        return self.netlink

    def fileno(self) -> int:
        return self._started().fileno()

    def shutdown(self) -> None:
        for minor in list(self.devices):
            self.close_device(minor)
        if self.netlink:
            self.netlink.close()
