"""HTTP over pycurl: one reusable handle per thread so connections are kept alive.

Why pycurl and not urllib: keep-alive connection reuse, HTTP/2 over TLS where the
server offers it, client certificates, proxies and fast bulk transfers all come
from libcurl. Redirects are never followed here — the registry client follows them
itself so that an Authorization header is not sent to blob storage.

A body either lands in a caller-owned memoryview (range reads: no intermediate
buffer beyond libcurl's chunks) or in a bounded bytearray (manifests, tokens):
nothing allocates a size the server merely claims.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import pycurl

from .memcopy import NOGIL_MIN, copy_into

CA_BUNDLES = ("/etc/ssl/certs/ca-bundle.crt", "/etc/ssl/certs/ca-certificates.crt")
# libcurl errors that retrying cannot fix: bad/unknown CA, our client cert/key unusable, TLS version/cipher mismatch.
PERMANENT_CURL_ERRORS = frozenset({58, 59, 60, 77, 80, 83, 90, 91})
MAX_SMALL_BODY = 8 << 20  # manifests, indexes, tokens, credential answers


class TransportError(Exception):
    """The request did not complete at the HTTP level (connect refused, reset, timeout, short body)."""

    def __init__(self, url: str, message: str, curl_code: int = 0) -> None:
        self.url = url
        self.curl_code = curl_code
        self.permanent = curl_code in PERMANENT_CURL_ERRORS
        super().__init__(f"{url}: {message}")


@dataclass
class Response:
    """Status line, headers (lower-cased names) and either a small body or the count written into a sink."""

    status: int
    url: str
    http_version: int = 0  # 1 (HTTP/1.x), 2, 3
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    nbytes: int = 0

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)


def system_ca_bundle() -> str | None:
    """The CA bundle upstream uses: ca-bundle.crt, else Debian's ca-certificates.crt."""
    for p in CA_BUNDLES:
        if os.path.exists(p):
            return p
    return None


class _Sink:
    """libcurl write callback target: a memoryview (exact size) or a bounded bytearray."""

    __slots__ = ("view", "vlen", "pos", "buf", "limit", "overflow", "status")

    def __init__(self, view: memoryview | None, limit: int) -> None:
        self.view = view
        self.vlen = len(view) if view is not None else 0
        self.pos = 0
        self.buf = bytearray() if view is None else None
        self.limit = limit
        self.overflow = False
        self.status = 0

    def write(self, chunk: bytes) -> int | None:
        view = self.view
        if view is not None:
            st = self.status
            if st == 206 or st == 200:  # the hot path: body bytes straight into the caller's buffer
                pos = self.pos
                end = pos + len(chunk)
                if end > self.vlen:
                    self.overflow = True
                    return 0  # abort: the server sent more than asked for
                if end - pos < NOGIL_MIN:
                    view[pos:end] = chunk
                else:
                    copy_into(view[pos:end], chunk)  # libcurl 8 passes <= 16 KiB; builds honouring BUFFERSIZE more
                self.pos = end
                return None
            # An error body (JSON errors, redirects) never goes into the caller's data buffer.
            if self.buf is None:
                self.buf = bytearray()
            if len(self.buf) + len(chunk) <= 65536:
                self.buf += chunk
            return None
        if self.pos + len(chunk) > self.limit:
            self.overflow = True
            return 0
        self.buf += chunk  # type: ignore[operator]
        self.pos += len(chunk)
        return None


