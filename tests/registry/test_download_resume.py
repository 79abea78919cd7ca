"""Background download resumes from `<dir>/.download` (spec §4.4) against a real docker-registry.

Bytes on the wire are counted by the test proxy in front of the registry, so "resumed" means fewer
bytes fetched the second time, not a flag the code sets about itself."""

from __future__ import annotations

import os

import pytest
from helpers.registry import build_layout, device, make_service
from helpers.wait import wait_for
from overlaybd.registry import open_remote_blob
from overlaybd.registry.download import DigestMismatch, download_layer
from overlaybd.registry.metrics import METRICS

pytestmark = pytest.mark.registry

BLOCK = 262144
SIZE = 2 << 20


@pytest.fixture
def blob(tmp_path, registry):
    data = os.urandom(SIZE)
    (tmp_path / "blob.bin").write_bytes(data)
    layers = build_layout(tmp_path / "oci", "r", [tmp_path / "blob.bin"])
    registry.push(tmp_path / "oci", "r", "vec/resume")
    return data, layers


def _open(tmp_path, proxy, layers, layer_dir, **download):
    svc = make_service(tmp_path, download={"enable": False, "blockSize": BLOCK, "maxMBps": 1000, **download})
    url = f"http://{proxy.host}/v2/vec/resume/blobs"
    return open_remote_blob(url, device(url, layers, [str(layer_dir)]).lowers[0], svc), svc


def test_partial_download_is_resumed(tmp_path, fault_proxy, blob):
    """A .download holding the first half (as a stopped daemon leaves it) only costs the second half."""
    data, layers = blob
    d = tmp_path / "layer"
    d.mkdir()
    with open(d / ".download", "wb") as part:
        part.truncate(SIZE)
        part.write(data[: SIZE // 2])
    f, svc = _open(tmp_path, fault_proxy, layers, d)
    try:
        before = fault_proxy.bytes_relayed
        download_layer(f, svc.download, _audit())
        assert fault_proxy.bytes_relayed - before == SIZE // 2
        assert f.switched
    finally:
        f.close()
    assert sorted(os.listdir(d)) == ["overlaybd.commit"]
    assert (d / "overlaybd.commit").read_bytes() == data


def test_corrupt_partial_is_discarded_then_refetched(tmp_path, fault_proxy, blob):
    """A resumed file whose kept blocks are wrong is never renamed: the digest check fails, the partial file
    is deleted, and the next try fetches everything."""
    data, layers = blob
    d = tmp_path / "layer"
    d.mkdir()
    bad = bytearray(data[:BLOCK])
    bad[100] ^= 0xFF
    with open(d / ".download", "wb") as part:
        part.truncate(SIZE)
        part.write(bad)
    f, svc = _open(tmp_path, fault_proxy, layers, d)
    try:
        with pytest.raises(DigestMismatch, match="discarded"):
            download_layer(f, svc.download, _audit())
        assert os.listdir(d) == []  # neither renamed nor kept
        assert not f.switched
        before = fault_proxy.bytes_relayed
        download_layer(f, svc.download, _audit())
        assert fault_proxy.bytes_relayed - before == SIZE
    finally:
        f.close()
    assert (d / "overlaybd.commit").read_bytes() == data


def test_download_interrupted_by_close_resumes_after_reopen(tmp_path, fault_proxy, blob):
    """The real scheduler: the device is closed mid-download (1 MiB/s, so it is still running), the partial
    file stays, and a new open (as after a restart) fetches only what is missing."""
    data, layers = blob
    d = tmp_path / "layer"
    d.mkdir()
    slow = {"enable": True, "delay": 0, "delayExtra": 1, "maxMBps": 1, "tryCnt": 1}
    f, _ = _open(tmp_path, fault_proxy, layers, d, **slow)
    try:
        wait_for(lambda: fault_proxy.bytes_relayed >= 2 * BLOCK, 30, "two blocks relayed")
    finally:
        f.close()
    wait_for(lambda: (d / ".download").exists() and not _busy(), 30, "the partial .download to be left idle")
    first = fault_proxy.bytes_relayed
    assert not (d / "overlaybd.commit").exists()
    assert 0 < first < SIZE
    f, _ = _open(tmp_path, fault_proxy, layers, d, enable=True, delay=0, delayExtra=1, tryCnt=1)
    try:
        wait_for(lambda: f.switched, 30, "the switch to the downloaded file")
    finally:
        f.close()
    second = fault_proxy.bytes_relayed - first
    assert second < SIZE  # resumed, not restarted
    assert first + second >= SIZE
    assert sorted(os.listdir(d)) == ["overlaybd.commit"]
    assert (d / "overlaybd.commit").read_bytes() == data


def _busy() -> bool:
    """True while the download worker is still inside a job (it notices a close at its next block)."""
    from overlaybd.registry.download import DOWNLOADER

    return DOWNLOADER.active is not None


def _audit():
    from overlaybd.registry.audit import AuditLog

    return AuditLog("", False)


def test_registry_outage_mid_download_resumes(tmp_path, registry, fault_proxy, blob, monkeypatch):
    """The registry goes away half way: the attempt fails, `.download` stays, and the retry after the
    registry is back fetches only the rest."""
    from overlaybd.registry.download import DOWNLOADER

    data, layers = blob
    d = tmp_path / "layer"
    d.mkdir()
    monkeypatch.setattr(DOWNLOADER, "retry_delay", 0.5)
    f, svc = _open(tmp_path, fault_proxy, layers, d, enable=True, delay=0, delayExtra=1, maxMBps=1, tryCnt=5)
    f.client.deadline = 1.0  # give up on the dead registry quickly (restored below: the client is shared)
    errors_before = METRICS.errors.get("bk_download", 0)
    try:
        wait_for(lambda: fault_proxy.bytes_relayed >= 2 * BLOCK, 30, "two blocks relayed")
        registry.stop()
        wait_for(lambda: METRICS.errors.get("bk_download", 0) > errors_before, 30, "a counted bk_download error")
        first = fault_proxy.bytes_relayed
        assert (d / ".download").exists() and not (d / "overlaybd.commit").exists()
        registry.start()
        wait_for(lambda: f.switched, 30, "the switch to the downloaded file")
    finally:
        f.client.deadline = 30.0
        f.close()
    assert fault_proxy.bytes_relayed - first < SIZE  # resumed, not restarted
    assert sorted(os.listdir(d)) == ["overlaybd.commit"]
    assert (d / "overlaybd.commit").read_bytes() == data
