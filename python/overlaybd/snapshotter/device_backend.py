"""Getting a block device for a snapshot's config.v1.json: TCMU (configfs + tcm_loop) or the FUSE frontend.

Why a separate process owns the devices: a container's rootfs sits on them, so they must outlive
a snapshotter crash/restart. With TCMU the kernel + overlaybd-tcmu own them; without TCMU the
daemon's FUSE frontend does, and we talk to it over its control socket. Either way the device
name is recorded in `block/backstore_mark`, as upstream does.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

from .errors import Unavailable
from .layout import SnapshotDir

log = logging.getLogger(__name__)

TCMU_CORE = "/sys/kernel/config/target/core"


class DeviceBackend(Protocol):
    def attach(self, sd: SnapshotDir, writable: bool) -> str:
        """Attach the device described by sd.config; return /dev/<name>; raise Unavailable with the reason."""

    def detach(self, sd: SnapshotDir) -> None: ...

    def device_of(self, sd: SnapshotDir) -> str | None:
        """The attached device of this snapshot, or None."""

    def unavailable(self) -> str | None:
        """Why no device frontend can serve right now (naming it), or None when one is up."""


def _result_reason(sd: SnapshotDir) -> str:
    try:
        with open(sd.result_file) as f:
            text = f.read(4096).strip()
    except OSError:
        return ""
    return text if text and text != "success" else ""


class FuseControlBackend:
    """Devices served by the overlaybd daemon's FUSE frontend (loop device over a FUSE file)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    @staticmethod
    def dev_id(sd: SnapshotDir) -> str:
        return f"obd-{os.path.basename(sd.root.rstrip('/'))}-{sd.id}"

    def _request(self, req: dict) -> dict:
        from ..fuse.control import request

        try:
            return request(req, self.socket_path)
        except (OSError, ValueError) as e:
            raise Unavailable(
                f"overlaybd-tcmu's FUSE frontend at {self.socket_path} is not reachable (is overlaybd-tcmu "
                f"running?): {e}"
            ) from e

    def unavailable(self) -> str | None:
        try:
            self._request({"op": "list"})
        except Unavailable as e:
            return e.message
        except RuntimeError:
            pass  # it answered: it is up
        return None

    def attach(self, sd: SnapshotDir, writable: bool) -> str:
        current = self.device_of(sd)
        if current is not None:
            return current
        try:
            reply = self._request(
                {"op": "attach", "config": sd.config, "dev_id": self.dev_id(sd), "read_only": not writable}
            )
        except RuntimeError as e:
            reason = _result_reason(sd)
            detail = reason.removeprefix("failed:")
            raise Unavailable(
                f"failed to attach overlaybd device for {sd.config}: {e}"
                + (f" ({reason})" if detail and detail not in str(e) else "")
            ) from e
        dev = reply["device"]
        with open(sd.backstore_mark, "w") as f:
            f.write(dev)
        log.info("attached %s -> %s", sd.config, dev)
        return dev

    def detach(self, sd: SnapshotDir) -> None:
        if self.device_of(sd) is not None:
            try:
                self._request({"op": "detach", "dev_id": self.dev_id(sd)})
            except RuntimeError as e:
                log.warning("detach %s: %s", sd.path, e)
        try:
            os.unlink(sd.backstore_mark)
        except FileNotFoundError:
            pass

    def device_of(self, sd: SnapshotDir) -> str | None:
        try:
            devices = self._request({"op": "list"}).get("devices", {})
        except RuntimeError:
            return None
        return devices.get(self.dev_id(sd))


class TcmuBackend:
    """Devices through LIO: a TCMU backstore `user_<hba>/dev_<id>` served by overlaybd-tcmu, exported by tcm_loop
    as /dev/sdX (upstream AttachDevice, spec format.md §6.4). HBA 999999999 and NAA prefix 199 unless `tenant`."""

    def __init__(self, tenant: int = -1) -> None:
        self.hba = 999999999 if tenant < 0 else tenant
        self.prefix = "199" if tenant < 0 else str(tenant % 100 + 100)

    @staticmethod
    def dev_name(sd: SnapshotDir) -> str:
        return f"dev_{sd.id}"

    def attach(self, sd: SnapshotDir, writable: bool) -> str:
        from ..tcmu import configfs

        current = self.device_of(sd)
        if current is not None:
            return current
        dev = self.dev_name(sd)
        wwn = configfs.naa_wwn(str(sd.id), self.prefix)
        try:
            configfs.create_backstore(dev, sd.config, str(sd.id), hba=self.hba)
            path = configfs.attach_loop(dev, hba=self.hba, wwn=wwn)
        except (OSError, configfs.ConfigfsError) as e:
            reason = _result_reason(sd)
            self.detach(sd)
            raise Unavailable(
                f"failed to attach overlaybd device for {sd.config}: {e}" + (f" ({reason})" if reason else "")
            ) from e
        with open(sd.backstore_mark, "w") as f:
            f.write(path)
        return path

    def detach(self, sd: SnapshotDir) -> None:
        from ..tcmu import configfs

        dev = self.dev_name(sd)
        try:
            configfs.detach_loop(dev, wwn=configfs.naa_wwn(str(sd.id), self.prefix))
            configfs.remove_backstore(dev, hba=self.hba)
        except (OSError, configfs.ConfigfsError) as e:
            log.warning("detach %s: %s", dev, e)
        try:
            os.unlink(sd.backstore_mark)
        except FileNotFoundError:
            pass

    def device_of(self, sd: SnapshotDir) -> str | None:
        try:
            with open(sd.backstore_mark) as f:
                path = f.read().strip()
        except OSError:
            return None
        name = os.path.basename(path)
        return path if path and os.path.exists(f"/sys/block/{name}") else None

    def unavailable(self) -> str | None:
        # overlaybd-tcmu's TCMU handler cannot be probed without creating a device; a missing daemon shows
        # as a failed attach naming the config and the reason.
        return None if tcmu_available() else f"TCMU frontend: {TCMU_CORE} does not exist (target_core_user not loaded)"


def tcmu_available() -> bool:
    return os.path.isdir(TCMU_CORE)


class AutoBackend:
    """TCMU where configfs has the target core (overlaybd-tcmu serves it), else the daemon's FUSE frontend,
    decided at each use rather than once at start: the snapshotter may start before overlaybd-tcmu (or
    before the kernel modules are loaded) and must pick the frontend that is there when a device is needed."""

    def __init__(self, tenant: int, fuse_socket: str) -> None:
        self.tcmu = TcmuBackend(tenant=tenant)
        self.fuse = FuseControlBackend(fuse_socket)

    def current(self) -> DeviceBackend:
        return self.tcmu if tcmu_available() else self.fuse

    def attach(self, sd: SnapshotDir, writable: bool) -> str:
        return self.current().attach(sd, writable)

    def detach(self, sd: SnapshotDir) -> None:
        self.current().detach(sd)

    def device_of(self, sd: SnapshotDir) -> str | None:
        return self.current().device_of(sd)

    def unavailable(self) -> str | None:
        return self.current().unavailable()


def default_backend(cfg_tenant: int, fuse_socket: str) -> DeviceBackend:
    """The device frontend as found at each use (TCMU or the daemon's FUSE frontend): see `AutoBackend`."""
    return AutoBackend(cfg_tenant, fuse_socket)
