"""Finding and opening the layer files a device config names.

Why a module of its own: the search order for a lower (`file`, then `dir/overlaybd.commit`,
`dir/.commit`, `dir/overlaybd.sealed`, then the registry) is upstream behaviour the
snapshotter relies on (a background download renames `.download` to `overlaybd.commit`
in `dir`), and it is easiest to test on its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..format.errors import FormatError
from ..format.fileio import LocalFile, RandomAccessFile

#: Names tried inside `lowers[].dir`, in upstream's order.
DIR_CANDIDATES = ("overlaybd.commit", ".commit", "overlaybd.sealed")

RemoteOpener = Callable[[str, Any, Any], RandomAccessFile]


class LayerOpenError(Exception):
    """A layer named by the config cannot be opened; `field` is e.g. `lowers[2]`."""

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path = path
        self.field = field
        self.message = message
        super().__init__(f"{path}: {field}: {message}")


def local_candidates(lower: Any) -> list[str]:
    """Local paths to try for a lower, in order (existing or not)."""
    out = []
    if lower.file:
        out.append(lower.file)
    if lower.dir:
        out.extend(os.path.join(lower.dir, n) for n in DIR_CANDIDATES)
    return out


def find_local(lower: Any) -> str | None:
    """First existing regular, non-empty local file for `lower` (None: must go remote)."""
    for p in local_candidates(lower):
        try:
            st = os.stat(p)
        except OSError:
            continue
        if os.path.isfile(p) and st.st_size > 0:
            return p
    return None


def blob_url(repo_blob_url: str, digest: str) -> str:
    """`repoBlobUrl` + `/` (if missing) + digest, as upstream builds it."""
    return repo_blob_url + ("" if repo_blob_url.endswith("/") else "/") + digest


def default_remote_opener() -> RemoteOpener:
    """The registry client's blob opener, imported only when a remote lower is present."""
    try:
        from ..registry import open_remote_blob  # type: ignore[attr-defined]
    except ImportError as e:
        raise ImportError(f"remote layers need overlaybd.registry.open_remote_blob, which is unavailable: {e}") from e
    return open_remote_blob


def open_lower_source(
    config_path: str,
    index: int,
    lower: Any,
    repo_blob_url: str,
    service: Any,
    remote_opener: RemoteOpener | None,
    download: Any = None,
) -> RandomAccessFile:
    """The raw byte source of lower `index` (local file or remote blob), not yet unwrapped.

    `download` (the device config's `download` section, None = the service's) is passed to
    the default registry opener, which schedules the background download into `lower.dir`.
    """
    field = f"lowers[{index}]"
    if lower.target_digest or lower.gzip_index:
        raise LayerOpenError(
            config_path, field, "TurboOCI over a remote or gzip target (targetDigest/gzipIndex) is not supported"
        )
    local = find_local(lower)
    if local is not None:
        try:
            return LocalFile(local)
        except FormatError as e:
            raise LayerOpenError(config_path, field, str(e)) from e
    if not lower.digest:
        tried = ", ".join(local_candidates(lower)) or "(no file or dir given)"
        raise LayerOpenError(config_path, field, f"no local layer file found (tried {tried}) and no digest")
    if not repo_blob_url:
        raise LayerOpenError(config_path, field, "remote layer (digest only) but repoBlobUrl is empty")
    extra: dict[str, Any] = {}
    if remote_opener is None:
        try:
            remote_opener = default_remote_opener()
        except ImportError as e:
            raise LayerOpenError(config_path, field, str(e)) from e
        extra["download"] = download
    try:
        return remote_opener(repo_blob_url, lower, service, **extra)
    except Exception as e:  # the registry client's own errors, auth failures, timeouts: all become the reason
        from ..registry.image_ref import redact_url  # never echo credentials given in repoBlobUrl

        url = redact_url(blob_url(repo_blob_url, lower.digest))
        raise LayerOpenError(config_path, field, f"failed to open remote file {url}: {e}") from e
