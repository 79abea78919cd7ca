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
from typing import Any

from overlaybd.fuse.device import FuseDevice, ImageOpener

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/overlaybd/fuse.sock"
DEFAULT_RUN_DIR = "/run/overlaybd/fuse"


class FuseFrontend:
    """All FUSE devices of one daemon, driven through the control socket."""

    def __init__(self, opener: ImageOpener, *, socket_path: str = DEFAULT_SOCKET, run_dir: str = DEFAULT_RUN_DIR):
        self.opener = opener
        self.socket_path = socket_path
        self.run_dir = run_dir
        self.devices: dict[str, FuseDevice] = {}
        self._lock = threading.Lock()
        self._starting: set[str] = set()
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    # -- operations --------------------------------------------------------------------------
    def attach(self, config: str, dev_id: str, read_only: bool = False) -> FuseDevice:
        if not dev_id or "/" in dev_id or dev_id.startswith("."):
            raise ValueError(f"dev_id: invalid {dev_id!r}")
        with self._lock:
            if dev_id in self.devices or dev_id in self._starting:
                raise ValueError(f"dev_id: {dev_id} is already attached")
            self._starting.add(dev_id)  # opening may take long (remote layers): do not hold the lock
        try:
            dev = FuseDevice(config, dev_id, self.run_dir, self.opener, read_only=read_only)
            dev.start()
            with self._lock:
                self.devices[dev_id] = dev
            return dev
        finally:
            with self._lock:
                self._starting.discard(dev_id)

    def detach(self, dev_id: str) -> None:
        with self._lock:
            dev = self.devices.pop(dev_id, None)
        if dev is None:
            raise KeyError(f"dev_id: {dev_id} is not attached")
        dev.stop()

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
        except Exception as e:  # noqa: BLE001 - reported to the client
            return {"ok": False, "error": str(e)}

    # -- socket ------------------------------------------------------------------------------
    def serve(self) -> None:
        """Start listening (in a thread)."""
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

    def shutdown(self) -> None:
        """Stop accepting requests, then detach every device (flushing writable ones)."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        for dev_id in list(self.devices):
            try:
                self.detach(dev_id)
            except Exception as e:  # noqa: BLE001 - keep going
                log.error("fuse device %s: detach: %s", dev_id, e)


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
