"""Strict HTTP against a misbehaving server (hostile.py): range answers, sizes, protocols, credentials.

Each case asserts the exact outcome: the right bytes, or an error naming registry, digest, range and
what came back; bounded time; nothing wrong left in the cache; and reads that work again once the
server behaves.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.registry import build_layout, device, make_service
from helpers.vectors import L01_SHA, logical_sha256
from overlaybd.image.image import open_image
from overlaybd.registry import RegistryClient, RegistryError, client_for, open_remote_blob, parse_reference
from overlaybd.registry.client import MAX_BLOB_SIZE
from overlaybd.registry.image_ref import parse_blob_url, redact_url

from .hostile import HostileServer, Listener

pytestmark = pytest.mark.registry

BLOB = os.urandom(300_000)  # not page-aligned at the end on purpose
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
def hostile():
    s = HostileServer([BLOB])
    yield s
    s.close()


def _lower(url: str, size: int = len(BLOB)):
    return device(url, [{"digest": DIGEST, "size": size}]).lowers[0]


def _svc(tmp_path: Path, deadline: float = 3.0, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    svc = make_service(tmp_path, refill=65536, **kw)
    client_for(svc).deadline = deadline
    return svc


def assert_cache_clean(tmp_path: Path, digest: str = DIGEST, data: bytes = BLOB) -> None:
    """Every page of the cache data file is either a hole (zeros) or exactly the blob's bytes."""
    p = tmp_path / "cache" / digest
    if not p.exists():
        return
    raw = p.read_bytes()
    for off in range(0, len(raw), 4096):
        page = raw[off : off + 4096]
        assert not any(page) or page == data[off : off + len(page)], f"wrong bytes cached at {off}"


def _open_ok(hostile: HostileServer, svc):
    hostile.mode = "ok"
    return open_remote_blob(hostile.url(), _lower(hostile.url()), svc)


def test_200_for_a_mid_blob_range_is_an_error_and_never_cached(tmp_path, hostile):
    svc = _svc(tmp_path)
    f = _open_ok(hostile, svc)
    try:
        hostile.mode = "ignore_range"
        t0 = time.monotonic()
        with pytest.raises(RegistryError) as ei:
            f.pread(4096, 70_000)
        assert time.monotonic() - t0 < 2.0  # a retry cannot fix it: fails at once
        msg = str(ei.value)
        assert hostile.host in msg and DIGEST in msg and "range bytes=65536-131071" in msg
        assert "HTTP 200" in msg and "Range was ignored" in msg and ei.value.errno == errno.EIO
        assert_cache_clean(tmp_path)
        hostile.mode = "ok"  # the server behaves again: the same open file reads right bytes
        assert f.pread(4096, 70_000) == BLOB[70_000:74_096]
    finally:
        f.close()
    assert_cache_clean(tmp_path)


def test_200_for_the_open_probe_is_an_error(tmp_path, hostile):
    hostile.mode = "ignore_range"
    with pytest.raises(RegistryError, match=r"range bytes=0-0: 200 .*Range was ignored"):
        open_remote_blob(hostile.url(), _lower(hostile.url()), _svc(tmp_path))


def test_200_accepted_for_the_whole_blob_with_the_expected_length(tmp_path, hostile):
    hostile.mode = "ignore_range"
    client = RegistryClient(_svc(tmp_path))
    loc = parse_blob_url(hostile.url(), DIGEST)
    buf = bytearray(len(BLOB))
    assert client.read_range(loc, 0, memoryview(buf), len(BLOB)) == len(BLOB)
    assert bytes(buf) == BLOB
    with pytest.raises(RegistryError, match="Content-Length 300000 != blob size 300001"):
        client.read_range(loc, 0, memoryview(bytearray(len(BLOB) + 1)), len(BLOB) + 1)


def test_wrong_content_range_is_an_error(tmp_path, hostile):
    svc = _svc(tmp_path)
    f = _open_ok(hostile, svc)
    try:
        hostile.mode = "shift_range"
        with pytest.raises(RegistryError) as ei:
            f.pread(100, 0)
        msg = str(ei.value)
        assert "range bytes=0-65535" in msg and "answered with Content-Range 'bytes 4096-69631/300000'" in msg
        assert DIGEST in msg and hostile.host in msg
        assert_cache_clean(tmp_path)
        hostile.mode = "ok"
        assert f.pread(100, 0) == BLOB[:100]
    finally:
        f.close()


