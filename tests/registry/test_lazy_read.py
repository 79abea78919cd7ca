"""Lazy reads of images whose layers live only in a real docker-registry (pushed with skopeo).

Bytes fetched are counted by a test proxy in front of the real registry.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from helpers.registry import build_layout, device, make_service
from helpers.vectors import L01_SHA, logical_sha256
from overlaybd.image.image import open_image
from overlaybd.registry import RegistryClient, RegistryError, open_remote_blob, parse_reference
from overlaybd.registry.metrics import METRICS

pytestmark = pytest.mark.registry


def test_image_from_registry_matches_local_hash(tmp_path, registry, fault_proxy, vector_layers):
    layers = build_layout(tmp_path / "oci", "v1", vector_layers)
    registry.push(tmp_path / "oci", "v1", "vec/l01")
    svc = make_service(tmp_path, refill=4096, audit=True)
    cfg = device(f"http://{fault_proxy.host}/v2/vec/l01/blobs", layers)
    with open_image(cfg, svc) as img:
        assert img.size() == 64 << 20
        # a few blocks' worth: only the ZFile trailer/jump table and the touched compressed blocks move
        for off in (0, 1 << 20, (9 << 20) - 8192, 20 << 20):
            img.pread(4096, off)
        partial = fault_proxy.bytes_relayed
        total_blobs = sum(x["size"] for x in layers)
        assert 0 < partial < total_blobs
        assert logical_sha256(img) == L01_SHA
    audit = (tmp_path / "audit.log").read_text()
    assert "|AUDIT|th=" in audit and "|download[pathname=http://" in audit


def test_random_blob_fetches_only_touched_blocks(tmp_path, registry, fault_proxy):
    data = os.urandom(4 << 20)
    blob = tmp_path / "random.bin"
    blob.write_bytes(data)
    layers = build_layout(tmp_path / "oci", "r", [blob])
    registry.push(tmp_path / "oci", "r", "vec/random")
    svc = make_service(tmp_path)  # refill 256 KiB
    lower = device(f"http://{fault_proxy.host}/v2/vec/random/blobs", layers).lowers[0]
    f = open_remote_blob(f"http://{fault_proxy.host}/v2/vec/random/blobs", lower, svc)
    try:
        assert f.size() == len(data)
        before = fault_proxy.bytes_relayed
        assert f.pread(100, 300_000) == data[300_000:300_100]  # block 1
        assert f.pread(5000, 3_000_000) == data[3_000_000:3_005_000]  # blocks 11 (and 11 only)
        assert fault_proxy.bytes_relayed - before == 2 * 262144
        assert fault_proxy.ranges[-2:] == ["bytes=262144-524287", "bytes=2883584-3145727"]
        # cached now (once the asynchronous cache writes landed): no more traffic, and the data is right
        f.remote.flush()
        hits = METRICS.cache_hits
        assert f.pread(4096, 262144) == data[262144:266240]
        assert fault_proxy.bytes_relayed - before == 2 * 262144
        assert METRICS.cache_hits == hits + 1
    finally:
        f.close()
    # a new process would see the same cache: reopen and read without traffic
    f2 = open_remote_blob(f"http://{fault_proxy.host}/v2/vec/random/blobs", lower, svc)
    try:
        n0 = fault_proxy.bytes_relayed
        assert f2.pread(1000, 2_900_000) == data[2_900_000:2_901_000]
        assert fault_proxy.bytes_relayed == n0
        assert hashlib.sha256(f2.pread(len(data), 0)).hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        f2.close()


def test_client_manifest_and_blob_api(tmp_path, registry, vector_layers):
    layers = build_layout(tmp_path / "oci", "v1", vector_layers)
    registry.push(tmp_path / "oci", "v1", "vec/l01")
    client = RegistryClient(make_service(tmp_path))
    ref = parse_reference(f"{registry.host}/vec/l01:v1")
    m = client.get_manifest(ref, scheme="http")
    assert [x["digest"] for x in m.layers] == [x["digest"] for x in layers]
    assert m.layers[0]["annotations"]["containerd.io/snapshot/overlaybd/blob-digest"] == layers[0]["digest"]
    again = client.get_manifest(parse_reference(f"{registry.host}/vec/l01@{m.digest}"), scheme="http")
    assert again.body == m.body
    blob = client.get_blob(ref, layers[1]["digest"], scheme="http")
    assert blob == vector_layers[1].read_bytes()
    assert client.repo_blob_url(ref, "http") == f"http://{registry.host}/v2/vec/l01/blobs"


def test_index_platform_selection_and_docker_v2(tmp_path, registry, vectors):
    from helpers.registry import build_multiarch_layout
    from overlaybd.registry.client import MEDIA_DOCKER_MANIFEST

    l0, l1 = vectors / "commit" / "L0.commit", vectors / "commit" / "L1.commit"
    digests = build_multiarch_layout(tmp_path / "multi", "m", {"amd64": [l0], "arm64": [l1]})
    registry.push(tmp_path / "multi", "m", "vec/multi")
    client = RegistryClient(make_service(tmp_path))
    ref = parse_reference(f"{registry.host}/vec/multi:m")
    arm = client.get_manifest(ref, platform="linux/arm64", scheme="http")
    assert arm.digest == digests["arm64"]
    assert arm.layers[0]["digest"] == "sha256:" + hashlib.sha256(l1.read_bytes()).hexdigest()
    assert client.get_manifest(ref, scheme="http").digest == digests["amd64"]
    with pytest.raises(RegistryError, match="no manifest for linux/s390x"):
        client.get_manifest(ref, platform="linux/s390x", scheme="http")
    # Docker schema 2 (skopeo converts; it also gzips the layer, which does not matter here)
    build_layout(tmp_path / "single", "d", [l0])
    registry.push(tmp_path / "single", "d", "vec/docker", fmt="v2s2")
    m = client.get_manifest(parse_reference(f"{registry.host}/vec/docker:d"), scheme="http")
    assert m.media_type == MEDIA_DOCKER_MANIFEST and len(m.layers) == 1


def test_blob_redirect_followed_and_reused(tmp_path, registry, fault_proxy, vector_layers):
    """The test proxy answers blob requests with 307 to another URL (as registries do to object storage):
    the client follows it and keeps using the resolved URL instead of asking the registry every time."""
    layers = build_layout(tmp_path / "oci", "v1", vector_layers)
    registry.push(tmp_path / "oci", "v1", "vec/l01")
    fault_proxy.redirect_blobs = True
    svc = make_service(tmp_path, refill=4096)
    with open_image(device(f"http://{fault_proxy.host}/v2/vec/l01/blobs", layers), svc) as img:
        assert logical_sha256(img) == L01_SHA
    assert fault_proxy.redirects == 2  # one resolution per blob, then straight to the target
