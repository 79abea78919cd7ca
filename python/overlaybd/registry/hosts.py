"""Registry mirrors: which hosts to ask for a registry's blobs and manifests, in order, and which to skip.

Why: many nodes pulling the same image should hit the origin registry once. A node-local or site
mirror (a pull-through cache, a Dragonfly dfdaemon, Harbor) is configured the way containerd
configures it, so one configuration serves containerd's own pulls and overlaybd's lazy block reads:

1. the snapshotter's `mirrorRegistry` entries that name the registry in `mirrorOf`, in list order
   (their `insecure` picks http://);
2. containerd's hosts directory: `<hostsDir>/<registry>/hosts.toml` (`docker.io` for Docker Hub,
   `_default/hosts.toml` when the registry has no directory), its `[host."<url>"]` tables in file
   order, with `capabilities`, `skip_verify`, `override_path` and `header` as containerd reads them;
3. the registry itself (the file's `server`, else the repoBlobUrl/reference host), always last.

Mirrors get one attempt per read; a failed one (refused, timeout, 5xx, 4xx, a wrong answer) is held off
for `mirrorConfig.retrySec` and the read moves on, so a dead mirror costs one failed request per
hold-off, not one per block. A pull-through mirror answering a range with the whole blob (200: filling its
cache) is not a failure: the read waits for the fill within the mirror's share of the deadline (client.py,
`RegistryClient._from_mirror`), and only a fill outlasting it holds that blob off on that mirror. Files are
re-read when they change (checked at most every few seconds), like containerd, which needs no restart either.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from .image_ref import DOCKER_HUB, DOCKER_HUB_API

log = logging.getLogger(__name__)

ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})
RELOAD_CHECK = 5.0  # seconds between checks whether a hosts.toml / config.json changed
MAX_HOSTS_FILE = 1 << 20


@dataclass(frozen=True)
class Endpoint:
    """One host to ask: `<scheme>://<host><api>/<repo>/blobs/<digest>` (api is `/v2` unless override_path)."""

    scheme: str
    host: str
    api: str
    capabilities: frozenset[str]
    skip_verify: bool = False
    headers: tuple[str, ...] = ()
    origin: bool = False
    source: str = ""

    @property
    def base(self) -> str:
        """`scheme://host/api`: the key a mirror is held off under."""
        return f"{self.scheme}://{self.host}{self.api}"


@dataclass(frozen=True)
class MirrorSpec:
    """A `mirrorRegistry` entry with `mirrorOf`: `host` mirrors the registries in `mirror_of` (`*` = all)."""

    host: str
    insecure: bool
    mirror_of: tuple[str, ...]


def namespace_of(registry: str) -> str:
    """The registry name containerd keys hosts by: Docker Hub's API host is `docker.io` there."""
    return DOCKER_HUB if registry == DOCKER_HUB_API else registry


def _matches(patterns: Iterable[str], registry: str) -> bool:
    ns = namespace_of(registry)
    return any(p == "*" or p == registry or p == ns for p in patterns)


def mirror_specs_from_snapshotter(cfg: Any) -> tuple[MirrorSpec, ...]:
    """The mirrors of a parsed snapshotter config (entries without `mirrorOf` are per-host settings only)."""
    out = []
    for m in getattr(cfg, "mirror_registry", ()) or ():
        of = tuple(getattr(m, "mirror_of", ()) or ())
        if of:
            out.append(MirrorSpec(m.host, bool(m.insecure), of))
    return tuple(out)


def _parse_url(text: str) -> tuple[str, str, str] | None:
    """`http(s)://host[:port][/path]` or a bare `host[:port]` (https) -> (scheme, host, path)."""
    parts = urlsplit(text if "://" in text else "https://" + text)
    if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        return None
    return parts.scheme, parts.netloc, parts.path.rstrip("/")


def _headers(table: object) -> tuple[str, ...]:
    """containerd's `[host."..".header]`: name = "value" or ["v1", "v2"] -> `Name: value` lines."""
    out: list[str] = []
    if isinstance(table, dict):
        for k, v in table.items():
            for item in v if isinstance(v, list) else [v]:
                if isinstance(item, str) and "\n" not in item and "\r" not in item and ":" not in str(k):
                    out.append(f"{k}: {item}")
    return tuple(out)


def _capabilities(v: object, default: frozenset[str]) -> frozenset[str]:
    if isinstance(v, list) and all(isinstance(c, str) for c in v):
        return frozenset(v)
    return default


