"""Control socket of the daemon's FUSE frontend: attach/detach/list devices, one JSON object per line.

Why a socket: with TCMU the kernel tells the daemon about devices (configfs + netlink); without it
somebody must, and the FUSE server has to live in the long-running daemon, not in the caller.
Requests: {"op": "attach", "config": PATH, "dev_id": ID, "read_only": BOOL} -> {"ok": true, "device": "/dev/loopN",
"file": PATH}; {"op": "detach", "dev_id": ID}; {"op": "list"} -> {"ok": true, "devices": {ID: DEVICE}}.
Errors -> {"ok": false, "error": MESSAGE}.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
import time
from typing import Any

from overlaybd.fuse.file_device import FileDevice
from overlaybd.host import loop
from overlaybd.host.mount import umount_all_under
from overlaybd.image.frontend import BlockImage, ImageOpener

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/overlaybd/fuse.sock"
DEFAULT_RUN_DIR = "/run/overlaybd/fuse"

#: how long a detach waits for the kernel to release a loop device before keeping it served
DETACH_WAIT = 5.0


class Served:
    """One attached device: the opened image and the FUSE file + loop device serving it."""

    def __init__(self, dev_id: str, config: str, image: BlockImage, file_device: FileDevice):
        self.dev_id = dev_id
        self.config = config
        self.image = image
        self.file_device = file_device

    @property
    def device(self) -> str | None:
        return self.file_device.device

    @property
    def file(self) -> str:
        return self.file_device.file

    def close(self, *, force: bool = False) -> None:
        """Tear down the device, then flush a writable image and close it."""
        self.file_device.stop(force=force)
        close_image(self.image, self.dev_id)


def close_image(image: BlockImage, dev_id: str) -> None:
    """Flush (writable) and close an image; a flush failure is logged (the device is gone either way)."""
    if not image.read_only:
        try:
            image.fsync()
        except OSError as e:
            log.error("fuse device %s: fsync: %s", dev_id, e)
    close = getattr(image, "close", None)
    if close:
        close()


class FuseFrontend:
    """All FUSE devices of one daemon, driven through the control socket.

    A detached device whose loop device is still in use (a lazily unmounted file system still
    flushing) keeps being served until the kernel lets go of it ("lingering"), so its last writes
    land; shutdown tears everything down, and sweeps `run_dir` for loop devices and mounts left
    by a crashed predecessor, so stopping the daemon leaves none behind.
    """

    def __init__(self, opener: ImageOpener, *, socket_path: str = DEFAULT_SOCKET, run_dir: str = DEFAULT_RUN_DIR):
        self.opener = opener
        self.socket_path = socket_path
        self.run_dir = run_dir
        self.devices: dict[str, Served] = {}
        self.lingering: dict[str, Served] = {}
        self._lock = threading.Condition()
        self._starting: set[str] = set()
        self._closing = False
        self._reaper: threading.Thread | None = None
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    # -- operations --------------------------------------------------------------------------
    def attach(self, config: str, dev_id: str, read_only: bool = False) -> Served:
        if not dev_id or "/" in dev_id or dev_id.startswith("."):
            raise ValueError(f"dev_id: invalid {dev_id!r}")
        with self._lock:
            if self._closing:
                raise RuntimeError("daemon: shutting down")
            if dev_id in self.devices or dev_id in self._starting:
                raise ValueError(f"dev_id: {dev_id} is already attached")
            if dev_id in self.lingering:
                raise ValueError(f"dev_id: {dev_id} was detached but its loop device is still in use")
            self._starting.add(dev_id)  # opening may take long (remote layers): do not hold the lock
        try:
            image = self.opener(config)
            fdev = FileDevice(image, os.path.join(self.run_dir, f"{dev_id}.img"), read_only=read_only)
            try:
                fdev.start()
            except BaseException:
                close_image(image, dev_id)
                raise
            served = Served(dev_id, config, image, fdev)
            log.info("fuse device %s: %s -> %s (%s)", dev_id, config, fdev.device, "ro" if fdev.read_only else "rw")
            with self._lock:
                if not self._closing:
                    self.devices[dev_id] = served
                    return served
            served.close(force=True)  # shutdown began while we were attaching: leave nothing behind
            raise RuntimeError("daemon: shutting down")
        finally:
            with self._lock:
                self._starting.discard(dev_id)
                self._lock.notify_all()

    def detach(self, dev_id: str) -> None:
        """Detach; a device still in use stays served until released (see the class doc)."""
        with self._lock:
            served = self.devices.pop(dev_id, None)
        if served is None:
            raise KeyError(f"dev_id: {dev_id} is not attached")
        if served.file_device.release(DETACH_WAIT):
            served.close()
            log.info("fuse device %s: detached", dev_id)
            return
        log.warning(
            "fuse device %s: %s still in use by %s: served until released",
            dev_id,
            served.device,
            served.file_device.holders() or "an opener",
        )
        with self._lock:
            self.lingering[dev_id] = served
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="fuse-reaper", daemon=True)
                self._reaper.start()

    def _reap(self) -> None:
        """Close lingering devices once the kernel has released their loop devices."""
        while True:
            with self._lock:
                if self._closing or not self.lingering:
                    self._reaper = None
                    return
                done = [s for s in self.lingering.values() if s.file_device.released()]
                for s in done:
                    del self.lingering[s.dev_id]
            for s in done:
                s.close()
                log.info("fuse device %s: released, detached", s.dev_id)
            time.sleep(0.5)

    def handle(self, req: Any) -> dict[str, Any]:
        """One request object -> one reply object; never raises."""
        try:
            if not isinstance(req, dict):
                raise ValueError("request: must be a JSON object")
            op = req.get("op")
            if op == "attach":
                dev = self.attach(str(req["config"]), str(req["dev_id"]), bool(req.get("read_only", False)))
                return {"ok": True, "device": dev.device, "file": dev.file}
            if op == "detach":
                self.detach(str(req["dev_id"]))
                return {"ok": True}
            if op == "list":
                with self._lock:
                    return {"ok": True, "devices": {k: v.device for k, v in self.devices.items()}}
            raise ValueError(f"op: unknown {op!r}")
        except KeyError as e:
            return {"ok": False, "error": str(e).strip("'\"")}
        except Exception as e:  # reported to the client
            return {"ok": False, "error": str(e)}

    # -- socket ------------------------------------------------------------------------------
    def serve(self) -> None:
        """Clear leftovers of a previous run, then start listening (in a thread)."""
        self.sweep()
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        frontend = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    try:
                        req = json.loads(line)
                    except ValueError as e:
                        reply = {"ok": False, "error": f"request: not JSON: {e}"}
                    else:
                        reply = frontend.handle(req)
                    self.wfile.write(json.dumps(reply).encode() + b"\n")

        self._server = socketserver.ThreadingUnixStreamServer(self.socket_path, Handler)
        self._server.daemon_threads = True
        os.chmod(self.socket_path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fuse-control", daemon=True)
        self._thread.start()
        log.info("fuse frontend: control socket %s", self.socket_path)

    def shutdown(self, attach_wait: float = 60.0) -> None:
        """Stop accepting requests, then detach every device (flushing writable ones) and sweep `run_dir`."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        with self._lock:
            self._closing = True
            self._lock.wait_for(lambda: not self._starting, attach_wait)  # attaches in flight clean up after themselves
            served = list(self.devices.values()) + list(self.lingering.values())
            self.devices.clear()
            self.lingering.clear()
        for s in served:
            try:
                s.close(force=True)
            except Exception as e:  # keep going
                log.error("fuse device %s: detach: %s", s.dev_id, e)
        self.sweep()

    def sweep(self) -> None:
        """Detach loop devices backed by files in `run_dir` and unmount what is mounted there.

        At start this clears what a killed predecessor left; at shutdown, anything missed.
        """
        for dev in loop.devices_backed_by(self.run_dir):
            log.warning("fuse: detaching leftover %s (%s)", dev, loop.backing_file(dev))
            try:
                loop.detach(dev)
            except loop.LoopError as e:
                log.error("%s", e)
        if os.path.isdir(self.run_dir):
            umount_all_under(self.run_dir)


def request(req: dict[str, Any], socket_path: str = DEFAULT_SOCKET, timeout: float = 60.0) -> dict[str, Any]:
    """Client side: send one request to a running daemon and return its reply (raises on {ok: false})."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        raise RuntimeError(f"{socket_path}: {req.get('op')}: {reply.get('error')}")
    return reply
