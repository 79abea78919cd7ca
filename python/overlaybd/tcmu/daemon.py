"""overlaybd-tcmu: serve overlaybd devices through TCMU, or through FUSE files where TCMU is missing.

TCMU mode: listen on the TCM-USER netlink family; ADDED_DEVICE opens the image named by the
cfgstring and replies (so `enable` fails when the open fails); REMOVED_DEVICE closes it. At start,
backstores that already exist (the daemon was restarted by systemd) are re-opened and the
commands still on their rings are completed. FUSE mode: see overlaybd.fuse.control.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import resource
import select
import signal
import threading
from collections.abc import Callable
from typing import Any

from overlaybd.fuse.control import DEFAULT_RUN_DIR, DEFAULT_SOCKET, FuseFrontend
from overlaybd.fuse.device import default_opener
from overlaybd.fuse.server import BlockImage
from overlaybd.tcmu import configfs
from overlaybd.tcmu.device import TcmuDevice, UioDevice
from overlaybd.tcmu.scsi import DeviceInfo, ScsiDisk

log = logging.getLogger("overlaybd-tcmu")

TCMU_PARAMS = "/sys/module/target_core_user/parameters"


def setup_logging(service: Any, to_stderr: bool = True) -> None:
    """Log to logConfig.logPath (rotated by size) and stderr (journald); level from logConfig.logLevel."""
    level = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING}.get(service.log_config.log_level, logging.ERROR)
    handlers: list[logging.Handler] = []
    if to_stderr:
        handlers.append(logging.StreamHandler())
    path = service.log_config.log_path
    if path:
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            lc = service.log_config
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    path, maxBytes=lc.log_size_mb << 20, backupCount=max(lc.log_rotate_num, 0)
                )
            )
        except OSError as e:
            print(f"overlaybd-tcmu: cannot log to {path}: {e}")
    logging.basicConfig(
        level=level, handlers=handlers, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


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
        opener: Callable[[str], BlockImage],
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
        self.netlink = None

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
            except Exception as e:  # noqa: BLE001 - one bad device must not stop the others
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

        for ev in self.netlink.receive():
            cfg = configfs.parse_uio_name(ev.device)
            status = 0
            if cfg is None or cfg.subtype != configfs.SUBTYPE:
                log.debug("tcmu: ignoring %s (another handler's device)", ev.device)
                continue  # another TCMU handler (e.g. tcmu-runner) answers for it
            if ev.cmd == nl.CMD_ADDED_DEVICE:
                try:
                    self.open_device(ev.minor, cfg)
                except Exception as e:  # noqa: BLE001 - reported to the kernel, enable fails
                    log.error("tcmu: open %s: %s", cfg.config_path, e)
                    status = -errno.EPERM
            elif ev.cmd == nl.CMD_REMOVED_DEVICE:
                try:
                    self.close_device(ev.minor)
                except Exception as e:  # noqa: BLE001 - the kernel still needs its reply
                    log.error("tcmu: close uio%d: %s", ev.minor, e)
            else:
                status = -errno.EOPNOTSUPP
            try:
                self.netlink.reply(ev, status)
            except OSError as e:
                log.warning("tcmu: reply for %s: %s", ev.device, e)

    def fileno(self) -> int:
        return self.netlink.fileno()

    def shutdown(self) -> None:
        for minor in list(self.devices):
            self.close_device(minor)
        if self.netlink:
            self.netlink.close()


def choose_frontend(requested: str) -> tuple[str, str]:
    """("tcmu"|"fuse", why)."""
    if requested in ("tcmu", "fuse"):
        return requested, "requested"
    ok, why = configfs.tcmu_available()
    return ("tcmu" if ok else "fuse"), why


def run(
    service: Any,
    *,
    frontend: str = "auto",
    fuse_socket: str = DEFAULT_SOCKET,
    fuse_run_dir: str = DEFAULT_RUN_DIR,
    opener: Callable[[str], BlockImage] | None = None,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or `stop`); returns the exit code."""
    opener = opener or default_opener(service)
    stop = stop or threading.Event()
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()
        os.write(stop_w, b"x")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=lambda: (stop.wait(), os.write(stop_w, b"x")), daemon=True).start()

    try:  # one fd per layer file per device, as upstream raises it
        resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
    except (ValueError, OSError):
        pass
    kind, why = choose_frontend(frontend)
    log.info("frontend: %s (%s)", kind, why)
    if kind == "fuse":
        fe = FuseFrontend(opener, socket_path=fuse_socket, run_dir=fuse_run_dir)
        fe.serve()
        log.info("fuse: ready")
        if ready:
            ready.set()
        select.select([stop_r], [], [])
        fe.shutdown()
        return 0
    tf = TcmuFrontend(opener, read_retry_seconds=30.0)
    try:
        tf.start()
    except OSError as e:
        log.error("tcmu: %s", e)
        return 1
    log.info("tcmu: ready, serving %d recovered device(s)", len(tf.devices))
    if ready:
        ready.set()
    while True:
        r, _, _ = select.select([tf.fileno(), stop_r], [], [])
        if stop_r in r:
            break
        tf.handle_events()
    tf.shutdown()
    log.info("stopped")
    return 0