def parse_hosts_toml(text: str, registry: str, origin_scheme: str, path: str = "hosts.toml") -> list[Endpoint]:
    """The endpoints one hosts.toml gives for `registry`: its hosts in file order, then the server (origin).

    Raises ValueError naming the file and the entry for anything containerd would refuse too."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from None
    out: list[Endpoint] = []
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise ValueError(f'{path}: `host` must be a table of [host."<url>"] entries')
    for url, spec in hosts.items():
        parsed = _parse_url(url)
        if parsed is None or not isinstance(spec, dict):
            raise ValueError(f"{path}: [host.{json.dumps(url)}]: needs an http(s)://host[:port][/path] URL")
        scheme, host, prefix = parsed
        api = prefix if spec.get("override_path") is True else prefix + "/v2"
        out.append(_endpoint(scheme, host, api, spec, host == registry and api == "/v2", path))
    server = doc.get("server")
    if isinstance(server, str) and server:
        parsed = _parse_url(server)
        if parsed is None:
            raise ValueError(f"{path}: server {json.dumps(server)} is not an http(s) URL")
        scheme, host, prefix = parsed
        host = DOCKER_HUB_API if host == DOCKER_HUB else host  # containerd's own mapping of docker.io
        api = prefix if doc.get("override_path") is True else prefix + "/v2"
    else:
        scheme, host, api = origin_scheme, registry, "/v2"
    out.append(_endpoint(scheme, host, api, doc, True, path))
    return out


def _endpoint(scheme: str, host: str, api: str, table: dict[str, Any], origin: bool, path: str) -> Endpoint:
    """An endpoint with the per-host settings of its hosts.toml table ([host."<url>"] or the top level)."""
    return Endpoint(
        scheme,
        host,
        api,
        _capabilities(table.get("capabilities"), ALL_CAPABILITIES),
        table.get("skip_verify") is True,
        _headers(table.get("header")),
        origin=origin,
        source=path,
    )


class _Watched:
    """A file read again when its (mtime, size, inode) changes, checked at most every RELOAD_CHECK s."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stamp: tuple[int, int, int] | None = None
        self.text: str | None = None
        self.checked = -RELOAD_CHECK

    def read(self, now: float) -> str | None:
        if now - self.checked < RELOAD_CHECK:
            return self.text
        self.checked = now
        try:
            st = os.stat(self.path)
        except OSError:
            self.stamp, self.text = None, None
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self.stamp:
            self.stamp = stamp
            try:
                with open(self.path, "rb") as f:
                    self.text = f.read(MAX_HOSTS_FILE + 1).decode("utf-8", "replace")
                if len(self.text) > MAX_HOSTS_FILE:
                    log.warning("%s: larger than %d bytes; ignored", self.path, MAX_HOSTS_FILE)
                    self.text = None
            except OSError as e:
                log.warning("%s: cannot read: %s; ignored", self.path, e)
                self.text = None
        return self.text


