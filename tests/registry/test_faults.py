"""Faults against a real docker-registry: restarts, injected 500s/truncations (test proxy), bad blobs,
full and corrupted cache directories."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading

import pytest
from helpers.registry import build_layout, device, make_service, mounted_tmpfs
from helpers.vectors import L01_SHA, logical_sha256
from helpers.wait import wait_for
from overlaybd.image.image import open_image
from overlaybd.registry import RegistryError, client_for, open_remote_blob
from overlaybd.registry.download import DOWNLOADER
from overlaybd.registry.metrics import METRICS

pytestmark = pytest.mark.registry


@pytest.fixture
def l01(tmp_path, registry, vector_layers):
    layers = build_layout(tmp_path / "oci", "v1", vector_layers)
    registry.push(tmp_path / "oci", "v1", "vec/l01")
    return layers


def test_registry_restarted_mid_read(tmp_path, registry, l01):
    svc = make_service(tmp_path, refill=4096)
    with open_image(device(f"http://{registry.host}/v2/vec/l01/blobs", l01), svc) as img:
        first = img.pread(4096, 1 << 20)
        registry.stop()
        restart = threading.Timer(1.0, registry.start)
        restart.start()
        try:
            assert logical_sha256(img) == L01_SHA  # blocks until the registry is back, then resumes
        finally:
            restart.join()
        assert img.pread(4096, 1 << 20) == first


def test_injected_500s_and_truncated_bodies(tmp_path, fault_proxy, l01):
    svc = make_service(tmp_path, refill=4096)
    errors_before = dict(METRICS.errors)
    with open_image(device(f"http://{fault_proxy.host}/v2/vec/l01/blobs", l01), svc) as img:
        fault_proxy.fail_next = 3
        fault_proxy.truncate_next = 3
        assert logical_sha256(img) == L01_SHA
    assert fault_proxy.fail_next == 0 and fault_proxy.truncate_next == 0
    assert METRICS.errors.get("http_5xx", 0) >= errors_before.get("http_5xx", 0) + 3


def test_gives_up_with_clear_error(tmp_path, fault_proxy, l01):
    svc = make_service(tmp_path)
    url = f"http://{fault_proxy.host}/v2/vec/l01/blobs"
    client_for(svc).deadline = 0.5
    fault_proxy.fail_next = 10**6
    with pytest.raises(RegistryError) as ei:
        open_remote_blob(url, device(url, l01).lowers[0], svc)
    msg = str(ei.value)
    assert ei.value.status == 500 and ei.value.errno == errno.EIO
    assert fault_proxy.host in msg and "vec/l01" in msg and l01[0]["digest"] in msg and "HTTP 500" in msg


def test_missing_blob_is_enoent(tmp_path, registry, l01):
    svc = make_service(tmp_path)
    url = f"http://{registry.host}/v2/vec/l01/blobs"
    lower = device(url, [{"digest": "sha256:" + "0" * 64, "size": 1}]).lowers[0]
    with pytest.raises(RegistryError) as ei:
        open_remote_blob(url, lower, svc)
    assert ei.value.errno == errno.ENOENT and ei.value.status == 404


def test_background_download_switches_to_local(tmp_path, registry, l01):
    dirs = [str(tmp_path / "layer0"), str(tmp_path / "layer1")]
    for d in dirs:
        os.makedirs(d)
    svc = make_service(
        tmp_path,
        download={"enable": True, "delay": 0, "delayExtra": 1, "maxMBps": 1, "tryCnt": 2, "blockSize": 8192},
        audit=True,
    )
    url = f"http://{registry.host}/v2/vec/l01/blobs"
    files = [open_remote_blob(url, lo, svc) for lo in device(url, l01, dirs).lowers]
    try:
        wait_for(lambda: all(f.switched for f in files), 30, "every layer to switch to its downloaded file")
        for d, desc in zip(dirs, l01, strict=True):
            data = open(os.path.join(d, "overlaybd.commit"), "rb").read()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
            assert sorted(os.listdir(d)) == ["overlaybd.commit"]  # no temp file left behind
        registry.stop()  # reads are local now
        assert files[1].pread(512, 0)[257:262] == b"ustar"
    finally:
        for f in files:
            f.close()
    assert "|bk_download[pathname=" in (tmp_path / "audit.log").read_text()


def test_background_download_digest_mismatch_discarded(tmp_path, registry, l01, caplog):
    # Corrupt the registry's stored copy of L1 in its trailing tar padding, which reads never touch.
    blob = registry.blob_path(l01[1]["digest"])
    raw = bytearray(blob.read_bytes())
    raw[-10] ^= 0xFF
    blob.write_bytes(bytes(raw))
    d = tmp_path / "layer1"
    d.mkdir()
    svc = make_service(
        tmp_path, refill=4096, download={"enable": True, "delay": 0, "delayExtra": 1, "tryCnt": 1, "blockSize": 4096}
    )
    cfg = device(f"http://{registry.host}/v2/vec/l01/blobs", l01, ["", str(d)])
    caplog.set_level(logging.ERROR, logger="overlaybd.registry.download")
    with open_image(cfg, svc) as img:
        wait_for(
            lambda: "hashes to" in caplog.text and DOWNLOADER.pending() == 0,
            30,
            "the digest mismatch to be logged and the queue to drain",
        )
        assert os.listdir(d) == []  # discarded, temp file removed
        assert logical_sha256(img) == L01_SHA  # still served remotely
    assert l01[1]["digest"] in caplog.text and "discarded" in caplog.text


@pytest.fixture
def tiny_tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "tiny", "32k") as mnt:
        yield mnt


def test_cache_dir_full_still_serves(tmp_path, registry, l01, tiny_tmpfs):
    svc = make_service(
        tmp_path,
        refill=4096,
        extra={"cacheConfig": {"cacheType": "file", "cacheDir": str(tiny_tmpfs / "cache"), "refillSize": 4096}},
    )
    full_before = METRICS.errors.get("cache_full", 0)
    with open_image(device(f"http://{registry.host}/v2/vec/l01/blobs", l01), svc) as img:
        assert logical_sha256(img) == L01_SHA
        assert logical_sha256(img) == L01_SHA
    assert METRICS.errors.get("cache_full", 0) > full_before  # pages that did not fit were served anyway


def test_corrupted_cache_files_are_refetched(tmp_path, fault_proxy, l01):
    svc = make_service(tmp_path, refill=4096)
    cfg = device(f"http://{fault_proxy.host}/v2/vec/l01/blobs", l01)
    with open_image(cfg, svc) as img:
        assert logical_sha256(img) == L01_SHA
    fetched = fault_proxy.bytes_relayed
    # flip bytes in every cached page of L0's data file, and truncate L1's
    data0 = tmp_path / "cache" / l01[0]["digest"]
    raw = bytearray(data0.read_bytes())
    for off in range(100, len(raw), 4096):
        raw[off] ^= 0x5A
    data0.write_bytes(bytes(raw))
    os.truncate(tmp_path / "cache" / l01[1]["digest"], 5000)
    corrupt_before = METRICS.cache_corrupt_blocks
    with open_image(cfg, make_service(tmp_path, refill=4096)) as img:  # as after a daemon restart
        assert logical_sha256(img) == L01_SHA
    assert METRICS.cache_corrupt_blocks > corrupt_before
    assert fault_proxy.bytes_relayed > fetched
    # and now it is healthy again: a third open reads without traffic
    fetched = fault_proxy.bytes_relayed
    with open_image(cfg, make_service(tmp_path, refill=4096)) as img:
        assert logical_sha256(img) == L01_SHA
    assert fault_proxy.bytes_relayed == fetched


def test_background_download_rate_limit_paces_requests(tmp_path, registry, monkeypatch):
    """maxMBps is honoured: the downloader asks to sleep so that size / elapsed <= maxMBps
    (checked on the requested pauses, not on wall time)."""
    from overlaybd.registry import download as dl

    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 << 20))
    layers = build_layout(tmp_path / "oci", "r", [blob])
    registry.push(tmp_path / "oci", "r", "vec/rate")
    sleeps: list[float] = []
    monkeypatch.setattr(dl, "_sleep", sleeps.append)
    d = tmp_path / "layer"
    d.mkdir()
    svc = make_service(
        tmp_path, download={"enable": True, "delay": 0, "delayExtra": 1, "maxMBps": 1, "blockSize": 262144}
    )
    url = f"http://{registry.host}/v2/vec/rate/blobs"
    f = open_remote_blob(url, device(url, layers, [str(d)]).lowers[0], svc)
    try:
        wait_for(lambda: f.switched, 30, "the switch to the downloaded file")
    finally:
        f.close()
    assert sum(sleeps) >= 2.5  # 3 MiB at 1 MiB/s: ~3 s of pauses requested, minus the fetch time itself
    assert (d / "overlaybd.commit").read_bytes() == blob.read_bytes()


def test_cache_survives_restart_with_registry_down(tmp_path, registry, l01):
    """After a daemon restart (new service/client objects, same cacheDir) everything read before is served
    from the cache, even with the registry unreachable."""
    cfg = device(f"http://{registry.host}/v2/vec/l01/blobs", l01)
    with open_image(cfg, make_service(tmp_path, refill=4096)) as img:
        assert logical_sha256(img) == L01_SHA
    registry.stop()
    with open_image(cfg, make_service(tmp_path, refill=4096)) as img:
        assert logical_sha256(img) == L01_SHA