class HttpTransport:
    """Thread-safe request runner; each thread owns a pycurl handle (and its connection cache)."""

    def __init__(
        self,
        user_agent: str,
        cert_file: str = "",
        key_file: str = "",
        ca_file: str | None = None,
        connect_timeout: float = 5.0,
        stall_timeout: float = 15.0,
    ) -> None:
        self.user_agent = user_agent
        self.cert_file = cert_file
        self.key_file = key_file
        self.ca_file = ca_file if ca_file is not None else (os.environ.get("OVERLAYBD_CA_FILE") or system_ca_bundle())
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.proxy = ""  # HTTP proxy for every request (p2pConfig in proxy mode, e.g. a Dragonfly dfdaemon)
        self.last_http_version = 0
        self._local = threading.local()
        self._handles: list[pycurl.Curl] = []
        self._lock = threading.Lock()

    def _handle(self) -> pycurl.Curl:
        c = getattr(self._local, "curl", None)
        if c is None:
            c = pycurl.Curl()
            self._local.curl = c
            with self._lock:
                self._handles.append(c)
        return c

    def request(
        self,
        method: str,
        url: str,
        headers: Iterable[str] = (),
        *,
        sink: memoryview | None = None,
        limit: int = MAX_SMALL_BODY,
        body: bytes | None = None,
        timeout: float = 0.0,
        proxy: str = "",
        unix_socket: str = "",
        cert: tuple[str, str, str] | None = None,
    ) -> Response:
        """Run one request. Raises TransportError on connection-level failures only."""
        c = self._handle()
        c.reset()
        out = _Sink(sink, limit)
        resp = Response(status=0, url=url)
        hdrs = resp.headers

        def on_header(line: bytes) -> None:
            text = line.decode("latin-1").rstrip("\r\n")
            if text.startswith("HTTP/"):
                hdrs.clear()  # a new response (e.g. after 100-continue)
                fields = text.split()
                out.status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
                return
            if ":" in text:
                k, _, v = text.partition(":")
                hdrs[k.strip().lower()] = v.strip()

        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.WRITEFUNCTION, out.write)
        c.setopt(pycurl.HEADERFUNCTION, on_header)
        c.setopt(pycurl.HTTPHEADER, list(headers))
        c.setopt(pycurl.USERAGENT, self.user_agent)
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, int(self.connect_timeout * 1000))
        # A stalled transfer (<1 byte/s for stall_timeout) fails; a slow big one does not.
        c.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, int(self.stall_timeout)))
        if timeout:
            c.setopt(pycurl.TIMEOUT_MS, int(timeout * 1000))
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS)
        c.setopt(pycurl.TCP_KEEPALIVE, 1)
        c.setopt(pycurl.BUFFERSIZE, 512 * 1024)
        if self.ca_file:
            c.setopt(pycurl.CAINFO, self.ca_file)
        cert_file, key_file, ca = cert if cert else (self.cert_file, self.key_file, "")
        if cert_file:
            c.setopt(pycurl.SSLCERT, cert_file)
        if key_file:
            c.setopt(pycurl.SSLKEY, key_file)
        if ca:
            c.setopt(pycurl.CAINFO, ca)
        c.setopt(pycurl.PROXY, proxy or self.proxy)
        if unix_socket:
            c.setopt(pycurl.UNIX_SOCKET_PATH, unix_socket)
        if method == "HEAD":
            c.setopt(pycurl.NOBODY, 1)
        elif method != "GET":
            c.setopt(pycurl.CUSTOMREQUEST, method)
            if body is not None:
                c.setopt(pycurl.POSTFIELDS, body)
        try:
            c.perform()
        except pycurl.error as e:
            code = e.args[0] if e.args else 0
            status = c.getinfo(pycurl.RESPONSE_CODE)
            if code == pycurl.E_WRITE_ERROR and out.overflow and sink is not None and status == 200:
                # Server ignored Range and sent the whole object: we have what we asked for.
                resp.status = status
                resp.nbytes = out.pos
                return resp
            if out.overflow:
                cap = len(sink) if sink is not None else limit
                raise TransportError(url, f"response body larger than {cap} bytes", code) from None
            raise TransportError(url, str(e.args[1] if len(e.args) > 1 else e), code) from None
        resp.status = c.getinfo(pycurl.RESPONSE_CODE)
        resp.http_version = {pycurl.CURL_HTTP_VERSION_2_0: 2, 30: 3}.get(c.getinfo(pycurl.INFO_HTTP_VERSION), 1)
        self.last_http_version = resp.http_version
        resp.nbytes = out.pos
        if out.buf is not None:
            resp.body = bytes(out.buf)
        return resp

    def close(self) -> None:
        with self._lock:
            for c in self._handles:
                c.close()
            self._handles.clear()
