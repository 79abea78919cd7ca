"""HTTPS against a real docker-registry with a test CA and required client certificates (certConfig)."""

from __future__ import annotations

import pytest
from helpers.registry import build_layout, device, make_service
from helpers.vectors import L01_SHA, logical_sha256
from overlaybd.image.image import open_image
from overlaybd.registry import RegistryError, client_for, open_remote_blob

pytestmark = pytest.mark.registry


def test_https_with_client_certificate_uses_http2(tmp_path, tls_registry, vector_layers, monkeypatch):
    layers = build_layout(tmp_path / "oci", "v1", vector_layers)
    tls_registry.push(tmp_path / "oci", "v1", "sec/app")
    monkeypatch.setenv("OVERLAYBD_CA_FILE", str(tls_registry.certs / "ca.crt"))  # instead of the system CAs
    url = f"https://{tls_registry.host}/v2/sec/app/blobs"
    svc = make_service(
        tmp_path,
        extra={
            "certConfig": {
                "certFile": str(tls_registry.certs / "client.crt"),
                "keyFile": str(tls_registry.certs / "client.key"),
            }
        },
    )
    with open_image(device(url, layers), svc) as img:
        assert logical_sha256(img) == L01_SHA
    assert client_for(svc).transport.last_http_version == 2  # negotiated by ALPN, as the registry offers it


def test_https_untrusted_ca_fails_fast_with_clear_error(tmp_path, tls_registry, vector_layers, monkeypatch):
    layers = build_layout(tmp_path / "oci", "v1", vector_layers)
    tls_registry.push(tmp_path / "oci", "v1", "sec/app")
    monkeypatch.setenv("OVERLAYBD_CA_FILE", "/etc/ssl/certs/ca-certificates.crt")  # does not know the test CA
    url = f"https://{tls_registry.host}/v2/sec/app/blobs"
    svc = make_service(tmp_path)
    with pytest.raises(RegistryError) as ei:
        open_remote_blob(url, device(url, layers).lowers[0], svc)
    assert tls_registry.host in str(ei.value) and "sec/app" in str(ei.value) and "certificate" in str(ei.value)
