"""Registry authentication: the WWW-Authenticate challenge, Basic, and Bearer tokens per scope.

Tokens are cached per (realm, service, scope) until shortly before they expire; a
401 on a request that carried a cached token drops it and a new one is fetched
(with credentials re-read from their source), so expired tokens and rotated
passwords both recover without a restart.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from .credentials import Credential

TOKEN_MIN_LIFE = 30.0  # seconds a token is kept if the server gives no lifetime (upstream: >= 30 s)
_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


class AuthError(Exception):
    """Authentication could not be completed (bad challenge, token endpoint failure)."""


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """`Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`; None if absent."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


def basic_header(cred: Credential) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode()


@dataclass
class _Token:
    value: str
    expires: float


class TokenCache:
    """Bearer tokens per token-URL (realm+service+scope)."""

    def __init__(self) -> None:
        self._tokens: dict[str, _Token] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            t = self._tokens.get(key)
            if t and t.expires > time.monotonic():
                return t.value
            self._tokens.pop(key, None)
            return None

    def put(self, key: str, value: str, lifetime: float) -> None:
        with self._lock:
            self._tokens[key] = _Token(value, time.monotonic() + lifetime)

    def drop(self, key: str) -> None:
        with self._lock:
            self._tokens.pop(key, None)


def token_url(challenge: Challenge, repository: str) -> str:
    """`<realm>?service=<service>&scope=<scope>`; the scope defaults to pull on our repository."""
    realm = challenge.params.get("realm", "")
    if not realm:
        raise AuthError("Bearer challenge without realm")
    q: dict[str, str] = {}
    if challenge.params.get("service"):
        q["service"] = challenge.params["service"]
    q["scope"] = challenge.params.get("scope") or f"repository:{repository}:pull"
    return realm + ("&" if "?" in realm else "?") + urlencode(q)


def parse_token_response(body: bytes) -> tuple[str, float]:
    """JSON `token` or `access_token`, lifetime from `expires_in` (seconds, default 60)."""
    try:
        doc: Any = json.loads(body)
    except ValueError as e:
        raise AuthError(f"token endpoint returned non-JSON: {e}") from None
    if not isinstance(doc, dict):
        raise AuthError("token endpoint returned a non-object")
    tok = doc.get("token") or doc.get("access_token")
    if not isinstance(tok, str) or not tok:
        raise AuthError("token endpoint response has no token/access_token")
    exp = doc.get("expires_in", 60)
    lifetime = float(exp) if isinstance(exp, (int, float)) and exp > 0 else 60.0
    # Refresh a little early, but keep short-lived tokens at least TOKEN_MIN_LIFE.
    return tok, max(min(TOKEN_MIN_LIFE, lifetime), lifetime - 10.0)
