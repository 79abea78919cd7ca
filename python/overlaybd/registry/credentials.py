"""Registry credentials from `credentialConfig` (file / http / https / uds), looked up per blob URL.

Credentials are read fresh every time an auth decision is made (a token fetch or
a refused request), never cached, so rotating cred.json takes effect without a
restart — the same policy as upstream, which reloads on every token fetch.
Matching follows upstream: for `https://HOST/v2/A/B/blobs/D` the keys `HOST`,
`HOST/A`, `HOST/A/B` are candidates and the first `auths` entry (JSON order)
equal to any of them wins.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

log = logging.getLogger(__name__)


class CredentialError(Exception):
    """The credential source exists but cannot be used; names the source and the field."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        super().__init__(f"{source}: {field}: {message}")


@dataclass(frozen=True)
class Credential:
    username: str
    password: str


def candidate_keys(url: str) -> list[str]:
    """`HOST`, `HOST/A`, `HOST/A/B` for a `/v2/A/B/blobs/...` (or `/manifests/...`) URL."""
    parts = urlsplit(url)
    host = parts.netloc
    segs = [s for s in parts.path.split("/") if s]
    if segs and segs[0] == "v2":
        segs = segs[1:]
    for i, s in enumerate(segs):
        if s in ("blobs", "manifests", "tags"):
            segs = segs[:i]
            break
    keys = [host]
    for i in range(len(segs)):
        keys.append(host + "/" + "/".join(segs[: i + 1]))
    return keys


def _entry_credential(source: str, key: str, entry: Any) -> Credential | None:
    if not isinstance(entry, dict):
        raise CredentialError(source, f"auths.{key}", "expected an object")
    user, pw = entry.get("username", ""), entry.get("password", "")
    if user or pw:
        if not isinstance(user, str) or not isinstance(pw, str):
            raise CredentialError(source, f"auths.{key}", "username/password must be strings")
        return Credential(user, pw)
    auth = entry.get("auth", "")
    if auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, TypeError) as e:
            raise CredentialError(source, f"auths.{key}.auth", f"not base64 of user:password ({e})") from None
        if ":" not in decoded:
            raise CredentialError(source, f"auths.{key}.auth", "decoded value has no ':' between user and password")
        u, _, p = decoded.partition(":")
        return Credential(u, p)
    return None


def match_auths(source: str, auths: Any, url: str) -> Credential | None:
    """First `auths` entry (in document order) whose key equals one of the URL's candidate keys."""
    if auths is None:
        return None
    if not isinstance(auths, dict):
        raise CredentialError(source, "auths", "expected an object")
    keys = set(candidate_keys(url))
    for key, entry in auths.items():
        k = key
        for prefix in ("https://", "http://"):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if k.rstrip("/") in keys:
            return _entry_credential(source, key, entry)
    return None


class CredentialProvider:
    """Resolves a Credential for a URL from the configured source (re-read on every call)."""

    def __init__(
        self,
        mode: str,
        path: str,
        timeout: int = 1,
        client_cert: str = "",
        client_key: str = "",
        server_ca: str = "",
        transport: Any = None,
    ) -> None:
        self.mode = mode or "file"
        self.path = path
        self.timeout = max(1, timeout)
        self.client = (client_cert, client_key, server_ca)
        self.transport = transport

    @classmethod
    def from_service(cls, service: Any, transport: Any = None) -> CredentialProvider:
        cc = service.credential_config
        return cls(
            cc.mode,
            cc.path,  # legacy credentialFilePath already folded in by config.service
            cc.timeout,
            cc.client_cert_path,
            cc.client_key_path,
            cc.server_ca_path,
            transport,
        )

    def lookup(self, url: str) -> Credential | None:
        if not self.path:
            return None
        if self.mode == "file":
            return self._from_file(url)
        return self._from_service(url)

    def _from_file(self, url: str) -> Credential | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(4 << 20)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CredentialError(self.path, "file", f"cannot read: {e.strerror}") from None
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise CredentialError(self.path, "json", str(e)) from None
        if not isinstance(doc, dict):
            raise CredentialError(self.path, "(top level)", "expected an object")
        return match_auths(self.path, doc.get("auths"), url)

    def _from_service(self, url: str) -> Credential | None:
        """http/https/uds: GET <path>?remote_url=<url> -> {"success":..., "data":{"auths":{...}}}."""
        if self.transport is None:
            raise CredentialError(self.path, "credentialConfig.mode", f"{self.mode} needs an HTTP transport")
        sock = ""
        base = self.path
        if self.mode == "uds":
            sock, base = self.path, "http://localhost/auth"
        req = f"{base}{'&' if '?' in base else '?'}remote_url={quote(url, safe='')}"
        cert = self.client if self.mode == "https" else None
        resp = self.transport.request("GET", req, timeout=float(self.timeout), unix_socket=sock, cert=cert)
        if resp.status != 200:
            raise CredentialError(self.path, "response", f"HTTP {resp.status}")
        try:
            doc = json.loads(resp.body)
        except ValueError as e:
            raise CredentialError(self.path, "response", f"not JSON: {e}") from None
        if not isinstance(doc, dict) or not doc.get("success", False):
            raise CredentialError(self.path, "success", "credential service reported failure")
        data = doc.get("data") or {}
        return match_auths(self.path, data.get("auths") if isinstance(data, dict) else None, url)