class HostResolver:
    """Ordered hosts per registry from the two sources, plus the hold-off state of failed mirrors.

    One per RegistryClient (so per process); thread-safe."""

    def __init__(
        self,
        hosts_dir: str = "",
        mirrors: Sequence[MirrorSpec] = (),
        snapshotter_config: str = "",
        retry_sec: float = 30.0,
    ) -> None:
        self.hosts_dir = hosts_dir
        self.mirrors = tuple(mirrors)
        self.retry_sec = retry_sec
        self._snap = _Watched(snapshotter_config) if snapshotter_config else None
        self._snap_specs: tuple[MirrorSpec, ...] = ()
        self._snap_text: str | None = None
        self._files: dict[str, _Watched] = {}
        self._warned: set[tuple[str, str]] = set()
        self._held: dict[str, tuple[float, int]] = {}  # key -> (until, consecutive failures)
        self._distrusted: set[str] = set()  # "<mirror base> <digest>": served content not matching the digest
        self._lock = threading.Lock()

    @classmethod
    def from_service(cls, service: Any, mirrors: Sequence[MirrorSpec] = ()) -> HostResolver:
        mc = getattr(service, "mirror_config", None)
        if mc is None:
            return cls(mirrors=mirrors)
        return cls(mc.hosts_dir, mirrors, mc.snapshotter_config, float(mc.retry_sec))

    # ----------------------------------------------------------------- sources

    def _snapshotter_mirrors(self, now: float) -> tuple[MirrorSpec, ...]:
        if self._snap is None:
            return ()
        text = self._snap.read(now)
        if text is self._snap_text:
            return self._snap_specs
        self._snap_text = text
        self._snap_specs = ()
        if text is not None:
            from ..config.schema import ConfigError
            from ..config.snapshotter import config_from_dict

            try:
                self._snap_specs = mirror_specs_from_snapshotter(config_from_dict(json.loads(text), self._snap.path))
            except (ValueError, ConfigError) as e:
                self._warn_once(self._snap.path, f"{e}; its mirrorRegistry is not used")
        return self._snap_specs

    def _hosts_file(self, registry: str, now: float) -> _Watched | None:
        if not self.hosts_dir:
            return None
        names = [namespace_of(registry), registry, "_default"]
        for name in dict.fromkeys(names):
            path = os.path.join(self.hosts_dir, name, "hosts.toml")
            w = self._files.get(path)
            if w is None:
                w = self._files[path] = _Watched(path)
            if w.read(now) is not None:
                return w
        return None

    def _warn_once(self, path: str, msg: str) -> None:
        if (path, msg) not in self._warned:
            self._warned.add((path, msg))
            log.warning("%s", msg)

    def endpoints(self, registry: str, scheme: str, capability: str = "pull") -> list[Endpoint]:
        """Hosts to try for `registry` (host[:port] as in repoBlobUrl), mirrors first, the origin last.

        Mirrors without `capability` and mirrors held off after a failure are left out; the origin never is."""
        now = time.monotonic()
        with self._lock:
            specs = self.mirrors + self._snapshotter_mirrors(now)
            found = self._hosts_file(registry, now)
            from_file: list[Endpoint] = []
            if found is not None and found.text is not None:
                try:
                    from_file = parse_hosts_toml(found.text, registry, scheme, found.path)
                except ValueError as bad:
                    self._warn_once(found.path, f"{bad}; this hosts.toml is not used")
        out: list[Endpoint] = []
        for m in specs:
            if _matches(m.mirror_of, registry) and m.host != registry:
                out.append(
                    Endpoint(
                        "http" if m.insecure else "https",
                        m.host,
                        "/v2",
                        frozenset({"pull", "resolve"}),
                        source="mirrorRegistry",
                    )
                )
        out += from_file
        if not from_file:
            out.append(Endpoint(scheme, registry, "/v2", ALL_CAPABILITIES, origin=True, source="origin"))
        origin = next(e for e in reversed(out) if e.origin)
        seen: set[str] = set()
        result: list[Endpoint] = []
        for e in out:
            if e.base in seen or (e is not origin and e.base == origin.base):
                continue
            seen.add(e.base)
            if e is origin or capability in e.capabilities:
                result.append(e)
        result.sort(key=lambda e: e is origin)  # the origin last, even if a hosts.toml lists it first
        return result

    def usable(self, ep: Endpoint, repository: str, digest: str = "") -> bool:
        """False while the mirror, or the mirror for this repository or blob, is held off after a failure."""
        if ep.origin:
            return True
        now = time.monotonic()
        keys = [ep.base, f"{ep.base} {repository}"] + ([f"{ep.base} {digest}"] if digest else [])
        if digest and keys[-1] in self._distrusted:
            return False
        return not any(self.held(k, now) for k in keys)

    def distrust(self, base: str, digest: str) -> None:
        """Never use mirror `base` for blob `digest` again in this process: what it served for the blob did
        not match the digest. (A hold-off ends after retrySec; a mirror that lies about a blob keeps lying.)"""
        with self._lock:
            self._distrusted.add(f"{base} {digest}")

    # ----------------------------------------------------------------- hold-off

    def held(self, key: str, now: float | None = None) -> bool:
        with self._lock:
            h = self._held.get(key)
        return h is not None and h[0] > (time.monotonic() if now is None else now)

    def hold(self, key: str, seconds: float | None = None) -> float:
        """Skip `key` (a mirror, or mirror + digest) for `seconds` (default retrySec); returns the hold."""
        with self._lock:
            n = self._held.get(key, (0.0, 0))[1] + 1
            t = self.retry_sec if seconds is None else min(seconds, self.retry_sec)
            self._held[key] = (time.monotonic() + t, n)
            return t

    def failures(self, key: str) -> int:
        with self._lock:
            return self._held.get(key, (0.0, 0))[1]

    def ok(self, key: str) -> None:
        with self._lock:
            self._held.pop(key, None)


def mirror_url(ep: Endpoint, registry: str, repository: str, kind: str, ref: str) -> str:
    """A mirror's URL for `kind` (blobs/manifests); mirrors get containerd's `ns=<registry>` query."""
    url = f"{ep.scheme}://{ep.host}{ep.api}/{repository}/{kind}/{ref}"
    return url if ep.origin else f"{url}?ns={quote(namespace_of(registry), safe='')}"
