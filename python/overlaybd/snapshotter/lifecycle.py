"""The life of a snapshot's overlaybd device: attach, mkfs, mount, unmount, detach, seal.

Why apart from `service.py`: the service decides *when* a device must exist (containerd semantics,
transactions); this module knows *how* to bring one up or down on the host and how to undo a half-done
step, so the RPC code reads as semantics and the host steps are tested and changed in one place.
Every step is idempotent: Mounts/Prepare may repeat it after a crash or restart.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from ..config.snapshotter import SnapshotterConfig
from ..host.mkfs import MkfsError, mkfs
from ..host.mount import MountError, mount
from . import labels as L
from .device_backend import DeviceBackend
from .device_config import sealed_config, writable_config, write_config
from .errors import Internal, Unavailable
from .fsutil import is_mounted, umount
from .layout import SnapshotDir
from .store import Snapshot

log = logging.getLogger(__name__)


class DeviceLifecycle:
    """Brings snapshots' devices up and down through a `DeviceBackend` (TCMU or the FUSE frontend)."""

    def __init__(self, cfg: SnapshotterConfig, devices: DeviceBackend | None) -> None:
        self.cfg = cfg
        self.devices = devices
        self._deferred: Callable[[], None] | None = None  # device reconcile waiting for the frontend
        self._deferred_lock = threading.Lock()

    def dir(self, s: Snapshot) -> SnapshotDir:
        return SnapshotDir(self.cfg.root, s.id)

    def frontend_down(self) -> str | None:
        """Why the device frontend cannot serve now (the message names it), or None when it is up."""
        if self.devices is None:
            return "no overlaybd device frontend available (neither TCMU nor the FUSE frontend)"
        probe = getattr(self.devices, "unavailable", None)
        return probe() if probe is not None else None

    def defer_until_frontend(self, fn: Callable[[], None]) -> None:
        """Run `fn` (the device part of reconcile) once the frontend is up: at the first device request that
        finds it up, or from `run_deferred` polled by the daemon's watcher thread."""
        with self._deferred_lock:
            self._deferred = fn

    @property
    def deferred(self) -> bool:
        return self._deferred is not None

    def run_deferred(self) -> bool:
        """If work waits for the frontend and it is up now, run it; True when nothing waits any more.
        The work runs under the lock, so a device request arriving meanwhile waits for it to finish."""
        if self._deferred is None:
            return True
        with self._deferred_lock:
            if self._deferred is None:
                return True
            if self.frontend_down() is not None:
                return False
            log.info("device frontend is up: running the deferred device reconcile")
            try:
                self._deferred()
            except Exception:  # logged; the devices are then checked again on demand
                log.exception("deferred device reconcile failed")
            self._deferred = None
        return True

    def backend(self) -> DeviceBackend:
        """The device backend, or Unavailable naming the frontend that is not up (a host without TCMU or the
        daemon's FUSE frontend has none; overlaybd-tcmu may also simply not be started yet)."""
        if self.devices is None:
            raise Unavailable("no overlaybd device frontend available (neither TCMU nor the FUSE frontend)")
        if self._deferred is not None and not self.run_deferred():
            raise Unavailable(self.frontend_down() or "overlaybd device frontend not up")
        return self.devices

    def fs_type(self, s: Snapshot) -> str:
        """The filesystem inside the layer's device (label blob-fs-type, else the configured default)."""
        spec = s.labels.get(L.BLOB_FS_TYPE, "") or self.cfg.default_fs_type
        return spec.split(";", 1)[0] or "ext4"

    def ensure_ro_mounted(self, s: Snapshot) -> None:
        """Attach the layer's device read-only and mount it at block/mountpoint (idempotent)."""
        sd = self.dir(s)
        if is_mounted(sd.mountpoint):
            return
        devices = self.backend()
        dev = devices.attach(sd, writable=False)
        os.makedirs(sd.mountpoint, exist_ok=True)
        fs = self.fs_type(s)
        opts = "ro,noload" if fs == "ext4" else "ro"
        try:
            mount(dev, sd.mountpoint, fs, opts)
        except MountError as e:
            devices.detach(sd)
            raise Internal(f"snapshot {s.key}: {e}") from e

    def ensure_rw_attached(self, s: Snapshot) -> str:
        """Writable device: attached, and in dir mode mounted at block/mountpoint; returns the device."""
        sd = self.dir(s)
        devices = self.backend()
        dev = devices.device_of(sd)
        if dev is None:
            dev = devices.attach(sd, writable=True)
        if s.labels.get(L.WRITABLE, "") != "dev" and not is_mounted(sd.mountpoint):
            os.makedirs(sd.mountpoint, exist_ok=True)
            try:
                mount(dev, sd.mountpoint, self.fs_type(s), "discard")
            except MountError as e:
                raise Internal(f"snapshot {s.key}: {e}") from e
        return dev

    def create_writable(self, s: Snapshot, parent: Snapshot | None) -> None:
        """A writable overlaybd device (rwMode dir/dev): LSMT upper + config, attach, mkfs for a fresh image."""
        from ..format import lsmt

        sd = self.dir(s)
        os.makedirs(sd.mountpoint, exist_ok=True)
        vsize_gb = int(s.labels.get(L.VSIZE, "64"))
        sparse = self.cfg.writable_layer_type == "sparse"
        lsmt.create_rw(sd.writable_data, sd.writable_index, vsize_gb << 30, sparse=sparse)
        write_config(sd.config, writable_config(sd, self.dir(parent) if parent else None))
        dev = self.backend().attach(sd, writable=True)
        if parent is None:
            try:
                mkfs(dev, self.fs_type(s))
            except MkfsError as e:
                self.backend().detach(sd)
                raise Internal(f"snapshot {s.key}: {e}") from e

    def seal_writable(self, s: Snapshot) -> None:
        """Commit of a writable device: unmount, detach, seal the LSMT upper into fs/overlaybd.sealed (read-only)."""
        from ..format import lsmt

        sd = self.dir(s)
        self.release(sd)
        if os.path.exists(sd.writable_data):  # idempotent: a crash may have stopped a previous Commit midway
            if os.path.exists(sd.writable_index):
                lsmt.seal(sd.writable_data, sd.writable_index)
            os.replace(sd.writable_data, sd.sealed)
        write_config(sd.config, sealed_config(sd))
        if os.path.exists(sd.writable_index):
            os.unlink(sd.writable_index)

    def release(self, sd: SnapshotDir) -> None:
        """Unmount the snapshot's device mount and detach its device (for Remove/Cleanup); best effort."""
        if os.path.isdir(sd.mountpoint) and is_mounted(sd.mountpoint):
            umount(sd.mountpoint)
        if self.devices is not None and os.path.exists(sd.backstore_mark):
            try:
                self.devices.detach(sd)
            except Exception as e:  # best effort: a detach failure must not fail Remove, it is logged
                log.warning("detach %s: %s", sd.path, L.esc(str(e)))

    def drop_stale(self, sd: SnapshotDir) -> bool:
        """After a restart: unmount a mount whose device is gone and forget a device the backend lost.

        Returns True when something was stale; the device is attached and mounted again on demand.
        """
        stale = False
        if sd.is_block() and os.path.isdir(sd.mountpoint):
            try:
                os.listdir(sd.mountpoint)
            except OSError:  # device gone under a mount (frontend died): remount on demand
                umount(sd.mountpoint, lazy=True)
                stale = True
        if os.path.exists(sd.backstore_mark) and self.devices is not None and self.devices.device_of(sd) is None:
            os.unlink(sd.backstore_mark)  # the device is gone; attach again when needed
            if is_mounted(sd.mountpoint):
                umount(sd.mountpoint, lazy=True)
            stale = True
        return stale
