"""Bounded time: every read, open probe and manifest fetch ends within the deadline (`readDeadlineSec`),
errors a retry cannot fix end at once, and reads work again when the registry is back (no restart).

Deadlines are short here (3 s) so the suite stays fast; each test asserts an upper bound on the time.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.registry import build_layout, device, make_service
from helpers.vectors import L01_SHA, logical_sha256
from overlaybd.image.image import open_image
from overlaybd.registry import RegistryClient, RegistryError, client_for, open_remote_blob
from overlaybd.registry.client import DEFAULT_DEADLINE
from overlaybd.registry.transport import is_permanent

from .hostile import HostileServer

pytestmark = pytest.mark.registry

DEADLINE = 3.0
SLACK = 2.0  # scheduling noise on a loaded 2-core CI machine
BLOB = os.urandom(200_000)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def _svc(tmp_path: Path, deadline: float = DEADLINE, **kw: Any) -> Any:
    tmp_path.mkdir(parents=True, exist_ok=True)
    svc = make_service(tmp_path, **kw)
    client_for(svc).deadline = deadline
    return svc


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("overlaybd")]


class _WithDeadline:
    """A service config that has `read_deadline_sec` (whatever the config model in use provides)."""

    def __init__(self, svc: Any, seconds: int) -> None:
        self._svc = svc
        self.read_deadline_sec = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._svc, name)


def test_deadline_comes_from_the_service_setting(tmp_path):
    svc = make_service(tmp_path)
    assert RegistryClient(_WithDeadline(svc, 7)).deadline == 7.0
    assert RegistryClient(svc, deadline=2.5).deadline == 2.5
    expected = float(getattr(svc, "read_deadline_sec", DEFAULT_DEADLINE))
    assert RegistryClient(svc).deadline == expected == 30.0  # the documented default


def test_dripping_body_fails_within_the_deadline_then_recovers(tmp_path, caplog):
    """2 bytes/s used to pass the 1 B/s stall limit forever; now the low-speed limit and the deadline end it."""
    srv = HostileServer([BLOB])
    try:
        svc = _svc(tmp_path, refill=65536)
        f = open_remote_blob(srv.url(), device(srv.url(), [{"digest": DIGEST, "size": len(BLOB)}]).lowers[0], svc)
        try:
            srv.mode = "drip"
            caplog.set_level(logging.INFO)
            t0 = time.monotonic()
            with pytest.raises(RegistryError) as ei:
                f.pread(4096, 70_000)
            took = time.monotonic() - t0
            assert took < DEADLINE + SLACK
            msg = str(ei.value)
            assert DIGEST in msg and "range bytes=65536-131071" in msg and "gave up" in msg
            assert "too slow" in msg or "timed out" in msg
            errs = _errors(caplog)
            assert len(errs) == 1, [r.getMessage() for r in errs]
            line = errs[0].getMessage()
            assert DIGEST in line and "at offset 70000" in line and ("too slow" in line or "timed out" in line)
            assert not (tmp_path / "cache" / DIGEST).exists() or not any(
                (tmp_path / "cache" / DIGEST).read_bytes()[65536:131072]
            )
            srv.mode = "ok"  # the registry is healthy again: the same open file reads, no restart
            assert f.pread(4096, 70_000) == BLOB[70_000:74_096]
        finally:
            f.close()
    finally:
        srv.close()


@pytest.mark.parametrize(("status", "code"), [(403, errno.EPERM), (400, errno.EIO), (404, errno.ENOENT)])
def test_4xx_fails_at_once(tmp_path, status, code):
    srv = HostileServer([BLOB])
    try:
        srv.mode, srv.status = "status", status
        t0 = time.monotonic()
        with pytest.raises(RegistryError) as ei:
            open_remote_blob(
                srv.url(), device(srv.url(), [{"digest": DIGEST, "size": len(BLOB)}]).lowers[0], _svc(tmp_path, 20.0)
            )
        assert time.monotonic() - t0 < 2.0  # not retried for the 20 s deadline
        assert ei.value.status == status and ei.value.errno == code and f"HTTP {status}" in str(ei.value)
        assert len(srv.requests) == 1
    finally:
        srv.close()


def test_tls_to_an_http_port_fails_at_once(tmp_path, registry, vector_layers):
    layers = build_layout(tmp_path / "oci", "v1", vector_layers)
    registry.push(tmp_path / "oci", "v1", "vec/l01")
    url = f"https://{registry.host}/v2/vec/l01/blobs"  # the registry speaks plain http
    t0 = time.monotonic()
    with pytest.raises(RegistryError) as ei:
        open_remote_blob(url, device(url, layers).lowers[0], _svc(tmp_path, 20.0))
    assert time.monotonic() - t0 < 2.0  # "wrong version number" can never succeed: not retried for 20 s
    assert "wrong version number" in str(ei.value) and registry.host in str(ei.value)


def test_transport_error_classification():
    assert is_permanent(35, "OpenSSL/3.0: error:0A00010B:SSL routines::wrong version number")
    assert not is_permanent(35, "OpenSSL SSL_connect: SSL_ERROR_SYSCALL in connection to 127.0.0.1:443")
    assert not is_permanent(35, "Connection reset by peer")
    assert is_permanent(1, "Received HTTP/0.9 when not allowed") and is_permanent(60, "unknown CA")
    assert not is_permanent(7, "Could not connect to server") and not is_permanent(28, "Operation too slow")


@pytest.fixture
def l01(tmp_path, registry, vector_layers):
    layers = build_layout(tmp_path / "oci", "v1", vector_layers)
    registry.push(tmp_path / "oci", "v1", "vec/l01")
    return layers


def test_open_with_registry_down_bounded_by_the_deadline(tmp_path, registry, l01):
    """Prepare used to wait the client's whole 30 s retry budget on its own; it is the same deadline now."""
    registry.stop()
    url = f"http://{registry.host}/v2/vec/l01/blobs"
    t0 = time.monotonic()
    with pytest.raises(RegistryError) as ei:
        open_remote_blob(url, device(url, l01).lowers[0], _svc(tmp_path))
    assert time.monotonic() - t0 < DEADLINE + SLACK
    assert ei.value.errno == errno.EIO and "gave up" in str(ei.value) and "deadline 3s" in str(ei.value)


def test_image_read_with_registry_stopped_fails_within_deadline_then_recovers(tmp_path, registry, l01, caplog):
    """Device level: through the image stack (tar -> ZFile -> LSMT over the cached remote blob), a read that
    needs the stopped registry fails with EIO within the deadline, logs one ERROR line, and the same open
    image reads correctly once the registry is back."""
    svc = _svc(tmp_path, refill=4096)
    with open_image(device(f"http://{registry.host}/v2/vec/l01/blobs", l01), svc) as img:
        first = img.pread(4096, 0)
        registry.stop()
        caplog.set_level(logging.INFO)
        t0 = time.monotonic()
        with pytest.raises(OSError) as ei:
            img.pread(4096, 8 << 20)  # not read before, and mapped to data: needs the registry
        assert time.monotonic() - t0 < DEADLINE + SLACK
        assert ei.value.errno == errno.EIO
        errs = _errors(caplog)
        assert len(errs) == 1 and "failed" in errs[0].getMessage() and "Could not connect" in errs[0].getMessage()
        registry.start()
        assert img.pread(4096, 0) == first
        assert logical_sha256(img) == L01_SHA
