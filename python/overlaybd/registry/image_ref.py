"""Image references (`host:port/repo:tag@digest`) and blob URLs, with Docker Hub defaults.

The snapshotter gets references from containerd; the device config gets a
`repoBlobUrl` prefix. Both are parsed here so host/repository/scheme rules live in
one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")


class ReferenceError(ValueError):
    """An image reference or blob URL that cannot be parsed; names the offending text and part."""

    def __init__(self, text: str, part: str, message: str) -> None:
        self.text = text
        self.part = part
        super().__init__(f"image reference {text!r}: {part}: {message}")


@dataclass(frozen=True)
class ImageReference:
    """A parsed reference. `registry` is the host[:port] to contact (Docker Hub mapped to its API host)."""

    registry: str
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def _is_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def parse_reference(text: str) -> ImageReference:
    """Parse `[host[:port]/]repo[:tag][@digest]`; no host means Docker Hub (`library/` for one-part names)."""
    if not text or text != text.strip():
        raise ReferenceError(text, "reference", "empty or has surrounding whitespace")
    rest = text
    digest = ""
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise ReferenceError(text, "digest", f"{digest!r} is not <algorithm>:<hex>")
    first, sep, remainder = rest.partition("/")
    if sep and _is_host(first):
        registry, path = first, remainder
    else:
        registry, path = DOCKER_HUB, rest
    tag = ""
    slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > slash:
        path, tag = path[:colon], path[colon + 1 :]
        if not _TAG.match(tag):
            raise ReferenceError(text, "tag", f"{tag!r} is not a valid tag")
    if registry == DOCKER_HUB:
        registry = DOCKER_HUB_API
        if "/" not in path:
            path = "library/" + path
    if not _REPO.match(path):
        raise ReferenceError(text, "repository", f"{path!r} is not a valid repository name")
    if not tag and not digest:
        tag = "latest"
    return ImageReference(registry=registry, repository=path, tag=tag, digest=digest)


@dataclass(frozen=True)
class BlobLocation:
    """Where one blob lives: scheme, registry host[:port], repository, digest.

    `userinfo` holds `user:password` given in the URL (never part of `url`, `label` or repr, so it
    cannot reach a log line, an error message or the audit log)."""

    scheme: str
    registry: str
    repository: str
    digest: str
    userinfo: tuple[str, str] | None = field(default=None, repr=False, compare=False)
    # A mirror's URL for this blob (hosts.toml path prefix, `ns=` query); "" = the registry's own /v2/ URL.
    mirror_url: str = field(default="", compare=False)

    @property
    def url(self) -> str:
        return self.mirror_url or f"{self.scheme}://{self.registry}/v2/{self.repository}/blobs/{self.digest}"

    @property
    def label(self) -> str:
        """Human-readable name for errors: registry/repository@digest."""
        return f"{self.registry}/{self.repository}@{self.digest}"


def redact_url(url: str) -> str:
    """`url` with its userinfo replaced by `***` (`http://***@host/...`): safe for logs, errors, audit."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"


def blob_url(repo_blob_url: str, digest: str) -> str:
    """Upstream rule: `repoBlobUrl` + ('/' if missing) + digest."""
    return repo_blob_url + ("" if repo_blob_url.endswith("/") else "/") + digest


def parse_blob_url(repo_blob_url: str, digest: str) -> BlobLocation:
    """Split `<scheme>://HOST/v2/<repo>/blobs` + digest into its parts (for auth scope and cache naming)."""
    url = blob_url(repo_blob_url, digest)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ReferenceError(redact_url(repo_blob_url), "repoBlobUrl", "must be http(s)://HOST/v2/<repository>/blobs")
    m = re.match(r"^/v2/(.+)/blobs/([^/]+)$", parts.path)
    if not m:
        raise ReferenceError(redact_url(repo_blob_url), "repoBlobUrl", "path must be /v2/<repository>/blobs")
    if not _DIGEST.match(m.group(2)):
        raise ReferenceError(digest, "digest", f"{m.group(2)!r} is not <algorithm>:<hex>")
    host = parts.netloc.rpartition("@")[2]
    userinfo = None
    if "@" in parts.netloc:
        userinfo = (unquote(parts.username or ""), unquote(parts.password or ""))
    return BlobLocation(parts.scheme, host, m.group(1), m.group(2), userinfo)
