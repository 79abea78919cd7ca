"""OCI distribution client: manifests, whole blobs and blob ranges, with auth, redirects and retries.

One `RegistryClient` per service configuration is shared by every remote layer
of the process: it owns the HTTP transport (kept-alive connections), the token
cache and where each blob's redirect currently points. Every failure that is
given up on raises `RegistryError`, which names registry, repository, digest and
the last HTTP status, so a log line alone says what was being fetched from where.

Every operation (a block read, a blob-size probe at open, a manifest) runs against
one overall deadline (`readDeadlineSec` in overlaybd.json, 30 s by default): each
request gets only the time left, so a dead or dripping registry costs at most the
deadline, never a multiple of it. Range answers are checked strictly against what
was asked and against the blob size the image config gives, because a wrong answer
accepted here becomes wrong bytes in the cache and in the container.
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
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from .auth import AuthError, Challenge, TokenCache, basic_header, parse_challenge, parse_token_response, token_url
from .credentials import Credential, CredentialError, CredentialProvider
from .hosts import Endpoint, HostResolver, MirrorSpec, mirror_url
from .image_ref import BlobLocation, ImageReference, parse_reference, redact_url
from .metrics import METRICS
from .transport import ALLOWED_SCHEMES, HttpTransport, Response, TransportError

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
DEFAULT_DEADLINE = 30.0  # seconds per block read / open probe / manifest, retries included (readDeadlineSec)
# Largest layer blob accepted, from lowers[].size or a server's Content-Range total. Far above what registries
# store (Docker Hub and GHCR cap layers at 10 GB, ECR at ~52 GB), and small enough that the cache's per-page
# bookkeeping stays bounded; a server claiming more is refused before anything is sized by it.
MAX_BLOB_SIZE = 1 << 40
# A mirror gets one attempt per operation, bounded by this share of the deadline, so a hung mirror leaves the
# origin most of it. A mirror answering a range request with the whole blob (200) is filling its cache
# (docker-registry's pull-through behaviour): the read waits for the fill within that same share, asking the
# mirror again after FILL_POLL s, doubling up to FILL_POLL_MAX (one poller per mirror and blob in a process;
# the other readers of that blob wait for its outcome). A mirror still filling when the share is spent:
# this read goes to the origin and the blob is skipped on that mirror for FILLING_HOLD s, doubling; after
# such a give-up the mirror gets single attempts for that blob (no more waiting) until it serves it.
MIRROR_SHARE = 1 / 3
SERVED_BY_BLOBS = 4096  # blobs whose serving mirrors are remembered (for distrust_mirrors)
FILLING_HOLD = 1.0
FILL_POLL = 0.05
FILL_POLL_MAX = 2.0
FILL_MARGIN = 0.2  # share of the mirror's time kept for the last poll's own transfer (at most 1 s)


def parse_content_range(value: str) -> tuple[int, int, int | None] | None:
    """`bytes START-END/TOTAL` -> (start, end, total or None for `*`); None if malformed."""
    unit, _, rest = value.strip().partition(" ")
    rng, _, total = rest.strip().partition("/")
    a, _, b = rng.partition("-")
    if unit.lower() != "bytes" or not (a.isdigit() and b.isdigit()) or not (total.isdigit() or total == "*"):
        return None
    if len(a) > 20 or len(b) > 20 or len(total) > 20:  # beyond u64: never a real blob (and no huge ints)
        return None
    start, end = int(a), int(b)
    if end < start:
        return None
    return start, end, int(total) if total != "*" else None


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
        deadline: float | None = None,
        transport: HttpTransport | None = None,
        p2p_address: str | None = None,
        plain_http_hosts: Iterable[str] = (),
        mirrors: Sequence[MirrorSpec] = (),
    ) -> None:
        """`deadline`: seconds per operation, retries included (None: the service's `readDeadlineSec`).
        `plain_http_hosts`: hosts configured as plain-http registries besides those reached by http:// URLs
        (a token realm over http receives credentials only on such a host). `mirrors`: tried before the
        service's `mirrorConfig` sources (hosts.toml, the snapshotter's `mirrorRegistry`)."""
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
        if deadline is None:
            deadline = float(getattr(service, "read_deadline_sec", DEFAULT_DEADLINE) or DEFAULT_DEADLINE)
        self.deadline = deadline
        self.plain_http_hosts: set[str] = {_hostname(h) for h in plain_http_hosts}
        self._url_creds: dict[str, Credential] = {}  # registry host -> user:password from a repoBlobUrl
        self._auth: dict[tuple[str, str], Challenge] = {}
        self._redirects: dict[str, _Redirect] = {}
        self._lock = threading.Lock()
        # "<mirror base> <digest>" -> the fill one thread is waiting for; and the blobs a mirror has served
        # ranges of (read directly, no coordination). Both only for range reads of blobs.
        self._fills: dict[str, _Fill] = {}
        self._mirror_has: set[str] = set()
        # digest -> the mirrors that served ranges of it (most recent blobs last, bounded), for distrust_mirrors
        self._served_by: OrderedDict[str, set[str]] = OrderedDict()
        p2p = getattr(service, "p2p_config", None)
        if p2p_address is None:
            p2p_address = p2p.address if p2p is not None and p2p.enable else ""
        self.p2p_address = p2p_address
        self.hosts = HostResolver.from_service(service, mirrors)
        self.p2p_prefix = ""  # upstream style: data URL = <address>/<blob url>
        if p2p_address and self._p2p_reachable():
            if urlsplit(p2p_address).path in ("", "/"):
                self.transport.proxy = p2p_address  # a plain HTTP proxy (dfdaemon proxy port)
            else:
                self.p2p_prefix = p2p_address.rstrip("/")

    # ------------------------------------------------------------------ auth

    def add_url_credential(self, loc: BlobLocation) -> None:
        """Remember `user:password@` of a repoBlobUrl as the registry's credential (used when no
        credentialConfig entry matches); the URL itself is only ever logged redacted."""
        if loc.userinfo is not None:
            self._url_creds[loc.registry] = Credential(*loc.userinfo)

    def _credential(self, url: str) -> Credential | None:
        return self.credentials.lookup(url) or self._url_creds.get(urlsplit(url).netloc)

    def _note_plain_http(self, url: str) -> None:
        """A registry addressed by an http:// URL (repoBlobUrl, rpull --plain-http) is configured as plain http."""
        parts = urlsplit(url)
        if parts.scheme == "http" and parts.hostname and parts.hostname not in self.plain_http_hosts:
            with self._lock:
                self.plain_http_hosts.add(parts.hostname)

    def _auth_header(self, registry: str, repository: str, url: str, refresh: bool, until: float) -> str | None:
        """Authorization header for this repository, fetching a token if needed (credentials re-read)."""
        ch = self._auth.get((registry, repository))
        if ch is None:
            return None
        try:
            if ch.scheme == "basic":
                cred = self._credential(url)
                return basic_header(cred) if cred else None
            if ch.scheme != "bearer":
                raise AuthError(f"unsupported WWW-Authenticate scheme {ch.scheme!r}")
            turl = token_url(ch, repository)
            if refresh:
                self.tokens.drop(turl)
            tok = self.tokens.get(turl)
            if tok is None:
                tok = self._fetch_token(registry, repository, turl, url, until)
            return "Authorization: Bearer " + tok
        except CredentialError as e:
            raise RegistryError(registry, repository, "", 0, f"credentials: {e}", errno.EPERM) from None
        except AuthError as e:
            raise RegistryError(registry, repository, "", 0, f"auth: {e}", errno.EPERM) from None

    def _fetch_token(self, registry: str, repository: str, turl: str, url: str, until: float) -> str:
        cred = self._credential(url)
        realm = urlsplit(turl)
        if realm.scheme not in ALLOWED_SCHEMES:
            raise AuthError(f"token realm {redact_url(turl)} is not http(s)")
        if cred and realm.scheme != "https" and realm.hostname not in self.plain_http_hosts:
            # Basic credentials in clear text may only go where plain http was configured on purpose.
            raise AuthError(
                f"refusing to send the credentials of {registry} to token realm {redact_url(turl)} over plain "
                f"http: {realm.hostname} is not configured as a plain-http registry (use an https realm)"
            )
        headers = [basic_header(cred)] if cred else []
        try:
            resp = self.transport.request("GET", turl, headers, timeout=_left(until, 30.0))
        except TransportError as e:
            raise RegistryError(registry, repository, "", 0, f"token endpoint {redact_url(turl)}: {e}") from None
        if resp.status != 200:
            who = f"user {cred.username!r}" if cred else "anonymous"
            raise RegistryError(
                registry,
                repository,
                "",
                resp.status,
                f"token endpoint refused ({who}): {redact_url(turl)}",
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
        until: float,
        *,
        sink: memoryview | None = None,
        limit: int = 8 << 20,
        digest: str = "",
        accept_200: bool = True,
    ) -> Response:
        """One logical request to the registry: auth challenge handled, redirects followed without auth
        (and only to http/https), every request bounded by what is left of the deadline."""
        self._note_plain_http(url)
        auth = self._auth_header(loc_registry, repository, url, False, until)
        rounds = 0  # 401 without auth -> authenticate; 401 with a (stale) token -> refresh once more
        while True:
            hs = headers + ([auth] if auth else [])
            resp = self.transport.request(
                method, url, hs, sink=sink, limit=limit, timeout=_left(until), accept_200=accept_200
            )
            if resp.status == 401 and rounds < 2:
                ch = parse_challenge(resp.header("www-authenticate"))
                if ch is None:
                    return resp
                self._auth[(loc_registry, repository)] = ch
                auth = self._auth_header(loc_registry, repository, url, True, until)
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
            scheme = urlsplit(target).scheme.lower()
            if scheme not in ALLOWED_SCHEMES:
                METRICS.error("permanent")
                raise RegistryError(
                    loc_registry,
                    repository,
                    digest,
                    resp.status,
                    f"redirect to {redact_url(target)!r} refused: only http and https are followed",
                )
            hops += 1
            same = urlsplit(target).netloc == urlsplit(url).netloc
            resp = self.transport.request(
                method,
                target,
                headers + ([auth] if auth and same else []),
                sink=sink,
                limit=limit,
                timeout=_left(until),
                accept_200=accept_200,
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
        accept = "Accept: " + ", ".join(MANIFEST_ACCEPT)

        def attempt(ep: Endpoint, until: float) -> Response:
            url = mirror_url(ep, r.registry, r.repository, "manifests", reference)
            resp = self._send(ep.host, r.repository, "GET", url, [accept, *ep.headers], until)
            if not ep.origin and resp.status == 200 and reference.startswith("sha256:"):
                got = "sha256:" + hashlib.sha256(resp.body).hexdigest()
                if got != reference:
                    raise RegistryError(ep.host, r.repository, reference, 200, f"mirror manifest hashes to {got}")
            return resp

        capability = "pull" if reference.startswith("sha256:") else "resolve"
        resp = self._mirrored(r.registry, r.repository, reference, capability, scheme, attempt)
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

        def attempt(ep: Endpoint, until: float) -> Response:
            at = self._loc_at(loc, ep)
            resp = self._send(at.registry, at.repository, "GET", at.url, list(ep.headers), until, limit=limit)
            if not ep.origin and resp.status == 200 and digest.startswith("sha256:"):
                got = "sha256:" + hashlib.sha256(resp.body).hexdigest()
                if got != digest:
                    raise RegistryError(ep.host, r.repository, digest, 200, f"mirror content hashes to {got}")
            return resp

        resp = self._mirrored(loc.registry, loc.repository, digest, "pull", scheme, attempt)
        got = "sha256:" + hashlib.sha256(resp.body).hexdigest()
        if digest.startswith("sha256:") and got != digest:
            raise RegistryError(loc.registry, loc.repository, digest, resp.status, f"content hashes to {got}")
        return resp.body

    def blob_size(self, loc: BlobLocation, expected: int = 0) -> int:
        """The blob's size, from the `Content-Range` total of a one-byte range request.

        `expected` (lowers[].size, from the manifest) is the size when known: a total that disagrees is an
        error naming both. Either way a size beyond MAX_BLOB_SIZE is refused before anything is sized by it.
        This request also goes through the auth challenge and learns any redirect, within the deadline.
        """
        self.add_url_credential(loc)
        if expected > MAX_BLOB_SIZE:
            raise RegistryError(
                loc.registry,
                loc.repository,
                loc.digest,
                0,
                f"blob size {expected} (lowers[].size) exceeds the limit of {MAX_BLOB_SIZE} bytes",
                errno.EFBIG,
            )
        one = memoryview(bytearray(1))
        resp = self._range_read(loc, 0, one, expected or None)
        if expected:
            return expected
        cr = parse_content_range(resp.header("content-range"))
        if cr is not None and cr[2] is not None:
            return cr[2]
        cl = resp.header("content-length")
        if resp.status == 200 and cl.isdigit() and int(cl) == 1:
            return 1
        raise RegistryError(
            loc.registry,
            loc.repository,
            loc.digest,
            resp.status,
            f"no blob size in Content-Range {resp.header('content-range')!r} (and no lowers[].size)",
        )

    def read_range(self, loc: BlobLocation, offset: int, view: memoryview, size: int | None = None) -> int:
        """Fill `view` with blob bytes at `offset`, retrying within the deadline; returns len(view).

        `size` is the blob's size (from lowers[].size or the open probe): every answer is checked
        against it. Raises RegistryError (nothing is returned, so nothing reaches the cache) for any
        answer that is not exactly the asked range."""
        if size is not None and offset + len(view) > size:
            view = view[: max(0, size - offset)]
        if len(view) == 0:
            return 0
        t0 = time.monotonic()
        resp = self._range_read(loc, offset, view, size)
        METRICS.fetched(resp.nbytes, time.monotonic() - t0)
        return resp.nbytes

    def _range_read(self, loc: BlobLocation, offset: int, view: memoryview, size: int | None) -> Response:
        want = len(view)
        whole = size is not None and offset == 0 and want == size

        def attempt(ep: Endpoint, until: float) -> Response:
            at = self._loc_at(loc, ep)
            resp = self._range_once(at, offset, view, until, whole, ep.headers)
            if not ep.origin and resp.status == 200 and resp.refused:
                METRICS.error("mirror_filling")
                raise _MirrorFilling(resp.status, "answered a range request with the whole blob (filling its cache)")
            return self._check_range(at, resp, offset, want, size)

        return self._mirrored(
            loc.registry,
            loc.repository,
            loc.digest,
            "pull",
            loc.scheme,
            attempt,
            what=f"range bytes={offset}-{offset + want - 1}",
            wait_fill=True,
        )

    @staticmethod
    def _loc_at(loc: BlobLocation, ep: Endpoint) -> BlobLocation:
        """`loc` as found on endpoint `ep` (the registry's own URL when `ep` is the plain origin)."""
        if ep.origin and ep.base == f"{loc.scheme}://{loc.registry}/v2":
            return loc
        url = mirror_url(ep, loc.registry, loc.repository, "blobs", loc.digest)
        return BlobLocation(ep.scheme, ep.host, loc.repository, loc.digest, loc.userinfo if ep.origin else None, url)

    def _mirrored(
        self,
        registry: str,
        repository: str,
        digest: str,
        capability: str,
        scheme: str,
        attempt: Callable[[Endpoint, float], Response],
        what: str = "",
        wait_fill: bool = False,
    ) -> Response:
        """Each usable mirror once (within MIRROR_SHARE of the deadline), then the origin with the time left.

        A mirror that fails is held off (hosts.HostResolver), so the next reads go straight to the next host;
        nothing a failed mirror sent is returned (the origin's answer overwrites any partial sink).
        `wait_fill` (blob range reads): a mirror filling its cache is waited for within its share
        (`_from_mirror`)."""
        start = time.monotonic()
        until = start + self.deadline
        eps = self.hosts.endpoints(registry, scheme, capability)
        for ep in eps[:-1]:
            if not self.hosts.usable(ep, repository, digest) or time.monotonic() >= until:
                continue
            if ep.skip_verify and ep.host not in self.transport.skip_verify_hosts:
                self.transport.skip_verify_hosts.add(ep.host)
            share = min(until, time.monotonic() + self.deadline * MIRROR_SHARE)
            try:
                if wait_fill and digest:
                    resp = self._from_mirror(ep, digest, attempt, share)
                else:
                    resp = attempt(ep, share)
            except _NotThisMirror:
                continue
            except (RegistryError, _Retryable, TransportError) as e:
                self._mirror_failed(ep, registry, repository, digest, e, what)
                continue
            if resp.status >= 400:  # manifests/configs: statuses are not checked by the attempt
                self._mirror_failed(ep, registry, repository, digest, _Retryable(resp.status, "refused"), what)
                continue
            self.hosts.ok(ep.base)
            if wait_fill and digest:
                self._note_served(digest, ep.base)
            return resp
        origin = eps[-1]
        return self._retrying(registry, repository, digest, lambda u: attempt(origin, u), what=what, until=until)

    def _note_served(self, digest: str, base: str) -> None:
        with self._lock:
            bases = self._served_by.pop(digest, None) or set()
            bases.add(base)
            self._served_by[digest] = bases
            while len(self._served_by) > SERVED_BY_BLOBS:
                self._served_by.popitem(last=False)

    def distrust_mirrors(self, digest: str) -> str:
        """Stop using, for blob `digest` and for the life of this process, every mirror that served ranges of
        it; returns their names ("" when none did). Called when the blob's content did not match its digest,
        so the next fetches of it go to the next source (in the end the origin) instead of the same liar."""
        with self._lock:
            bases = sorted(self._served_by.pop(digest, set()))
        for base in bases:
            self.hosts.distrust(base, digest)
            METRICS.error("mirror_distrusted")
        return ", ".join(f"mirror {redact_url(b)}" for b in bases)

    def _from_mirror(
        self, ep: Endpoint, digest: str, attempt: Callable[[Endpoint, float], Response], share: float
    ) -> Response:
        """A range of blob `digest` from mirror `ep` by `share` (a monotonic time), waiting out a cache fill.

        docker-registry as a pull-through cache answers a range of a blob it does not have yet with a 200 and
        the whole blob, streamed from the origin, and fills its own storage from a second origin GET; it keeps
        answering 200 (each one another origin stream) until that fill is stored, then 206. So: the first
        request of this process for a (mirror, blob) goes alone; if it gets 200, that thread polls the mirror
        (same request, FILL_POLL doubling to FILL_POLL_MAX) until 206 or the share is spent, and the other
        readers of that blob wait for its outcome instead of polling too (every poll during the fill costs
        the origin a cut-short stream). After a 206, everyone reads that blob from the mirror directly.
        Raises _MirrorFilling (the caller holds the blob off this mirror) if the fill outlasts the share,
        _NotThisMirror if another thread's poll failed (it already held the mirror off) or the share passed
        while waiting for it, and whatever a request to the mirror raised."""
        key = f"{ep.base} {digest}"
        lost: _MirrorFilling | None = None  # the 200 a direct read got (the mirror lost the blob since)
        while True:
            with self._lock:
                if key in self._mirror_has:
                    fill = None
                else:
                    fill = self._fills.get(key)
                    if fill is None:
                        fill = self._fills[key] = _Fill()
                        break  # this thread asks the mirror (and polls if it is filling)
            if fill is None:
                try:
                    return self._mirror_attempt(ep, attempt, share)
                except _MirrorFilling as e:  # lost it since (expired from its cache): filling again
                    with self._lock:
                        self._mirror_has.discard(key)
                    lost = e
                    continue
            if not fill.done.wait(max(0.0, share - time.monotonic())):
                raise _NotThisMirror()  # the poller is still waiting: this read goes to the next host meanwhile
            if not fill.served:
                raise _NotThisMirror()
        served = False
        try:
            delay = FILL_POLL
            patient = self.hosts.failures(key) == 0  # after a give-up on this blob: single attempts only
            margin = min(1.0, self.deadline * MIRROR_SHARE * FILL_MARGIN)
            polls = 0
            t0 = time.monotonic()
            while True:
                try:
                    if lost is not None:  # that answer was this thread's first request: wait before the next
                        e0: _MirrorFilling = lost
                        lost = None
                        raise e0
                    resp = self._mirror_attempt(ep, attempt, share)
                except _MirrorFilling as e:
                    pause = min(delay, share - margin - time.monotonic())
                    if not patient or pause <= 0:
                        if polls:
                            e.why += f"; still filling after {polls} polls in {time.monotonic() - t0:.1f}s"
                        raise
                    time.sleep(pause)
                    delay = min(delay * 2, FILL_POLL_MAX)
                    polls += 1
                    continue
                served = True
                if polls:
                    log.info(
                        "mirror %s: %s filled after %d polls in %.1fs", ep.base, digest, polls, time.monotonic() - t0
                    )
                self.hosts.ok(key)
                return resp
        finally:
            with self._lock:
                self._fills.pop(key, None)
                if served:
                    if len(self._mirror_has) >= 65536:
                        self._mirror_has.clear()
                    self._mirror_has.add(key)
            fill.served = served
            fill.done.set()

    @staticmethod
    def _mirror_attempt(ep: Endpoint, attempt: Callable[[Endpoint, float], Response], share: float) -> Response:
        """One range request to a mirror; a 5xx is asked again once after FILL_POLL s. docker-registry as a
        pull-through cache answers 500 ("invalid checksum digest format") for a moment when it commits a blob
        under a reader, e.g. a second fill of it, which its own check-then-fetch race can start when a request
        arrives as the first fill completes; holding the whole mirror off for that would send every read of
        the node to the origin for retrySec."""
        try:
            return attempt(ep, share)
        except _Retryable as e:
            if isinstance(e, _MirrorFilling) or e.status < 500 or time.monotonic() + FILL_POLL >= share:
                raise
            METRICS.error("mirror_5xx_retried")
            time.sleep(FILL_POLL)
            return attempt(ep, share)

    def _mirror_failed(
        self, ep: Endpoint, registry: str, repository: str, digest: str, e: Exception, what: str
    ) -> None:
        """Hold the mirror off: the whole host for connection errors and 5xx, the repository for a 4xx,
        the blob while the mirror fills its cache. One WARNING per hold, so a dead mirror logs rarely."""
        METRICS.error("mirror")
        status = getattr(e, "status", 0)
        if isinstance(e, _MirrorFilling):
            key = f"{ep.base} {digest}"
            held = self.hosts.hold(key, FILLING_HOLD * 2 ** min(self.hosts.failures(key), 10))
            log.info("mirror %s: %s@%s %s; next host for %.0fs", ep.base, repository, digest, e.why, held)
            return
        if 400 <= status < 500 and status != 429:
            key = f"{ep.base} {repository}"
        else:
            key = ep.base
        held = self.hosts.hold(key)
        why = e.why if isinstance(e, _Retryable) else redact_url(str(e))
        log.warning(
            "mirror %s (%s) for %s/%s@%s failed: %s%s; using the next host, this mirror again in %.0fs",
            ep.base,
            ep.source,
            registry,
            repository,
            digest,
            f"{what}: " if what else "",
            why,
            held,
        )

    def _data_url(self, loc: BlobLocation) -> tuple[str, bool]:
        """(URL for data, is_redirect_target). Redirect targets are used without auth for REDIRECT_LIFE."""
        with self._lock:
            rd = self._redirects.get(loc.url)
        if rd and rd.expires > time.monotonic():
            return rd.url, True
        return loc.url, False

    def _forget_redirect(self, loc: BlobLocation) -> None:
        with self._lock:
            self._redirects.pop(loc.url, None)

    def _p2p_reachable(self) -> bool:
        """Upstream uses the P2P proxy only if a TCP connect to it succeeds (checked once)."""
        parts = urlsplit(self.p2p_address)
        try:
            with socket.create_connection((parts.hostname or "localhost", parts.port or 80), timeout=1.0):
                return True
        except OSError:
            log.warning("p2p proxy %s unreachable; fetching directly", redact_url(self.p2p_address))
            return False

    def _p2p(self, url: str) -> str:
        return f"{self.p2p_prefix}/{url}" if self.p2p_prefix else url

    def _range_once(
        self, loc: BlobLocation, offset: int, view: memoryview, until: float, whole: bool, extra: Sequence[str] = ()
    ) -> Response:
        rng = f"Range: bytes={offset}-{offset + len(view) - 1}"
        url, redirected = self._data_url(loc)
        if redirected or self.p2p_prefix:
            hs = [rng, *extra]
            if not redirected:  # the P2P proxy fetches from the registry itself: pass our credentials on
                auth = self._auth_header(loc.registry, loc.repository, loc.url, False, until)
                hs += [auth] if auth else []
            try:
                resp = self.transport.request(
                    "GET", self._p2p(url), hs, sink=view, timeout=_left(until), accept_200=whole
                )
            except TransportError:
                self._forget_redirect(loc)  # the next attempt resolves again through the registry
                raise
            if resp.status in (200, 206):
                resp.url = url
                return resp
            self._forget_redirect(loc)  # stale pre-signed URL / proxy refused: resolve again through the registry
        resp = self._send(
            loc.registry,
            loc.repository,
            "GET",
            loc.url,
            [rng, *extra],
            until,
            sink=view,
            digest=loc.digest,
            accept_200=whole,
        )
        if resp.url != loc.url and resp.status in (200, 206) and not (resp.refused or resp.overflow):
            with self._lock:
                self._redirects[loc.url] = _Redirect(resp.url, time.monotonic() + REDIRECT_LIFE)
        return resp

    def _check_range(self, loc: BlobLocation, resp: Response, offset: int, want: int, size: int | None) -> Response:
        """Accept exactly the asked range: 206 with a matching Content-Range, or 200 only for the whole blob."""
        end = offset + want - 1
        asked = f"range bytes={offset}-{end}"
        where = f" from {redact_url(resp.url)}" if resp.url != loc.url else ""

        def wrong(what: str) -> RegistryError:
            self._forget_redirect(loc)
            METRICS.error("bad_range")
            return RegistryError(loc.registry, loc.repository, loc.digest, resp.status, f"{asked}{where}: {what}")

        if resp.status == 206:
            raw = resp.header("content-range")
            cr = parse_content_range(raw)
            if cr is None:
                raise wrong(f"206 with a malformed Content-Range {raw[:80]!r}")
            start, last, total = cr
            if (start, last) != (offset, end):
                raise wrong(f"answered with Content-Range {raw!r}")
            if size is not None and total != size:
                raise wrong(f"Content-Range total {raw.partition('/')[2]} != blob size {size} (lowers[].size)")
            if total is not None and total > MAX_BLOB_SIZE:
                raise wrong(f"Content-Range total {total} exceeds the limit of {MAX_BLOB_SIZE} bytes")
            if total is None and size is None:
                raise wrong(f"Content-Range {raw!r} gives no blob size")
            if resp.overflow:
                raise wrong(f"body longer than the {want} bytes of Content-Range {raw!r}")
            if resp.nbytes < want:
                raise _Retryable(resp.status, f"short body: {resp.nbytes} of {want} bytes")
            return resp
        if resp.status == 200:
            cl = resp.header("content-length")
            if size is None or offset != 0 or want != size or resp.refused:
                raise wrong(f"200 (whole body, Content-Length {cl or '?'}) to a range request: Range was ignored")
            if cl and cl != str(size):
                raise wrong(f"200 with Content-Length {cl[:24]} != blob size {size} (lowers[].size)")
            if resp.overflow:
                raise wrong(f"200 with a body longer than the blob size {size}")
            if resp.nbytes < want:
                raise _Retryable(resp.status, f"short body: {resp.nbytes} of {want} bytes")
            return resp
        if resp.status >= 500 or resp.status == 429:
            self._forget_redirect(loc)
            raise _Retryable(resp.status, "server error", _retry_after(resp))
        msg = {401: "authentication failed", 403: "access denied", 404: "blob not found"}.get(resp.status, "failed")
        raise RegistryError(
            loc.registry, loc.repository, loc.digest, resp.status, f"{asked}: {msg}", _errno_for(resp.status)
        )

    def _retrying(
        self,
        registry: str,
        repository: str,
        digest: str,
        op: Callable[[float], Response],
        what: str = "",
        until: float | None = None,
    ) -> Response:
        """Run op(until) until it succeeds, a permanent error occurs, or the deadline passes.

        Retried: 5xx, 429, connection refused/reset/timeouts, stalls and short bodies. Failing at once:
        other 4xx, TLS trust and handshake errors, protocol errors, a wrong range answer. `until`: what is
        left of the operation's deadline after mirrors were tried (default: the whole deadline from now)."""
        start = time.monotonic()
        until = start + self.deadline if until is None else until
        delay = 0.05
        attempt = 0
        prefix = f"{what}: " if what else ""
        while True:
            attempt += 1
            floor = 0.0  # server-requested minimum pause (Retry-After)
            try:
                resp = op(until)
                if 400 <= resp.status < 500 and resp.status != 429:
                    msg = {401: "authentication failed", 403: "access denied", 404: "not found"}.get(
                        resp.status, "failed"
                    )
                    raise RegistryError(
                        registry, repository, digest, resp.status, prefix + msg, _errno_for(resp.status)
                    )
                if resp.status >= 500 or resp.status == 429:
                    raise _Retryable(resp.status, "server error", _retry_after(resp))
                return resp
            except _Retryable as e:
                status, why = e.status, e.why
                floor = min(e.retry_after, 10.0)  # honour Retry-After, within reason
                METRICS.error("http_5xx" if status >= 500 else "http_429" if status == 429 else "short_body")
            except TransportError as e:
                status, why = 0, redact_url(str(e))
                METRICS.error("connection")
                if e.permanent:  # TLS trust/handshake, client certificate, protocol: retrying cannot help
                    METRICS.error("permanent")
                    raise RegistryError(registry, repository, digest, 0, prefix + why) from None
            except RegistryError:
                METRICS.error("permanent")
                raise
            now = time.monotonic()
            pause = max(floor, delay * (0.5 + random.random() / 2))
            if now + pause > until:
                METRICS.error("gave_up")
                raise RegistryError(
                    registry,
                    repository,
                    digest,
                    status,
                    f"{prefix}gave up after {attempt} attempts in {now - start:.1f}s "
                    f"(deadline {self.deadline:g}s): {why}",
                )
            log.info(
                "registry %s/%s@%s: %sattempt %d failed (%s); retrying in %.2fs",
                registry,
                repository,
                digest,
                prefix,
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


class _MirrorFilling(_Retryable):
    """A mirror answered a range request with the whole blob: it is still filling its cache."""


class _NotThisMirror(Exception):
    """Skip this mirror for this read without holding it off (another thread's outcome decides)."""


class _Fill:
    """A (mirror, blob) one thread asks the mirror for; the others wait for `done`, then read `served`."""

    __slots__ = ("done", "served")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.served = False


def _hostname(host: str) -> str:
    """`host[:port]` or a URL -> the bare host name (plain-http configuration is per host)."""
    return urlsplit(host if "://" in host else f"//{host}").hostname or host


def _left(until: float, cap: float = 0.0) -> float:
    """Seconds left before `until` (at most `cap` if given); a passed deadline is a timeout."""
    left = until - time.monotonic()
    if left <= 0.001:
        raise TransportError("", "deadline passed", 28)
    return min(left, cap) if cap else left


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
