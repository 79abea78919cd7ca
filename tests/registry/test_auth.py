"""Authentication against a real docker-registry: htpasswd Basic and token (JWT) auth."""

from __future__ import annotations

import base64
import errno
import json

import pytest
from helpers.registry import build_layout, device, make_service
from helpers.vectors import L01_SHA, logical_sha256
from overlaybd.image.image import open_image
from overlaybd.registry import (
    RegistryClient,
    RegistryError,
    open_remote_blob,
    parse_reference,
)

pytestmark = pytest.mark.registry


def _push(tmp_path, reg, vector_layers, creds):
    layers = build_layout(tmp_path / "oci", "v1", vector_layers)
    reg.push(tmp_path / "oci", "v1", "team/app", creds=creds)
    return layers


def test_basic_auth_prefix_key_and_b64(tmp_path, basic_registry, vector_layers):
    layers = _push(tmp_path, basic_registry, vector_layers, "alice:s3cret")
    url = f"http://{basic_registry.host}/v2/team/app/blobs"
    auth = base64.b64encode(b"alice:s3cret").decode()
    # first matching key in document order wins: the host/path prefix entry
    cred = {
        "auths": {
            "other.example:5000": {"username": "x", "password": "y"},
            f"{basic_registry.host}/team": {"auth": auth},
            basic_registry.host: {"username": "alice", "password": "wrong"},
        }
    }
    with open_image(device(url, layers), make_service(tmp_path, cred=cred)) as img:
        assert logical_sha256(img) == L01_SHA


def test_basic_auth_missing_then_rotated_credentials(tmp_path, basic_registry, vector_layers):
    layers = _push(tmp_path, basic_registry, vector_layers, "alice:s3cret")
    url = f"http://{basic_registry.host}/v2/team/app/blobs"
    svc = make_service(tmp_path, cred={"auths": {basic_registry.host: {"username": "alice", "password": "old"}}})
    lower = device(url, layers).lowers[0]
    with pytest.raises(RegistryError) as ei:
        open_remote_blob(url, lower, svc)
    e = ei.value
    assert e.errno == errno.EPERM and e.status == 401
    assert basic_registry.host in str(e) and "team/app" in str(e) and lower.digest in str(e)
    # rotate the password in cred.json: the same service/client picks it up without a restart
    (tmp_path / "cred.json").write_text(
        json.dumps({"auths": {basic_registry.host: {"username": "alice", "password": "s3cret"}}})
    )
    f = open_remote_blob(url, lower, svc)
    try:
        assert f.pread(16, 0) == vector_layers[0].read_bytes()[:16]
    finally:
        f.close()


def test_token_auth_cached_and_expired_token_refreshed(tmp_path, token_registry, vector_layers):
    layers = _push(tmp_path, token_registry, vector_layers, "bob:hunter2")
    tok = token_registry.token
    url = f"http://{token_registry.host}/v2/team/app/blobs"
    svc = make_service(
        tmp_path, refill=4096, cred={"auths": {token_registry.host: {"username": "bob", "password": "hunter2"}}}
    )
    tok.requests = 0
    tok.expire_next = 1  # the first token handed out is already expired: the registry says 401, we refresh
    with open_image(device(url, layers), svc) as img:
        assert logical_sha256(img) == L01_SHA
    assert tok.requests == 2  # one expired + one good token, then cached for every range request


def test_token_auth_wrong_credentials_clear_error(tmp_path, token_registry, vector_layers):
    layers = _push(tmp_path, token_registry, vector_layers, "bob:hunter2")
    url = f"http://{token_registry.host}/v2/team/app/blobs"
    svc = make_service(tmp_path, cred={"auths": {token_registry.host: {"username": "bob", "password": "nope"}}})
    with pytest.raises(RegistryError) as ei:
        open_remote_blob(url, device(url, layers).lowers[0], svc)
    assert ei.value.errno == errno.EPERM and ei.value.status == 401
    assert "token endpoint refused (user 'bob')" in str(ei.value) and "team/app" in str(ei.value)


def test_token_auth_manifest(tmp_path, token_registry, vector_layers):
    layers = _push(tmp_path, token_registry, vector_layers, "bob:hunter2")
    svc = make_service(tmp_path, cred={"auths": {token_registry.host: {"username": "bob", "password": "hunter2"}}})
    m = RegistryClient(svc).get_manifest(parse_reference(f"{token_registry.host}/team/app:v1"), scheme="http")
    assert [x["digest"] for x in m.layers] == [x["digest"] for x in layers]


def test_credentials_from_http_service(tmp_path, basic_registry, vector_layers):
    """credentialConfig.mode=http: a (test) credential service answers GET <path>?remote_url=<blob url>."""
    import http.server
    import threading
    from urllib.parse import parse_qs, urlsplit

    layers = _push(tmp_path, basic_registry, vector_layers, "alice:s3cret")
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.extend(parse_qs(urlsplit(self.path).query).get("remote_url", []))
            body = json.dumps(
                {
                    "traceId": "t",
                    "success": True,
                    "data": {"auths": {basic_registry.host: {"username": "alice", "password": "s3cret"}}},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://{basic_registry.host}/v2/team/app/blobs"
        svc = make_service(
            tmp_path,
            extra={"credentialConfig": {"mode": "http", "path": f"http://127.0.0.1:{srv.server_address[1]}/auth"}},
        )
        with open_image(device(url, layers), svc) as img:
            assert logical_sha256(img) == L01_SHA
    finally:
        srv.shutdown()
        srv.server_close()
    assert asked and asked[0].startswith(url)
