"""HTTP over pycurl: one reusable handle per thread so connections are kept alive.

Why pycurl and not urllib: keep-alive connection reuse, HTTP/2 over TLS where the
server offers it, client certificates, proxies and fast bulk transfers all come
from libcurl. Redirects are never followed here — the registry client follows them
itself so that an Authorization header is not sent to blob storage.

A body either lands in a caller-owned memoryview (range reads: no intermediate
buffer beyond libcurl's chunks) or in a bounded bytearray (manifests, tokens):
nothing allocates a size the server merely claims. A `200` is written into a
memoryview only when the caller says a whole-body answer is acceptable; otherwise the
transfer is aborted at its first byte, so a server that ignores `Range` cannot pour
a blob's beginning into a buffer meant for its middle.

Only http and https are spoken, also for anything a redirect or proxy could name:
libcurl knows file://, gopher:// and dozens more, none of which a registry needs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import pycurl

from .memcopy import NOGIL_MIN, copy_into

CA_BUNDLES = ("/etc/ssl/certs/ca-bundle.crt", "/etc/ssl/certs/ca-certificates.crt")
# libcurl errors that retrying cannot fix: unsupported protocol (also HTTP/0.9 answers), malformed URL,
# bad/unknown CA, our client cert/key unusable, TLS version/cipher mismatch.
PERMANENT_CURL_ERRORS = frozenset({1, 3, 58, 59, 60, 77, 80, 83, 90, 91})
# CURLE_SSL_CONNECT_ERROR (35) covers both a broken handshake that will break again (TLS spoken to a plain
# HTTP port: "wrong version number") and a connection lost mid-handshake; only the latter is worth a retry.
SSL_CONNECT_ERROR = 35
_TRANSIENT_TLS = ("reset", "syscall", "timed out", "timeout", "unexpected eof", "connection")
MAX_SMALL_BODY = 8 << 20  # manifests, indexes, tokens, credential answers
ALLOWED_SCHEMES = ("http", "https")
_PROTOCOLS = pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS
LOW_SPEED_LIMIT = 1024  # bytes/s: a body slower than this for `stall_timeout` is a stall (a drip, not a download)


def is_permanent(curl_code: int, message: str) -> bool:
    """True for transport errors that a retry cannot fix (so the read fails at once)."""
    if curl_code in PERMANENT_CURL_ERRORS:
        return True
    if curl_code == SSL_CONNECT_ERROR:
        low = message.lower()
        return not any(t in low for t in _TRANSIENT_TLS)
    return False


class TransportError(Exception):
    """The request did not complete at the HTTP level (connect refused, reset, timeout, short body)."""

    def __init__(self, url: str, message: str, curl_code: int = 0, permanent: bool | None = None) -> None:
        self.url = url
        self.curl_code = curl_code
        self.permanent = is_permanent(curl_code, message) if permanent is None else permanent
        super().__init__(f"{url}: {message}" if url else message)


@dataclass
class Response:
    """Status line, headers (lower-cased names) and either a small body or the count written into a sink."""

    status: int
    url: str
    http_version: int = 0  # 1 (HTTP/1.x), 2, 3
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    nbytes: int = 0
    refused: bool = False  # a 200 to a range request: aborted at its first byte, nothing written
    overflow: bool = False  # more body than the memoryview holds: aborted, the view holds garbage

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

    __slots__ = ("view", "vlen", "pos", "buf", "limit", "overflow", "status", "accept_200", "refused")

    def __init__(self, view: memoryview | None, limit: int, accept_200: bool) -> None:
        self.view = view
        self.vlen = len(view) if view is not None else 0
        self.pos = 0
        self.buf = bytearray() if view is None else None
        self.limit = limit
        self.overflow = False
        self.status = 0
        self.accept_200 = accept_200
        self.refused = False

    def write(self, chunk: bytes) -> int | None:
        view = self.view
        if view is not None:
            st = self.status
            if st == 200 and not self.accept_200:
                self.refused = True
                return 0  # abort: a whole-body answer to a range request is never data at our offset
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
        stall_timeout: float = 10.0,
        low_speed_limit: int = LOW_SPEED_LIMIT,
    ) -> None:
        self.user_agent = user_agent
        self.cert_file = cert_file
        self.key_file = key_file
        self.ca_file = ca_file if ca_file is not None else (os.environ.get("OVERLAYBD_CA_FILE") or system_ca_bundle())
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.low_speed_limit = low_speed_limit
        self.proxy = ""  # HTTP proxy for every request (p2pConfig in proxy mode, e.g. a Dragonfly dfdaemon)
        self.skip_verify_hosts: set[str] = set()  # host[:port] of mirrors with hosts.toml `skip_verify = true`
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
        accept_200: bool = True,
    ) -> Response:
        """Run one request. Raises TransportError on connection-level failures only.

        `timeout` (seconds, 0 = none) bounds the whole request; `accept_200=False` makes a sink
        refuse a 200 body (see the module doc)."""
        scheme = url.partition("://")[0].lower()
        if scheme not in ALLOWED_SCHEMES:
            raise TransportError(url, f"protocol {scheme!r} refused: only http and https are used", permanent=True)
        c = self._handle()
        c.reset()
        out = _Sink(sink, limit, accept_200)
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
        c.setopt(pycurl.PROTOCOLS, _PROTOCOLS)  # libcurl's own guard, should a URL slip past the check above
        c.setopt(pycurl.REDIR_PROTOCOLS, _PROTOCOLS)
        c.setopt(pycurl.NOSIGNAL, 1)
        connect = self.connect_timeout if not timeout else min(self.connect_timeout, timeout)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(connect * 1000)))
        # A stalled or dripping transfer (under low_speed_limit B/s for the stall time) fails; a slow big one
        # does not. The stall time fits inside the request's timeout so a drip is caught before it.
        stall = self.stall_timeout if not timeout else min(self.stall_timeout, timeout / 3)
        c.setopt(pycurl.LOW_SPEED_LIMIT, self.low_speed_limit)
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, int(stall)))
        if timeout:
            c.setopt(pycurl.TIMEOUT_MS, max(1, int(timeout * 1000)))
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS)
        c.setopt(pycurl.TCP_KEEPALIVE, 1)
        c.setopt(pycurl.BUFFERSIZE, 512 * 1024)
        if self.ca_file:
            c.setopt(pycurl.CAINFO, self.ca_file)
        if self.skip_verify_hosts and scheme == "https" and _netloc(url) in self.skip_verify_hosts:
            c.setopt(pycurl.SSL_VERIFYPEER, 0)
            c.setopt(pycurl.SSL_VERIFYHOST, 0)
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
            code = int(e.args[0]) if e.args else 0
            status = c.getinfo(pycurl.RESPONSE_CODE)
            if code == pycurl.E_WRITE_ERROR and sink is not None and (out.refused or out.overflow):
                # Aborted by us: the caller decides (with status and headers) what the server did wrong.
                resp.status = status
                resp.nbytes = out.pos
                resp.refused = out.refused
                resp.overflow = out.overflow
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


def _netloc(url: str) -> str:
    """`host[:port]` of an http(s) URL (without userinfo)."""
    return url.partition("://")[2].partition("/")[0].partition("?")[0].rpartition("@")[2]
