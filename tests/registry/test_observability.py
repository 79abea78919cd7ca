"""Prometheus metrics endpoint, audit log lines, and P2P proxy routing (test proxy as the P2P daemon)."""

from __future__ import annotations

import re
import urllib.request

import pytest
from helpers.registry import build_layout, device, free_port, make_service
from helpers.vectors import L01_SHA, logical_sha256
from overlaybd.image.image import open_image
from overlaybd.registry.metrics import stop_exporter

pytestmark = pytest.mark.registry


@pytest.fixture
def l01(tmp_path, registry, vector_layers):
    layers = build_layout(tmp_path / "oci", "v1", vector_layers)
    registry.push(tmp_path / "oci", "v1", "vec/l01")
    return layers


def test_metrics_endpoint_and_audit(tmp_path, registry, l01):
    port = free_port()
    svc = make_service(
        tmp_path, refill=4096, audit=True, extra={"exporterConfig": {"enable": True, "port": port, "uriPrefix": "/m"}}
    )
    try:
        with open_image(device(f"http://{registry.host}/v2/vec/l01/blobs", l01), svc) as img:
            assert logical_sha256(img) == L01_SHA
            assert logical_sha256(img) == L01_SHA
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/m", timeout=5).read().decode()
    finally:
        stop_exporter()
    fetched = int(re.search(r"^overlaybd_registry_bytes_fetched_total (\d+)", text, re.M).group(1))
    assert fetched >= sum(x["size"] for x in l01) - 8192
    assert re.search(r"^overlaybd_cache_hits_total [1-9]", text, re.M)
    assert re.search(r"^overlaybd_cache_misses_total [1-9]", text, re.M)
    assert 'overlaybd_registry_request_seconds_bucket{le="+Inf"}' in text
    assert "# TYPE overlaybd_registry_errors_total counter" in text
    line_re = re.compile(
        r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d{6}\|AUDIT\|th=[0-9a-f]+\|download"
        r"\[pathname=http://[^\]]+\]\[offset=\d+\]\[size=\d+\]\[latency=\d+\]$"
    )
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert any(line_re.match(x) for x in lines), lines[:3]


@pytest.mark.parametrize("mode", ["proxy", "prefix"])
def test_p2p_routes_blob_requests(tmp_path, registry, fault_proxy, l01, mode):
    addr = f"http://{fault_proxy.host}" + ("/accelerator" if mode == "prefix" else "")
    svc = make_service(tmp_path, extra={"p2pConfig": {"enable": True, "address": addr}})
    with open_image(device(f"http://{registry.host}/v2/vec/l01/blobs", l01), svc) as img:
        assert logical_sha256(img) == L01_SHA
    assert fault_proxy.p2p_requests > 0 and fault_proxy.bytes_relayed > 0
