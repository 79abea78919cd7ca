"""A deliberately misbehaving blob server for the fault tests (test-only, NOT a registry).

It serves known blobs at `/v2/<repo>/blobs/<digest>` with correct range semantics in mode `ok`, and
in the other modes does what broken registries, CDNs and attackers do: ignores `Range`, lies in
`Content-Range`, claims absurd totals, drips the body, redirects to other protocols, points the
token realm at another host over plain http, or answers with an error status. The real
docker-registry (conftest.py) covers the good paths; this covers what it never does.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time

from helpers.registry import LoopbackHTTP


class HostileServer(LoopbackHTTP):
    """`mode`: ok | ignore_range | shift_range | total | drip | redirect | realm | status."""

    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs = {"sha256:" + hashlib.sha256(b).hexdigest(): b for b in blobs}
        self.mode = "ok"
        self.total: int | None = None  # `total`: the Content-Range total to claim
        self.location = ""  # `redirect`: where to send blob requests
        self.realm = ""  # `realm`: the Bearer realm of the 401 challenge
        self.status = 403  # `status`: the status to answer with
        self.drip_interval = 0.5  # `drip`: one byte per interval (2 B/s)
        self.requests: list[tuple[str, str, str]] = []  # (path, Range, Authorization)
        self.lock = threading.Lock()
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with srv.lock:
                    srv.requests.append(
                        (self.path, self.headers.get("Range", ""), self.headers.get("Authorization", ""))
                    )
                srv.handle(self)

            def log_message(self, *a: object) -> None:
                pass

        self._serve(Handler)

    def url(self, repo: str = "bad/app") -> str:
        return f"http://{self.host}/v2/{repo}/blobs"

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        mode = self.mode
        if mode == "redirect":
            return self._reply(h, 307, b"", {"Location": self.location})
        if mode == "status":
            return self._reply(h, self.status, b'{"errors":[{"code":"DENIED"}]}', {})
        if mode == "realm" and not h.headers.get("Authorization", "").startswith("Bearer "):
            challenge = f'Bearer realm="{self.realm}",service="hostile"'
            return self._reply(h, 401, b"", {"WWW-Authenticate": challenge})
        data = self.blobs.get(h.path.split("?")[0].rsplit("/", 1)[-1])
        if data is None:
            return self._reply(h, 404, b"", {})
        rng = h.headers.get("Range", "")
        if not rng or mode == "ignore_range":
            return self._reply(h, 200, data, {})
        a_s, _, b_s = rng.removeprefix("bytes=").partition("-")
        a, b = int(a_s), min(int(b_s), len(data) - 1)
        if mode == "shift_range":  # honest about serving the wrong range
            a, b = a + 4096, b + 4096
        total = self.total if mode == "total" and self.total is not None else len(data)
        hdrs = {"Content-Range": f"bytes {a}-{b}/{total}"}
        body = data[a : b + 1]
        if mode == "drip":
            h.send_response(206)
            for k, v in {**hdrs, "Content-Length": str(len(body))}.items():
                h.send_header(k, v)
            h.end_headers()
            try:
                for i in range(len(body)):
                    h.wfile.write(body[i : i + 1])
                    h.wfile.flush()
                    time.sleep(self.drip_interval)
            except OSError:
                pass  # the client gave up: that is the point
            h.close_connection = True
            return None
        return self._reply(h, 206, body, hdrs)

    @staticmethod
    def _reply(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes, hdrs: dict[str, str]) -> None:
        h.send_response(status)
        for k, v in hdrs.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        try:
            h.wfile.write(body)
        except OSError:
            pass  # the client aborted (it refused the body): expected


class Listener:
    """A TCP listener that records every connection (and the bytes sent): proves nothing connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(0.5)
            try:
                got = conn.recv(4096)
            except OSError:
                got = b""
            self.connections.append(got)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
