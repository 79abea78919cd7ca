"""OCI distribution client: manifests, whole blobs and blob ranges, with auth, redirects and retries.

One `RegistryClient` per service configuration is shared by every remote layer
of the process: it owns the HTTP transport (kept-alive connections), the token
cache and where each blob's redirect currently points. Every failure that is
given up on raises `RegistryError`, which names registry, repository, digest and
the last HTTP status, so a log line alone says what was being fetched from where.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from .auth import AuthError, Challenge, TokenCache, basic_header, parse_challenge, parse_token_response, token_url
from .credentials import CredentialError, CredentialProvider
from .metrics import METRICS
from .reference import BlobLocation, ImageReference, parse_blob_url, parse_reference
from .transport import HttpTransport, Response, TransportError

log = logging.getLogger(__name__)

MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_ACCEPT = (MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)

REDIRECT_LIFE = 300.0  # seconds a resolved blob-storage URL is reused (upstream kMinimalAUrlLife)
MAX_REDIRECTS = 5
MAX_BLOB_IN_MEMORY = 64 << 20  # get_blob() is for configs and small files


class RegistryError(OSError):
    """A registry request failed for good. errno: EPERM auth, ENOENT not found, EBUSY 429, EIO otherwise."""

    def __init__(
        self, registry: str, repository: str, digest: str, status: int, message: str, code: int = errno.EIO
    ) -> None:
        self.registry = registry
        self.repository = repository
        self.digest = digest
        self.status = status
        what = f"{registry}/{repository}" + (f"@{digest}" if digest else "")
        st = f"HTTP {status}" if status else "no HTTP response"
        super().__init__(code, f"registry {what}: {st}: {message}")

    def __str__(self) -> str:  # the message alone (it lands in resultFile); errno stays available
        return str(self.strerror)


def _errno_for(status: int) -> int:
    if status in (401, 403):
        return errno.EPERM
    if status == 404:
        return errno.ENOENT
    if status == 429:
        return errno.EBUSY
    return errno.EIO


@dataclass
class Manifest:
    media_type: str
    digest: str
    body: bytes
    doc: dict[str, Any]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.doc.get("layers", []))

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.doc.get("config", {}))


@dataclass
class _Redirect:
    url: str
    expires: float


class RegistryClient:
    """Talks to OCI registries on behalf of one service configuration (overlaybd.json)."""

    def __init__(
        self,
        service: Any = None,
        *,
        retry_budget: float = 30.0,
        transport: HttpTransport | None = None,
        p2p_address: str | None = None,
    ) -> None:
        if service is None:
            from ..config.service import default_service_config

            service = default_service_config()
        self.service = service
        certs = getattr(service, "cert_config", None)
        self.transport = transport or HttpTransport(
            service.user_agent, cert_file=certs.cert_file if certs else "", key_file=certs.key_file if certs else ""
        )
        self.credentials = CredentialProvider.from_service(service, self.transport)
        self.tokens = TokenCache()
        self.retry_budget = retry_budget
        self._auth: dict[tuple[str, str], Challenge] = {}
        self._redirects: dict[str, _Redirect] = {}
        self._lock = threading.Lock()
        p2p = getattr(service, "p2p_config", None)
        if p2p_address is None:
            p2p_address = p2p.address if p2p is not None and p2p.enable else ""
        self.p2p_address = p2p_address
        self.p2p_prefix = ""  # upstream style: data URL = <address>/<blob url>
        if p2p_address and self._p2p_reachable():
            if urlsplit(p2p_address).path in ("", "/"):
                self.transport.proxy = p2p_address  # a plain HTTP proxy (dfdaemon proxy port)
            else:
                self.p2p_prefix = p2p_address.rstrip("/")

    # ------------------------------------------------------------------ auth

    def _auth_header(self, registry: str, repository: str, url: str, refresh: bool) -> str | None:
        """Authorization header for this repository, fetching a token if needed (credentials re-read)."""
        ch = self._auth.get((registry, repository))
        if ch is None:
            return None
        try:
            if ch.scheme == "basic":
                cred = self.credentials.lookup(url)
                return basic_header(cred) if cred else None
            if ch.scheme != "bearer":
                raise AuthError(f"unsupported WWW-Authenticate scheme {ch.scheme!r}")
            turl = token_url(ch, repository)
            if refresh:
                self.tokens.drop(turl)
            tok = self.tokens.get(turl)
            if tok is None:
                tok = self._fetch_token(registry, repository, turl, url)
            return "Authorization: Bearer " + tok
        except CredentialError as e:
            raise RegistryError(registry, repository, "", 0, f"credentials: {e}", errno.EPERM) from None
        except AuthError as e:
            raise RegistryError(registry, repository, "", 0, f"auth: {e}", errno.EPERM) from None

    def _fetch_token(self, registry: str, repository: str, turl: str, url: str) -> str:
        cred = self.credentials.lookup(url)
        headers = [basic_header(cred)] if cred else []
        try:
            resp = self.transport.request("GET", turl, headers, timeout=30.0)
        except TransportError as e:
            raise RegistryError(registry, repository, "", 0, f"token endpoint {turl}: {e}") from None
        if resp.status != 200:
            who = f"user {cred.username!r}" if cred else "anonymous"
            raise RegistryError(
                registry,
                repository,
                "",
                resp.status,
                f"token endpoint refused ({who}): {turl}",
                _errno_for(resp.status),
            )
        tok, life = parse_token_response(resp.body)
        self.tokens.put(turl, tok, life)
        return tok

    def _send(
        self,
        loc_registry: str,
        repository: str,
        method: str,
        url: str,
        headers: list[str],
        *,
        sink: memoryview | None = None,
        limit: int = 8 << 20,
        digest: str = "",
    ) -> Response:
        """One logical request to the registry: auth challenge handled, redirects followed without auth."""
        auth = self._auth_header(loc_registry, repository, url, refresh=False)
        rounds = 0  # 401 without auth -> authenticate; 401 with a (stale) token -> refresh once more
        while True:
            hs = headers + ([auth] if auth else [])
            resp = self.transport.request(method, url, hs, sink=sink, limit=limit)
            if resp.status == 401 and rounds < 2:
                ch = parse_challenge(resp.header("www-authenticate"))
                if ch is None:
                    return resp
                self._auth[(loc_registry, repository)] = ch
                auth = self._auth_header(loc_registry, repository, url, refresh=True)
                rounds += 1
                if auth is None:
                    return resp
                continue
            break
        hops = 0
        while resp.status in (301, 302, 303, 307, 308) and hops < MAX_REDIRECTS:
            target = urljoin(url, resp.header("location"))
            if not target:
                break
            hops += 1
            same = urlsplit(target).netloc == urlsplit(url).netloc
            resp = self.transport.request(
                method, target, headers + ([auth] if auth and same else []), sink=sink, limit=limit
            )
            resp.url = target
        return resp

    # ------------------------------------------------------------- manifests

    def get_manifest(self, ref: ImageReference | str, platform: str = "linux/amd64", scheme: str = "https") -> Manifest:
        """The image manifest for `ref`; an index/manifest list is resolved to `platform` (os/arch[/variant])."""
        r = parse_reference(ref) if isinstance(ref, str) else ref
        m = self._fetch_manifest(r, r.reference, scheme)
        if m.media_type in INDEX_TYPES or "manifests" in m.doc:
            want = platform.split("/")
            for entry in m.doc.get("manifests", []):
                p = entry.get("platform") or {}
                have = [p.get("os", ""), p.get("architecture", "")] + ([p["variant"]] if p.get("variant") else [])
                if have[: len(want)] == want or (len(want) == 2 and have[:2] == want):
                    return self._fetch_manifest(r, entry["digest"], scheme)
            raise RegistryError(
                r.registry, r.repository, m.digest, 200, f"index has no manifest for {platform}", errno.ENOENT
            )
        return m

    def _fetch_manifest(self, r: ImageReference, reference: str, scheme: str) -> Manifest:
        url = f"{scheme}://{r.registry}/v2/{r.repository}/manifests/{reference}"
        resp = self._retrying(
            r.registry,
            r.repository,
            reference,
            lambda: self._send(r.registry, r.repository, "GET", url, ["Accept: " + ", ".join(MANIFEST_ACCEPT)]),
        )
        body = resp.body
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(
                r.registry, r.repository, reference, resp.status, f"manifest content hashes to {digest}"
            )
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise RegistryError(
                r.registry, r.repository, reference, resp.status, f"manifest is not JSON: {e}"
            ) from None
        if not isinstance(doc, dict):
            raise RegistryError(r.registry, r.repository, reference, resp.status, "manifest is not a JSON object")
        media = doc.get("mediaType") or resp.header("content-type").split(";")[0].strip()
        return Manifest(media, digest, body, doc)

    # ----------------------------------------------------------------- blobs

    @staticmethod
    def repo_blob_url(ref: ImageReference | str, scheme: str = "https") -> str:
        """The `repoBlobUrl` for config.v1.json: `<scheme>://HOST/v2/<repo>/blobs`."""
        r = parse_reference(ref) if isinstance(ref, str) else ref
        return f"{scheme}://{r.registry}/v2/{r.repository}/blobs"

    @classmethod
    def blob_url(cls, ref: ImageReference | str, digest: str, scheme: str = "https") -> str:
        return cls.repo_blob_url(ref, scheme) + "/" + digest

    def get_blob(
        self, ref: ImageReference | str, digest: str, scheme: str = "https", limit: int = MAX_BLOB_IN_MEMORY
    ) -> bytes:
        """A whole (small) blob, digest-verified."""
        r = parse_reference(ref) if isinstance(ref, str) else ref
        loc = BlobLocation(scheme, r.registry, r.repository, digest)
        resp = self._retrying(
            loc.registry,
            loc.repository,
            digest,
            lambda: self._send(loc.registry, loc.repository, "GET", loc.url, [], limit=limit),
        )
        got = "sha256:" + hashlib.sha256(resp.body).hexdigest()
        if digest.startswith("sha256:") and got != digest:
            raise RegistryError(loc.registry, loc.repository, digest, resp.status, f"content hashes to {got}")
        return resp.body

    def locate(self, repo_blob_url: str, digest: str) -> BlobLocation:
        return parse_blob_url(repo_blob_url, digest)

    def blob_size(self, loc: BlobLocation) -> int:
        """Total size from `Content-Range` of a one-byte range request (else Content-Length)."""
        one = memoryview(bytearray(1))
        resp = self._retrying(
            loc.registry,
            loc.repository,
            loc.digest,
            lambda: self._check(loc, self._range_once(loc, 0, one), 1, allow_short=True),
        )
        cr = resp.header("content-range")
        if "/" in cr and cr.rsplit("/", 1)[1].strip().isdigit():
            return int(cr.rsplit("/", 1)[1])
        cl = resp.header("content-length")
        if resp.status == 200 and cl.isdigit():
            return int(cl)
        raise RegistryError(loc.registry, loc.repository, loc.digest, resp.status, "no blob size in Content-Range")

    def read_range(self, loc: BlobLocation, offset: int, view: memoryview) -> int:
        """Fill `view` with blob bytes at `offset` (exactly len(view) unless the blob ends), retrying."""
        want = len(view)
        if want == 0:
            return 0
        t0 = time.monotonic()
        resp = self._retrying(
            loc.registry,
            loc.repository,
            loc.digest,
            lambda: self._check(loc, self._range_once(loc, offset, view), want),
        )
        METRICS.fetched(resp.nbytes, time.monotonic() - t0)
        return resp.nbytes

    def _data_url(self, loc: BlobLocation) -> tuple[str, bool]:
        """(URL for data, is_redirect_target). Redirect targets are used without auth for REDIRECT_LIFE."""
        with self._lock:
            rd = self._redirects.get(loc.url)
        if rd and rd.expires > time.monotonic():
            return rd.url, True
        return loc.url, False

    def _p2p_reachable(self) -> bool:
        """Upstream uses the P2P proxy only if a TCP connect to it succeeds (checked once)."""
        parts = urlsplit(self.p2p_address)
        try:
            with socket.create_connection((parts.hostname or "localhost", parts.port or 80), timeout=1.0):
                return True
        except OSError:
            log.warning("p2p proxy %s unreachable; fetching directly", self.p2p_address)
            return False

    def _p2p(self, url: str) -> str:
        return f"{self.p2p_prefix}/{url}" if self.p2p_prefix else url

    def _range_once(self, loc: BlobLocation, offset: int, view: memoryview) -> Response:
        rng = f"Range: bytes={offset}-{offset + len(view) - 1}"
        url, redirected = self._data_url(loc)
        if redirected or self.p2p_prefix:
            hs = [rng]
            if not redirected:  # the P2P proxy fetches from the registry itself: pass our credentials on
                auth = self._auth_header(loc.registry, loc.repository, loc.url, refresh=False)
                hs += [auth] if auth else []
            resp = self.transport.request("GET", self._p2p(url), hs, sink=view)
            if resp.status in (200, 206):
                return resp
            with self._lock:  # stale pre-signed URL / proxy refused: resolve again through the registry
                self._redirects.pop(loc.url, None)
        resp = self._send(loc.registry, loc.repository, "GET", loc.url, [rng], sink=view, digest=loc.digest)
        if resp.url != loc.url and resp.status in (200, 206):
            with self._lock:
                self._redirects[loc.url] = _Redirect(resp.url, time.monotonic() + REDIRECT_LIFE)
        return resp

    def _check(self, loc: BlobLocation, resp: Response, want: int, allow_short: bool = False) -> Response:
        if resp.status in (200, 206):
            if resp.nbytes < want and not allow_short:
                cr = resp.header("content-range")
                total = cr.rsplit("/", 1)[1] if "/" in cr else ""
                if not (total.isdigit() and resp.status == 206):
                    raise _Retryable(resp.status, f"short body: {resp.nbytes} of {want} bytes")
                # A range that runs past the end of the blob is legitimately short.
                start = int(cr.split()[-1].split("-")[0]) if cr.split() else 0
                if start + resp.nbytes < int(total):
                    raise _Retryable(resp.status, f"short body: {resp.nbytes} of {want} bytes")
            return resp
        if resp.status >= 500 or resp.status == 429:
            with self._lock:
                self._redirects.pop(loc.url, None)
            raise _Retryable(resp.status, "server error", _retry_after(resp))
        msg = {401: "authentication failed", 403: "access denied", 404: "blob not found"}.get(resp.status, "failed")
        raise RegistryError(loc.registry, loc.repository, loc.digest, resp.status, msg, _errno_for(resp.status))

    def _retrying(self, registry: str, repository: str, digest: str, op: Any) -> Response:
        """Run op() until it succeeds, a permanent error occurs, or the retry budget is spent."""
        deadline = time.monotonic() + self.retry_budget
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            floor = 0.0  # server-requested minimum pause (Retry-After)
            try:
                resp = op()
                if (
                    isinstance(resp, Response)
                    and resp.status >= 400
                    and resp.status not in (429,)
                    and resp.status < 500
                ):
                    msg = {401: "authentication failed", 403: "access denied", 404: "not found"}.get(
                        resp.status, "failed"
                    )
                    raise RegistryError(registry, repository, digest, resp.status, msg, _errno_for(resp.status))
                if isinstance(resp, Response) and (resp.status >= 500 or resp.status == 429):
                    raise _Retryable(resp.status, "server error", _retry_after(resp))
                return resp
            except _Retryable as e:
                status, why = e.status, e.why
                floor = min(e.retry_after, 10.0)  # honour Retry-After, within reason
                METRICS.error("http_5xx" if status >= 500 else "http_429" if status == 429 else "short_body")
            except TransportError as e:
                status, why = 0, str(e)
                METRICS.error("connection")
                if e.permanent:  # TLS trust / client certificate problems: retrying cannot help
                    raise RegistryError(registry, repository, digest, 0, why) from None
            except RegistryError:
                METRICS.error("permanent")
                raise
            now = time.monotonic()
            pause = max(floor, delay * (0.5 + random.random() / 2))
            if now + pause > deadline:
                METRICS.error("gave_up")
                raise RegistryError(
                    registry,
                    repository,
                    digest,
                    status,
                    f"gave up after {attempt} attempts in {self.retry_budget:.0f}s: {why}",
                )
            log.info(
                "registry %s/%s@%s: attempt %d failed (%s); retrying in %.2fs",
                registry,
                repository,
                digest,
                attempt,
                why,
                pause,
            )
            time.sleep(pause)
            delay = min(delay * 2, 2.0)

    def close(self) -> None:
        self.transport.close()


class _Retryable(Exception):
    def __init__(self, status: int, why: str, retry_after: float = 0.0) -> None:
        self.status = status
        self.why = why
        self.retry_after = retry_after
        super().__init__(why)


def _retry_after(resp: Response) -> float:
    """Seconds from a numeric Retry-After header (HTTP-date forms are ignored)."""
    v = resp.header("retry-after")
    return float(v) if v.isdigit() else 0.0


_clients: dict[int, RegistryClient] = {}
_clients_lock = threading.Lock()


def client_for(service: Any) -> RegistryClient:
    """The shared client of a service configuration object (one per object per process)."""
    key = id(service)
    with _clients_lock:
        c = _clients.get(key)
        if c is None or c.service is not service:
            c = _clients[key] = RegistryClient(service)
        return c