def test_total_disagreeing_with_config_size_names_both(tmp_path, hostile):
    hostile.mode, hostile.total = "total", 1 << 42
    with pytest.raises(RegistryError) as ei:
        open_remote_blob(hostile.url(), _lower(hostile.url()), _svc(tmp_path))
    assert "Content-Range total 4398046511104 != blob size 300000 (lowers[].size)" in str(ei.value)
    # and on reads after a good open
    svc = _svc(tmp_path / "b")
    f = _open_ok(hostile, svc)
    try:
        hostile.mode, hostile.total = "total", 300_001
        with pytest.raises(RegistryError, match=r"range bytes=131072-196607: Content-Range total 300001 != blob"):
            f.pread(10, 140_000)
        assert_cache_clean(tmp_path / "b")
    finally:
        f.close()


def test_config_size_beyond_limit_refused_before_any_request(tmp_path, hostile):
    with pytest.raises(RegistryError, match=f"exceeds the limit of {MAX_BLOB_SIZE} bytes") as ei:
        open_remote_blob(hostile.url(), _lower(hostile.url(), 10**15), _svc(tmp_path))
    assert ei.value.errno == errno.EFBIG and hostile.requests == []


_ABSURD_CHILD = r"""
import json, sys, urllib.request
from overlaybd.config.service import service_config_from_dict
from overlaybd.registry import RegistryError, client_for, open_remote_blob
from overlaybd.registry.image_ref import parse_blob_url
args = json.loads(sys.argv[1])
svc = service_config_from_dict(args["service"], args["path"])
client_for(svc).deadline = 3.0


def hwm():
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM:")).split()[1])


out = []
before = hwm()  # the interpreter with overlaybd imported: what the opens below add is measured from here
for total in args["totals"]:
    urllib.request.urlopen(args["control"] + "?total=" + str(total)).read()
    lower = type("L", (), {"digest": args["digest"], "size": 0, "dir": ""})()
    try:
        open_remote_blob(args["url"], lower, svc)
        out.append("opened")
    except RegistryError as e:
        out.append(str(e))
# VmHWM is this process's own peak; ru_maxrss would include the forking pytest's RSS (kept across exec)
out.append(hwm() - before)
print(json.dumps(out))
"""


def test_absurd_totals_refused_in_bounded_memory(tmp_path, hostile):
    """`bytes 0-0/2^42` once allocated 1.1 GB, `10^15` raised an empty MemoryError: now both are one clear
    error, and the process stays small: its peak RSS (VmHWM, in a child process, from after the imports)
    grows by what the opens need (~3 MiB: curl handles, cache files, allocator slack), not by a claimed size."""
    import http.server
    import threading

    class Control(http.server.BaseHTTPRequestHandler):  # lets the child set the claimed total
        def do_GET(self) -> None:
            hostile.mode, hostile.total = "total", int(self.path.split("total=")[1])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    ctl = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Control)
    threading.Thread(target=ctl.serve_forever, daemon=True).start()
    try:
        doc = {
            "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"), "cacheSizeGB": 1},
            "credentialConfig": {"mode": "file", "path": str(tmp_path / "none.json")},
        }
        args = {
            "service": doc,
            "path": str(tmp_path / "overlaybd.json"),
            "url": hostile.url(),
            "digest": DIGEST,
            "control": f"http://127.0.0.1:{ctl.server_address[1]}/",
            "totals": [1 << 42, 10**15, 10**40],
        }
        r = subprocess.run(
            [sys.executable, "-c", _ABSURD_CHILD, json.dumps(args)], capture_output=True, text=True, timeout=60
        )
    finally:
        ctl.shutdown()
        ctl.server_close()
    assert r.returncode == 0, r.stderr
    *errors, grown_kib = json.loads(r.stdout)
    assert f"Content-Range total 4398046511104 exceeds the limit of {MAX_BLOB_SIZE} bytes" in errors[0]
    assert f"Content-Range total 1000000000000000 exceeds the limit of {MAX_BLOB_SIZE} bytes" in errors[1]
    assert "malformed Content-Range" in errors[2]  # beyond u64: not even parsed into a number
    assert all(DIGEST in e and hostile.host in e and "range bytes=0-0" in e for e in errors)
    assert grown_kib < 32 * 1024  # 2^42 once sized a 1 GiB page bitmap (2^30 pages); this path needs ~3 MiB


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "dict://127.0.0.1:1/x"])
def test_redirect_to_other_protocols_refused(tmp_path, hostile, target):
    hostile.mode, hostile.location = "redirect", target
    t0 = time.monotonic()
    with pytest.raises(RegistryError) as ei:
        open_remote_blob(hostile.url(), _lower(hostile.url()), _svc(tmp_path, deadline=20.0))
    assert time.monotonic() - t0 < 2.0
    assert f"redirect to {target!r} refused: only http and https are followed" in str(ei.value)
    # manifests follow the same rule (a file:// redirect once returned a local file as the manifest)
    with pytest.raises(RegistryError, match="refused: only http and https"):
        RegistryClient(_svc(tmp_path)).get_manifest(parse_reference(f"{hostile.host}/bad/app:v1"), scheme="http")


