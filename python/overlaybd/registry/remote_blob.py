"""`open_remote_blob`: a lower layer that lives in a registry, as a RandomAccessFile.

The returned `RemoteBlobFile` is upstream's SwitchFile: it serves reads from the
registry through the block cache until background download has placed the whole,
digest-verified blob at `<dir>/overlaybd.commit`, then serves them from that local
file. The bytes are identical (the blob is the tar-wrapped ZFile either way), so
the tar -> zfile -> LSMT readers stacked above never notice the switch.

The blob's size is the one the image config gives (`lowers[].size`, from the
manifest); the registry's answers are checked against it, never the other way
round. Names handed to logs and the audit log are redacted (no URL userinfo).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ..format.fileio import LocalFile
from .audit import audit_for
from .cache import PAGE, cache_for
from .cached_blob import CachedBlob
from .client import MAX_BLOB_SIZE, RegistryClient, client_for
from .image_ref import BlobLocation, blob_url, parse_blob_url, redact_url
from .metrics import METRICS, maybe_start_exporter

log = logging.getLogger(__name__)


class DirectBlob:
    """Uncached remote reads (cacheType `download`, or a P2P proxy doing the caching)."""

    def __init__(self, name: str, client: RegistryClient, loc: BlobLocation, size: int) -> None:
        self.name = name
        self.client = client
        self.loc = loc
        self._size = size

    def size(self) -> int:
        return self._size

    def pread_into(self, buf: memoryview, offset: int) -> int:
        n = max(0, min(len(buf), self._size - offset))
        if not n:
            return 0
        try:
            return self.client.read_range(self.loc, offset, buf[:n], self._size)
        except OSError as e:
            log.error("%s: read of %d bytes at offset %d failed: %s", self.name, n, offset, e)
            raise

    def pread(self, size: int, offset: int) -> bytes:
        buf = bytearray(max(0, min(size, self._size - offset)))
        n = self.pread_into(memoryview(buf), offset)
        return bytes(buf[:n])

    def close(self) -> None:
        pass


class RemoteBlobFile:
    """A registry blob that switches to a local copy once background download has verified one."""

    def __init__(
        self, url: str, client: RegistryClient, loc: BlobLocation, size: int, remote: Any, layer_dir: str = ""
    ) -> None:
        self.name = url
        self.client = client
        self.loc = loc
        self._size = size
        self.remote = remote
        self.layer_dir = layer_dir
        self.local: LocalFile | None = None
        self._lock = threading.Lock()
        self.closed = False
        # Bound straight to the current source: one Python call less per read on the hot path.
        self.pread_into = remote.pread_into  # type: ignore[method-assign]
        self.fd_span = getattr(remote, "fd_span", None) or _no_span  # type: ignore[method-assign]

    @property
    def digest(self) -> str:
        return self.loc.digest

    def size(self) -> int:
        return self._size

    def pread_into(self, buf: memoryview, offset: int) -> int:  # replaced per instance in __init__/switch_to
        return (self.local or self.remote).pread_into(buf, offset)

    def pread(self, size: int, offset: int) -> bytes:
        f = self.local or self.remote
        return f.pread(size, offset)

    def fd_span(self, offset: int, length: int) -> tuple[int, int] | None:  # replaced per instance like pread_into
        """(fd, offset) of a span the current source holds locally (verified cache pages, the local copy)."""
        f = self.local or self.remote
        span = getattr(f, "fd_span", None)
        return span(offset, length) if span is not None else None

    def read_for_download(self, view: memoryview, offset: int) -> int:
        """A block for background download: from the cache if present, else straight from the registry
        (not cached, so downloading a whole layer does not flush the cache)."""
        n = max(0, min(len(view), self._size - offset))
        view = view[:n]
        if isinstance(self.remote, CachedBlob) and offset % PAGE == 0 and self.remote.store is not None:
            if self.remote.store.read_verified(offset, view):
                return n
        return self.client.read_range(self.loc, offset, view, self._size)

    def switch_to(self, path: str) -> None:
        """Serve from a complete local copy from now on."""
        f = LocalFile(path)
        if f.size() != self._size:
            f.close()
            raise OSError(f"{path}: size {f.size()} != blob size {self._size}; not switching")
        with self._lock:
            if self.closed:
                f.close()
                return
            self.local = f
            self.pread_into = f.pread_into  # type: ignore[method-assign]
            self.fd_span = f.fd_span  # type: ignore[method-assign]
        log.info("%s: switched to local copy %s", self.name, path)

    @property
    def switched(self) -> bool:
        return self.local is not None

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.local is not None:
                self.local.close()
            self.remote.close()
        from .download import DOWNLOADER

        DOWNLOADER.cancel(self)

    def __repr__(self) -> str:
        return f"RemoteBlobFile({self.name!r}, switched={self.switched})"


def _no_span(offset: int, length: int) -> None:
    """fd_span of a source that keeps nothing locally (direct reads)."""
    return None


_DEFAULT: list[Any] = []


def _default_service() -> Any:
    """One default ServiceConfig per process, so callers passing None still share one client and cache."""
    if not _DEFAULT:
        from ..config.service import default_service_config

        _DEFAULT.append(default_service_config())
    return _DEFAULT[0]


def open_remote_blob(repo_blob_url: str, lower: Any, service: Any = None, download: Any = None) -> RemoteBlobFile:
    """Open `lower.digest` under `repo_blob_url` lazily (cache + optional background download).

    `download` is the device config's `download` section (None -> the service's).
    Raises RegistryError (an OSError naming registry/repository/digest/status) when the
    blob cannot be reached, ReferenceError for a malformed URL/digest.
    """
    if service is None:
        service = _default_service()
    maybe_start_exporter(service)
    client = client_for(service)
    loc = parse_blob_url(repo_blob_url, lower.digest)
    client.add_url_credential(loc)
    url = redact_url(blob_url(repo_blob_url, lower.digest))  # the name in logs, errors and the audit log
    audit = audit_for(service)
    cache = cache_for(service, audit)
    expected = lower.size or 0
    if 0 < expected <= MAX_BLOB_SIZE and cache is not None and cache.cached_size(loc.digest) == expected:
        size = expected  # cached before (e.g. before a restart): no registry round trip needed to open
    else:
        # Checks reachability and auth within the deadline; with lowers[].size a disagreeing total is an error.
        size = client.blob_size(loc, expected)
    remote: Any = None
    if cache is not None and not client.p2p_address:
        try:
            store = cache.open_blob(loc.digest, size)
        except OSError as e:  # e.g. cache disk full: serve this layer uncached rather than fail
            log.warning("%s: cannot use the cache in %s (%s); reading uncached", url, cache.dir, e)
            METRICS.error("cache_open")
        else:
            store.on_mismatch = client.distrust_mirrors  # a mirror that served a mismatching blob: use the next source
            remote = CachedBlob(url, store, lambda off, v: client.read_range(loc, off, v, size), audit)
    if remote is None:
        remote = DirectBlob(url, client, loc, size)
    f = RemoteBlobFile(url, client, loc, size, remote, lower.dir)
    dl = download if download is not None else service.download
    if dl.enable and lower.dir:
        target = os.path.join(lower.dir, "overlaybd.commit")
        if os.path.exists(target):
            f.switch_to(target)
        else:
            from .download import DOWNLOADER

            DOWNLOADER.schedule(f, dl, audit)
    return f
