"""The snapshotter: containerd snapshot semantics over SQLite metadata and per-snapshot directories.

Why this shape: every RPC is one `Store.transaction()`; filesystem work that must exist before
the row is visible (mkdir, config.v1.json) happens inside the transaction, work that may only
happen after the row is gone (rmtree) happens after COMMIT. A crash therefore leaves at worst a
directory without a row, which `reconcile()` deletes on the next start — never a row whose
files are missing. Error codes follow containerd's bolt storage (spec flatcar.md §6). Devices
are brought up and down by `lifecycle.DeviceLifecycle`; this module decides when.
"""

from __future__ import annotations

import builtins
import errno
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

from ..config.schema import ConfigError
from ..config.service import ServiceConfig, default_service_config, load_service_config
from ..config.snapshotter import SnapshotterConfig
from ..format.atomic import atomic_write_bytes
from ..oci.acceleration import TRACE_MEMBER, fetch_acceleration_trace
from . import labels as L
from .device_backend import DeviceBackend
from .device_config import (
    acceleration_layer_config,
    is_overlaybd_file,
    parent_lowers,
    read_config,
    remote_layer_config,
    repo_blob_url,
    write_config,
)
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SnapshotError,
    Unavailable,
)
from .faults import crashpoint
from .filters import compile_filters
from .fsutil import confine_path, disk_usage, is_mounted, remove_tree
from .layout import SnapshotDir, snapshots_dir
from .lifecycle import DeviceLifecycle
from .mounts import Mount, bind, overlay_mounts
from .store import ACTIVE, COMMITTED, VIEW, Snapshot, Store, Transaction, now_ns

log = logging.getLogger(__name__)

TRACE_SIDE_FILES = ("", ".ok", ".lock")  # the trace and the image service's markers beside it


