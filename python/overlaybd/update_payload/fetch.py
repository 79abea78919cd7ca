"""Download a payload over http(s) with pycurl into a file, with bounded time and size.

Why its own small fetcher: the registry transport is built for range reads into memory; a payload is
one whole-file GET to disk. Only http and https are spoken (also after redirects), a stalled
transfer fails, a transfer longer than `timeout` fails, and an HTTP error fails at once with its
status (a missing payload is an answer, not something to retry). Connection failures and 5xx are
retried a few times: a machine fetching at boot may be up before its network or the server.
"""

from __future__ import annotations

import os
import time
from typing import BinaryIO
from urllib.parse import urlsplit

import pycurl

from .errors import PayloadError

CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs/ca-bundle.crt")
PROTOCOLS = pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS
MAX_PAYLOAD = 4 << 30  # payload data offsets are 32-bit
STALL_SECONDS = 30
LOW_SPEED = 1024  # bytes/s


class FetchError(PayloadError):
    """The payload could not be downloaded (HTTP error, connection, timeout, bad URL)."""


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise FetchError(f"{url}: not an http:// or https:// URL")


def fetch(url: str, out: BinaryIO, *, timeout: float = 600.0, retries: int = 2, user_agent: str = "") -> int:
    """GET `url` into `out` (truncated first on every attempt); returns the byte count."""
    check_url(url)
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(5.0, float(attempt)))
        out.seek(0)
        out.truncate()
        c = pycurl.Curl()
        try:
            c.setopt(pycurl.URL, url)
            c.setopt(pycurl.WRITEDATA, out)
            c.setopt(pycurl.PROTOCOLS, PROTOCOLS)
            c.setopt(pycurl.REDIR_PROTOCOLS, PROTOCOLS)
            c.setopt(pycurl.FOLLOWLOCATION, 1)
            c.setopt(pycurl.MAXREDIRS, 5)
            c.setopt(pycurl.NOSIGNAL, 1)
            c.setopt(pycurl.CONNECTTIMEOUT, max(1, min(30, int(timeout))))
            c.setopt(pycurl.TIMEOUT_MS, max(1, int(timeout * 1000)))
            c.setopt(pycurl.LOW_SPEED_LIMIT, LOW_SPEED)
            c.setopt(pycurl.LOW_SPEED_TIME, STALL_SECONDS)
            c.setopt(pycurl.MAXFILESIZE_LARGE, MAX_PAYLOAD)
            if user_agent:
                c.setopt(pycurl.USERAGENT, user_agent)
            ca = next((p for p in CA_BUNDLES if os.path.exists(p)), None)
            if ca:
                c.setopt(pycurl.CAINFO, ca)
            try:
                c.perform()
            except pycurl.error as e:
                code = e.args[0] if e.args else 0
                last = f"{url}: {e.args[1] if len(e.args) > 1 else e} (curl error {code})"
                if code in (
                    pycurl.E_COULDNT_CONNECT,
                    pycurl.E_OPERATION_TIMEDOUT,
                    pycurl.E_RECV_ERROR,
                    pycurl.E_GOT_NOTHING,
                    pycurl.E_PARTIAL_FILE,
                    pycurl.E_COULDNT_RESOLVE_HOST,
                ):
                    continue
                raise FetchError(last) from None
            status = int(c.getinfo(pycurl.RESPONSE_CODE))
            if status >= 500:
                last = f"{url}: HTTP {status}"
                continue
            if status != 200:
                raise FetchError(f"{url}: HTTP {status}")
            out.flush()
            return out.tell()
        finally:
            c.close()
    raise FetchError(f"{last} (after {retries + 1} attempts)")