def test_redirect_to_gopher_never_connects(tmp_path, hostile):
    listener = Listener()
    try:
        hostile.mode = "redirect"
        hostile.location = f"gopher://127.0.0.1:{listener.port}/_SET%20pwned%201%0D%0A"
        with pytest.raises(RegistryError, match="gopher://127.0.0.1.*refused: only http and https"):
            open_remote_blob(hostile.url(), _lower(hostile.url()), _svc(tmp_path))
        time.sleep(0.3)
    finally:
        listener.close()
    assert listener.connections == []


def test_basic_credentials_never_sent_to_an_http_realm_on_another_host(tmp_path, hostile):
    listener = Listener()
    try:
        hostile.mode = "realm"
        hostile.realm = f"http://localhost:{listener.port}/token"  # another host name, plain http
        cred = {"auths": {hostile.host: {"username": "alice", "password": "s3cret"}}}
        with pytest.raises(RegistryError) as ei:
            open_remote_blob(hostile.url(), _lower(hostile.url()), _svc(tmp_path, cred=cred))
        msg = str(ei.value)
        assert ei.value.errno == errno.EPERM
        assert f"refusing to send the credentials of {hostile.host} to token realm {hostile.realm}" in msg
        assert "localhost is not configured as a plain-http registry" in msg
        time.sleep(0.3)
        assert listener.connections == []
        # once that host IS configured as a plain-http registry, the realm gets them (and answers nothing)
        client = RegistryClient(_svc(tmp_path / "b", cred=cred), plain_http_hosts=["localhost"])
        client.deadline = 2.0
        with pytest.raises(RegistryError):
            client.blob_size(parse_blob_url(hostile.url(), DIGEST), len(BLOB))
        time.sleep(0.3)
    finally:
        listener.close()
    assert listener.connections and b"Authorization: Basic " in listener.connections[0]


def test_url_userinfo_is_used_but_never_logged_or_audited(tmp_path, basic_registry, vector_layers, caplog):
    layers = build_layout(tmp_path / "oci", "v1", vector_layers)
    basic_registry.push(tmp_path / "oci", "v1", "team/app", creds="alice:s3cret")
    url = f"http://alice:s3cret@{basic_registry.host}/v2/team/app/blobs"
    svc = make_service(tmp_path, refill=4096, audit=True)  # cred.json is empty: only the URL has them
    caplog.set_level(logging.DEBUG)
    with open_image(device(url, layers), svc) as img:
        assert logical_sha256(img) == L01_SHA
        basic_registry.stop()
        (tmp_path / "cold").mkdir()
        cold = make_service(tmp_path / "cold", refill=4096, audit=True)
        client_for(cold).deadline = 1.0
        with pytest.raises(Exception, match="gave up") as ei:  # the opener's error wraps ours
            with open_image(device(url, layers), cold) as img2:
                img2.pread(4096, 0)
    audit = (tmp_path / "audit.log").read_text()
    assert "|download[pathname=http://***@" in audit
    for text in (audit, caplog.text, str(ei.value)):
        assert "s3cret" not in text
    assert redact_url(url) == f"http://***@{basic_registry.host}/v2/team/app/blobs"