def load_shared_service_config(path: str) -> ServiceConfig:
    """overlaybd.json, for the settings the snapshotter shares with overlaybd-tcmu (`readDeadlineSec`, registry
    credentials). A missing file means the defaults (as overlaybd-tcmu does); a broken one is logged and the
    defaults used, so it never keeps the snapshotter from starting."""
    if not os.path.exists(path):
        return default_service_config()
    try:
        return load_service_config(path)
    except ConfigError as e:
        log.error("%s; using the defaults of overlaybd.json", e)
        return default_service_config()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _space_error(e: BaseException, root: str) -> SnapshotError | None:
    """ENOSPC / SQLite 'disk is full' -> ResourceExhausted naming the state dir."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"no space left in snapshotter root {root}: {e}")
    if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
        return ResourceExhausted(f"no space left in snapshotter root {root}: metadata.db: {e}")
    return None


class Snapshotter:
    """containerd.services.snapshots.v1 semantics; methods raise `SnapshotError` subclasses."""

    def __init__(self, cfg: SnapshotterConfig, devices: DeviceBackend | None = None) -> None:
        self.cfg = cfg
        self.root = cfg.root
        os.makedirs(snapshots_dir(self.root), mode=0o700, exist_ok=True)
        self.store = Store(os.path.join(self.root, "metadata.db"))
        self.lifecycle = DeviceLifecycle(cfg, devices)
        self.insecure = cfg.insecure_hosts()
        os.makedirs(cfg.trace_dir, mode=0o700, exist_ok=True)
        self.service_config = load_shared_service_config(cfg.overlaybd_config_path)
        #: one deadline for registry work, shared with the registry client of overlaybd-tcmu
        self.registry_deadline = float(self.service_config.read_deadline_sec)

    @property
    def devices(self) -> DeviceBackend | None:
        """The device backend (TCMU or FUSE frontend), None on a host with neither."""
        return self.lifecycle.devices

    def close(self) -> None:
        self.store.close()

    def dir(self, s: Snapshot) -> SnapshotDir:
        return SnapshotDir(self.root, s.id)

    # -- helpers ---------------------------------------------------------------------------------
    def _guard(self, fn, *args: Any) -> Any:
        """Run an operation, translating disk-full and unexpected errors into gRPC codes."""
        try:
            return fn(*args)
        except SnapshotError:
            raise
        except (OSError, sqlite3.Error) as e:
            err = _space_error(e, self.root)
            if err is not None:
                raise err from e
            log.exception("internal error")
            raise Internal(str(e)) from e

    def _parent(self, tx: Transaction, parent: str) -> Snapshot | None:
        if not parent:
            return None
        p = tx.find(parent)
        if p is None:
            raise NotFound(f"parent snapshot {parent} does not exist: not found")
        if p.kind != COMMITTED:
            raise InvalidArgument(f"parent {parent} is not a committed snapshot: invalid argument")
        return p

    def _lowers(self, tx: Transaction, parent: str) -> list[str]:
        """Lower directories nearest first; an overlaybd ancestor contributes its mounted device and ends the list
        (its device already shows everything below it)."""
        out: list[str] = []
        while parent:
            p = tx.get(parent)
            sd = self.dir(p)
            if sd.is_block():
                self.lifecycle.ensure_ro_mounted(p)
                out.append(sd.mountpoint)
                break
            out.append(sd.fs)
            parent = p.parent
        return out

    def _mounts(self, tx: Transaction, s: Snapshot) -> list[Mount]:
        sd = self.dir(s)
        mode = s.labels.get(L.WRITABLE, "")
        if s.kind == ACTIVE and sd.is_block() and os.path.exists(sd.writable_data):
            dev = self.lifecycle.ensure_rw_attached(s)
            if mode == "dev":
                return [Mount(self.lifecycle.fs_type(s), dev, ["discard"])]
            return [bind(sd.mountpoint, readonly=False)]
        return overlay_mounts(sd.fs, sd.work, self._lowers(tx, s.parent), view=s.kind == VIEW)

    # -- RPCs ------------------------------------------------------------------------------------
    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._guard(self._create, ACTIVE, key, parent, dict(labels))

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._guard(self._create, VIEW, key, parent, dict(labels))

    def _create(self, kind: int, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        L.validate_key(key)
        L.validate(labels)
        if kind == ACTIVE and L.is_remote_layer(labels):
            self._prepare_remote(key, parent, labels)  # raises AlreadyExists when the lazy layer is ready
        image_layer = bool(labels.get(L.TARGET_SNAPSHOT_REF)) or labels.get(L.SNAPSHOT_TYPE) == "image"
        writable = labels.get(L.WRITABLE) or ("" if image_layer else self.cfg.rw_mode)
        record = kind == ACTIVE and L.records_trace(labels)
        if record and writable in L.WRITABLE_MODES:
            raise InvalidArgument(
                f"{L.RECORD_TRACE}=yes needs an overlayfs rootfs, not rwMode {writable!r}: invalid argument"
            )
        finish: Callable[[bool], None] | None = None
        try:
            with self.store.transaction() as tx:
                if tx.find(key) is not None:
                    raise AlreadyExists(f"snapshot {key} already exists")
                p = self._parent(tx, parent)
                if record:
                    finish = self._attach_recording(tx, p, labels[L.RECORD_TRACE_PATH])
                s = tx.insert(key, parent, kind, labels)
                sd = self.dir(s)
                if os.path.lexists(sd.path):  # leftover of a crash before COMMIT: ids are never reused
                    remove_tree(sd.path)
                os.makedirs(sd.fs, mode=0o755)
                os.makedirs(sd.work, mode=0o711)
                if kind == ACTIVE and writable in L.WRITABLE_MODES and (p is None or self.dir(p).is_block()):
                    self.lifecycle.create_writable(s, p)
                    s.labels.setdefault(L.WRITABLE, writable)
                    tx.save(s)
                mounts = self._mounts(tx, s)
                crashpoint("create.before-commit")
        except BaseException:
            if finish is not None:
                finish(False)
            raise
        if finish is not None:
            finish(True)
        crashpoint("create.after-commit")
        return mounts

    def _attach_recording(self, tx: Transaction, p: Snapshot | None, trace_label: str) -> Callable[[bool], None]:
        """`ctr record-trace`: (re)attach the image's top layer device with `recordTracePath` (an emptied file),
        so the image service records every layer read until `<trace>.lock` is removed or the device closes.
        The config is restored right after the attach: only this attach records.

        The trace may only live in the configured trace directory or the recorded layer's own snapshot
        directory (checked on real paths before anything is touched: a label must not aim root's writes at
        any file). Files already there are set aside, not truncated: the returned `finish(ok)` drops them
        once the Prepare succeeded, or puts them back when it failed."""
        if p is None or not self.dir(p).is_block():
            raise InvalidArgument(f"{L.RECORD_TRACE}=yes: the parent is not an overlaybd layer: invalid argument")
        psd = self.dir(p)
        trace_path = confine_path(trace_label, (self.cfg.trace_dir, psd.path), L.RECORD_TRACE_PATH)
        cfg = read_config(psd.config)
        if cfg.get("accelerationLayer"):
            raise FailedPrecondition(
                f"{L.RECORD_TRACE}=yes: layer {p.key} is an acceleration layer; record on the "
                "image without it: failed precondition"
            )
        in_use = is_mounted(psd.mountpoint) or os.path.exists(psd.backstore_mark)
        if in_use and tx.has_children(p.key):
            raise FailedPrecondition(
                f"{L.RECORD_TRACE}=yes: the device of layer {p.key} is in use by other "
                "snapshots; stop their containers first: failed precondition"
            )
        aside: list[tuple[str, str]] = []
        suffix = ".prev-" + secrets.token_hex(4)

        def finish(ok: bool) -> None:
            for old, cur in aside:
                if ok:
                    _unlink(old)
                else:
                    os.replace(old, cur)
            if not ok:
                for ext in TRACE_SIDE_FILES:
                    if not any(cur == trace_path + ext for _, cur in aside):
                        _unlink(trace_path + ext)

        try:
            for ext in TRACE_SIDE_FILES:
                cur = trace_path + ext
                if os.path.lexists(cur):
                    os.replace(cur, cur + suffix)
                    aside.append((cur + suffix, cur))
            fd = os.open(trace_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)  # an empty file means record mode
        except OSError as e:
            finish(False)
            raise InvalidArgument(
                f"label {L.RECORD_TRACE_PATH}={L.esc(trace_label)!r}: {e.strerror}: invalid argument"
            ) from e
        try:
            if in_use:
                self.lifecycle.release(psd)
            write_config(psd.config, {**cfg, "recordTracePath": trace_path})
            try:
                self.lifecycle.ensure_ro_mounted(p)
            finally:
                write_config(psd.config, cfg)
        except BaseException:
            finish(False)
            raise
        return finish

    def _acceleration_trace(self, labels: dict[str, str]) -> bytes:
        """The `trace` inside an acceleration layer's (small, tar) blob, fetched now: it must be local."""
        from ..format.errors import FormatError

        digest = labels[L.BLOB_DIGEST]
        try:
            return fetch_acceleration_trace(
                L.image_ref(labels), digest, self.insecure, deadline=self.registry_deadline, service=self.service_config
            )
        except FormatError as e:
            raise InvalidArgument(f"acceleration layer {digest}: {e}: invalid argument") from e
        except OSError as e:
            raise Unavailable(f"acceleration layer {digest}: cannot fetch it: {e}") from e

    def _prepare_remote(self, key: str, parent: str, labels: dict[str, str]) -> None:
        """Remote-snapshot protocol: commit `labels[snapshot.ref]` as a lazy layer, answer AlreadyExists."""
        target = labels[L.TARGET_SNAPSHOT_REF]
        accel = L.is_acceleration_layer(labels)
        if accel and not parent:
            raise InvalidArgument(f"acceleration layer {labels[L.BLOB_DIGEST]} has no parent layer: invalid argument")
        with self.store.transaction() as tx:
            if tx.find(target) is not None:
                raise AlreadyExists(f"target snapshot {target} already exists")
        trace = self._acceleration_trace(labels) if accel else b""  # network: outside the transaction
        with self.store.transaction() as tx:
            existing = tx.find(target)
            if existing is not None:
                raise AlreadyExists(f"target snapshot {target} already exists")
            p = self._parent(tx, parent)
            if p is not None and not self.dir(p).is_block():
                log.info(
                    "remote layer %s on ordinary parent %s: falling back to download", L.esc(target), L.esc(parent)
                )
                return
            url = repo_blob_url(L.image_ref(labels), self.insecure)
            committed = dict(labels)
            committed[L.REMOTE] = L.REMOTE_VALUE
            s = tx.insert(target, parent, COMMITTED, committed)
            sd = self.dir(s)
            if os.path.lexists(sd.path):
                remove_tree(sd.path)
            os.makedirs(sd.fs, mode=0o755)
            os.makedirs(sd.mountpoint)
            make_config = acceleration_layer_config if accel else remote_layer_config
            cfg = make_config(sd, self.dir(p) if p else None, url, labels[L.BLOB_DIGEST], int(labels[L.BLOB_SIZE]))
            if accel:
                atomic_write_bytes(os.path.join(sd.block, TRACE_MEMBER), trace)
            write_config(sd.config, cfg)
            with open(sd.image_ref, "w") as f:
                f.write(L.image_ref(labels))
            s.size = int(labels[L.BLOB_SIZE])
            tx.save(s)
            crashpoint("remote.before-commit")
        crashpoint("remote.after-commit")
        log.info("remote snapshot %s prepared lazily (key %s)", L.esc(target), L.esc(key))
        raise AlreadyExists(f"target snapshot {target} already exists")

    def mounts(self, key: str) -> list[Mount]:
        def op() -> list[Mount]:
            with self.store.transaction() as tx:
                s = tx.find(key)
                # containerd's storage.GetSnapshot, wrapped as its overlay snapshotter does
                if s is None:
                    raise NotFound("failed to get active mount: snapshot does not exist: not found")
                if s.kind not in (ACTIVE, VIEW):
                    raise FailedPrecondition(
                        f"failed to get active mount: requested snapshot {key} not active or view: failed precondition"
                    )
                return self._mounts(tx, s)

        return self._guard(op)

    def commit(self, name: str, key: str, labels: dict[str, str], parent: str = "") -> None:
        def op() -> None:
            L.validate_key(name, "snapshot name")
            L.validate(labels)
            with self.store.transaction() as tx:
                s = tx.get(key)
                if s.kind != ACTIVE:
                    raise FailedPrecondition(f"snapshot {key} is not active: failed precondition")
                if tx.find(name) is not None:
                    raise AlreadyExists(f"snapshot {name} already exists")
                if parent and parent != s.parent:
                    if s.parent:
                        raise InvalidArgument(
                            f"snapshot {key} has parent {s.parent}, cannot rebase onto {parent}: invalid argument"
                        )
                    p = tx.find(parent)
                    if p is None:
                        raise NotFound(f"parent snapshot {parent} does not exist: not found")
                    if p.kind != COMMITTED:
                        raise FailedPrecondition(f"parent {parent} is not committed: failed precondition")
                    s.parent = parent
                sd = self.dir(s)
                if sd.is_block() and (os.path.exists(sd.writable_data) or os.path.exists(sd.writable_index)):
                    self.lifecycle.seal_writable(s)
                    new_labels = {**labels, L.LOCAL_COMMIT_PATH: sd.sealed}
                    s.size, s.inodes = os.stat(sd.sealed).st_blocks * 512, 1
                else:
                    new_labels = dict(labels)
                    s.size, s.inodes = disk_usage(sd.fs)
                    self._adopt_local_layer(tx, s)
                # containerd's CommitActive: Created and Updated are both the commit time
                s.key, s.kind, s.labels = name, COMMITTED, new_labels
                s.created_ns = s.updated_ns = now_ns()
                tx.save(s)
                crashpoint("commit.before-commit")
            crashpoint("commit.after-commit")

        self._guard(op)

    def _adopt_local_layer(self, tx: Transaction, s: Snapshot) -> None:
        """An overlaybd layer blob unpacked by containerd itself (pulled without the image-ref label) leaves
        `fs/overlaybd.commit`; from then on it is served as a block layer (upstream's "localBD")."""
        sd = self.dir(s)
        parent = tx.get(s.parent) if s.parent else None
        if not is_overlaybd_file(sd.commit_file) or (parent is not None and not self.dir(parent).is_block()):
            return
        os.makedirs(sd.mountpoint, exist_ok=True)
        lowers = [*parent_lowers(self.dir(parent) if parent else None), {"file": sd.commit_file}]
        write_config(sd.config, {"repoBlobUrl": "", "lowers": lowers, "resultFile": sd.result_file})

    def remove(self, key: str) -> None:
        def op() -> None:
            with self.store.transaction() as tx:
                s = tx.get(key)
                if tx.has_children(key):
                    raise FailedPrecondition(f"cannot remove snapshot {key} with child: failed precondition")
                tx.delete(s.id)
            crashpoint("remove.after-commit")
            sd = self.dir(s)
            if not self.cfg.async_remove:
                self.lifecycle.release(sd)
                remove_tree(sd.path)
            if self.cfg.auto_remove_dev and s.parent:
                self._release_unused(s.parent)

        self._guard(op)

    def _release_unused(self, key: str) -> None:
        """autoRemoveDev: detach a layer's read-only device once no snapshot is stacked on it any more."""
        with self.store.transaction() as tx:
            p = tx.find(key)
            if p is None or tx.has_children(key):
                return
        psd = self.dir(p)
        if psd.is_block():
            self.lifecycle.release(psd)

    def stat(self, key: str) -> Snapshot:
        def op() -> Snapshot:
            with self.store.transaction() as tx:
                return tx.get(key)

        return self._guard(op)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        def op() -> Snapshot:
            with self.store.transaction() as tx:
                s = tx.get(key)
                new = dict(s.labels)
                if not paths:
                    new = dict(labels)
                for path in paths:
                    if path.startswith("labels."):
                        k = path[len("labels.") :]
                        if labels.get(k):
                            new[k] = labels[k]
                        else:
                            new.pop(k, None)
                    elif path == "labels":
                        new = dict(labels)
                    else:
                        raise InvalidArgument(f"cannot update {path!r} field on snapshot {key!r}: invalid argument")
                L.validate(new)
                s.labels, s.updated_ns = new, now_ns()
                tx.save(s)
                return s

        return self._guard(op)

    def list(self, filters: list[str]) -> list[Snapshot]:
        match = compile_filters(filters)

        def op() -> list[Snapshot]:
            with self.store.transaction() as tx:
                rows = tx.all()
            return [s for s in rows if match(s)]  # matched after the store lock is released

        return self._guard(op)

    def usage(self, key: str) -> tuple[int, int]:
        def op() -> tuple[int, int]:
            with self.store.transaction() as tx:
                s = tx.get(key)
            if s.kind == COMMITTED:
                return s.size, s.inodes
            sd = self.dir(s)
            if os.path.exists(sd.writable_data):
                st = os.stat(sd.writable_data)
                return st.st_blocks * 512, 1
            return disk_usage(sd.fs)

        return self._guard(op)

    def cleanup(self) -> None:
        """Delete directories no row refers to (crash leftovers, asyncRemove backlog)."""
        self._guard(self._remove_orphans)

    # -- start-up --------------------------------------------------------------------------------
    def _remove_orphans(self) -> builtins.list[str]:
        with self.store.transaction() as tx:
            ids = {str(s.id) for s in tx.all()}
        removed = []
        base = snapshots_dir(self.root)
        for name in sorted(os.listdir(base)):
            if name in ids:
                continue
            path = os.path.join(base, name)
            if name.isdigit():
                self.lifecycle.release(SnapshotDir(self.root, int(name)))
            remove_tree(path)
            removed.append(name)
        if removed:
            log.info("removed %d orphaned snapshot dirs: %s", len(removed), ", ".join(removed))
        return removed

    def reconcile(self) -> dict[str, Any]:
        """Make the store and the directories agree after a crash; report what was fixed."""
        dropped: list[str] = []
        stale: list[str] = []
        live: list[tuple[str, SnapshotDir]] = []
        with self.store.transaction() as tx:
            rows = tx.all()
            for s in sorted(rows, key=lambda r: -r.id):  # children have larger ids: leaf first
                sd = self.dir(s)
                if not os.path.isdir(sd.path):
                    if tx.has_children(s.key):
                        os.makedirs(sd.fs, exist_ok=True)
                        os.makedirs(sd.work, exist_ok=True)
                        log.error("snapshot %s (id %d) lost its directory; recreated empty", L.esc(s.key), s.id)
                    else:
                        tx.delete(s.id)
                        dropped.append(s.key)
                        log.error("snapshot %s (id %d) has no directory; dropped", L.esc(s.key), s.id)
                    continue
                live.append((s.key, sd))
        orphans = self._remove_orphans()

        def devices() -> None:
            for key, sd in live:
                if self.lifecycle.drop_stale(sd):
                    stale.append(key)
                    log.info("snapshot %s: stale device mount dropped; attached again on demand", L.esc(key))

        why = self.lifecycle.frontend_down() if self.devices is not None else None
        if why is None:
            devices()
        else:  # overlaybd-tcmu not up yet: serve anyway; devices are checked once the frontend appears
            log.warning("device reconcile deferred until the frontend is up: %s", why)
            self.lifecycle.defer_until_frontend(devices)
        return {"dropped": dropped, "orphans": orphans, "stale_mounts": stale, "devices_deferred": why is not None}

    def watch_frontend(self, stop: Callable[[], bool], interval: float = 1.0) -> None:
        """Until `stop()`: run the deferred device reconcile as soon as the frontend appears (a thread of the
        daemon; device requests arriving first run it themselves)."""
        import time

        while not stop() and not self.lifecycle.run_deferred():
            time.sleep(interval)

    def walk(self) -> Iterator[Snapshot]:
        yield from self.list([])
