"""A range-caching site mirror: nginx with the slice module in front of the origin registry.

Many nodes pulling the same image lazily should cost the origin each byte once. docker-registry as a
pull-through cache cannot do that (test_mirror.py: a cold blob is fetched whole, twice); nginx caching the
origin's blobs in fixed slices with `proxy_cache_lock` can: every origin request is one slice-aligned Range,
each slice is fetched once, and concurrent requests for a slice wait for that one fetch.

The setup is test_mirror.py's (mirror_env.py): an origin docker-registry with two 6 MiB blobs, an
access-logging proxy in front of it (its log is what the origin served), the mirror pointing at the proxy,
and a containerd hosts directory naming the mirror; each node is its own process with its own block cache,
reading random ranges lazily. Then: the mirror stopped (reads fall back to the origin), and a mirror that
serves wrong bytes for a blob.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.nginx_mirror import NginxSliceMirror, need_nginx
from helpers.registry import LoopbackHTTP, need_tools

from .mirror_env import (
    REPO,
    AccessLogProxy,
    expected_reads,
    finish_node,
    mirror_site,
    node_service,
    start_node,
    write_hosts_dir,
)

MiB = 1 << 20
# 256 KiB slices (the helper's default is 1 MiB): 24 random 64 KiB reads of a 6 MiB blob then touch some of
# its 24 slices, not all, so the origin's log shows the laziness too
SLICE = 256 << 10
READS, LEN, SEED = 24, 64 << 10, 13
NODE_DEADLINE = 10


@pytest.fixture
def site(tmp_path: Path):
    """origin registry with two 6 MiB blobs, the access-log proxy, the nginx slice mirror, a hosts dir."""
    need_tools()
    need_nginx()
    slices = f"{SLICE >> 10}k"
    with mirror_site(tmp_path, lambda origin: NginxSliceMirror(tmp_path / "mirror", origin, slice_size=slices), 6) as s:
        yield s


def _start(site: dict, name: str, hosts: Path | None = None, deadline: int = NODE_DEADLINE):
    svc = node_service(site["tmp"] / name, hosts or site["hosts"], deadline=deadline)
    return start_node(svc, site["repo_url"], site["layers"], READS, LEN, SEED)


def _digest(path: str) -> str:
    return path.rsplit("/", 1)[1].split("?")[0]


def _check_slices(site: dict) -> dict[str, set[int]]:
    """The origin's blob log is slice-aligned Range GETs only, no slice twice, no byte twice; returns the
    slices fetched per blob (their start offsets)."""
    proxy: AccessLogProxy = site["proxy"]
    sizes = {x["digest"]: x["size"] for x in site["layers"]}
    fetched: dict[str, list[int]] = {}
    for a in proxy.log:
        if "/blobs/sha256:" not in a.path:
            continue
        d = _digest(a.path)
        assert a.method == "GET" and a.status == 206, a
        s, e = (int(x) for x in a.range.removeprefix("bytes=").split("-"))
        assert s % SLICE == 0 and e == s + SLICE - 1, a  # nginx asks the slice, even past the end
        assert a.start == s and a.sent == min(SLICE, sizes[d] - s), a  # and got it, whole
        fetched.setdefault(d, []).append(s)
    for d, starts in fetched.items():
        assert len(starts) == len(set(starts)), (d, sorted(starts))  # each slice once
    assert all(v == 0 for v in proxy.overlap().values()), proxy.overlap()
    return {d: set(v) for d, v in fetched.items()}


def _slices_read(site: dict) -> dict[str, set[int]]:
    """The slices the nodes' reads (and each open's 1-byte probe at 0) touch, per blob."""
    out = {}
    for desc in site["layers"]:
        rng = random.Random(SEED)
        touched = {0}
        for _ in range(READS):
            off = rng.randrange(0, max(1, desc["size"] - LEN))
            touched.update(range(off // SLICE * SLICE, off + LEN, SLICE))
        out[desc["digest"]] = touched
    return out


@pytest.mark.registry
def test_three_nodes_on_a_cold_slice_mirror_fetch_each_slice_once(site: dict) -> None:
    """Three nodes start together on a cold mirror: all read the right bytes; the origin serves each slice
    they touch exactly once (slice-aligned ranges, no byte twice), nothing else; a fourth node later costs
    the origin nothing."""
    want = expected_reads(site["pairs"], READS, LEN, SEED)
    proxy: AccessLogProxy = site["proxy"]
    t0 = time.monotonic()
    procs = [_start(site, f"node{i}") for i in (1, 2, 3)]
    for p in procs:
        assert finish_node(p, timeout=60) == want
    took = time.monotonic() - t0
    fetched = _check_slices(site)
    touched = _slices_read(site)
    sizes = {x["digest"]: x["size"] for x in site["layers"]}
    total = proxy.blob_bytes()
    # every slice a read touches was fetched (once); not every slice of the blobs (lazy)
    for d in sizes:
        assert touched[d] <= fetched.get(d, set()), (d, sorted(touched[d] - fetched.get(d, set())))
    nslices = sum(len(v) for v in fetched.values())
    assert nslices < sum(-(-s // SLICE) for s in sizes.values()), fetched
    assert total <= nslices * SLICE
    assert total == sum(min(SLICE, sizes[d] - s) for d, v in fetched.items() for s in v)
    print(
        f"3 nodes together: {took:.1f}s; origin blob bytes {total} in {nslices} slices "
        f"(of {sum(-(-s // SLICE) for s in sizes.values())}); slices per blob "
        f"{ {d[7:19]: sorted(s // SLICE for s in v) for d, v in fetched.items()} }; overlap {proxy.overlap()}"
    )
    assert took < 60, took

    before = proxy.blob_bytes()
    t0 = time.monotonic()
    assert finish_node(_start(site, "node4"), timeout=60) == want
    print(f"node 4 later: {time.monotonic() - t0:.1f}s, origin blob bytes {proxy.blob_bytes() - before}")
    assert proxy.blob_bytes() == before, "node 4 must be served by the mirror's cache alone"

    # the nodes sent containerd's `?ns=<registry>` to the mirror; the cache key ignores the query: another
    # namespace (and a range across two slices) is served from the same cached slices
    assert "?ns=" in (site["mirror"].workdir / "access.log").read_text()
    desc, data = site["pairs"][0]
    s0 = min(x for x in fetched[desc["digest"]] if x + SLICE in fetched[desc["digest"]])
    a, b = s0 + SLICE - 100, s0 + SLICE + 99  # the end of one cached slice and the start of the next
    req = urllib.request.Request(
        f"http://{site['mirror'].host}/v2/library/app/blobs/{desc['digest']}?ns=elsewhere.example",
        headers={"Range": f"bytes={a}-{b}"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 206 and r.read() == data[a : b + 1]
    assert proxy.blob_bytes() == before


@pytest.mark.registry
def test_slice_mirror_stopped_reads_fall_back_to_origin(site: dict) -> None:
    """nginx down (connection refused): the right bytes from the origin within a bounded time; back up (its
    cache kept), a fresh node goes through it again."""
    site["mirror"].stop()
    want = expected_reads(site["pairs"], READS, LEN, SEED)
    proxy: AccessLogProxy = site["proxy"]
    t0 = time.monotonic()
    assert finish_node(_start(site, "n-down", deadline=3), timeout=60) == want
    took = time.monotonic() - t0
    print(f"mirror down: {took:.1f}s, origin blob bytes {proxy.blob_bytes()}")
    assert took < 30, took
    # the node's own ranges, straight from the origin
    assert any("/blobs/sha256:" in a.path and a.range and a.sent for a in proxy.log)
    site["mirror"].start()
    proxy.reset()
    assert finish_node(_start(site, "n-back"), timeout=60) == want
    _check_slices(site)  # through the mirror again: slice fetches only
    assert proxy.blob_bytes() > 0


# ---------------------------------------------------------------------------------------------- lying mirror


class LyingOrigin(LoopbackHTTP):
    """A registry that serves `blobs[digest]` (Range honoured) under any repository: wrong bytes, right
    headers (Docker-Content-Digest, ETag, sizes), as a broken or compromised upstream of the mirror would."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        me = self
        self.blobs = blobs

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                d = _digest(self.path)
                data = me.blobs.get(d)
                if "/blobs/" not in self.path or data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                s, e, status = 0, len(data) - 1, 200
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    s, e, status = int(a), min(int(b or len(data) - 1), len(data) - 1), 206
                self.send_response(status)
                self.send_header("Content-Length", str(e - s + 1))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {s}-{e}/{len(data)}")
                self.send_header("Docker-Content-Digest", d)
                self.send_header("Etag", f'"{d}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data[s : e + 1])

            do_HEAD = do_GET

            def log_message(self, *a: object) -> None:
                pass

        self._serve(Handler)


READ_SCRIPT = r"""
import errno, hashlib, json, sys
from overlaybd.config.service import load_service_config
from overlaybd.config.image_config import device_config_from_dict
from overlaybd.registry import open_remote_blob
svc = load_service_config(sys.argv[1])
job = json.loads(sys.argv[2])
lower = device_config_from_dict({"lowers": [{"digest": job["digest"], "size": job["size"]}]}).lowers[0]
out = []
for _ in range(job["passes"]):  # each pass opens the blob again (as a layer reopened), same process and cache
    try:
        f = open_remote_blob(job["repo_url"], lower, svc)
    except OSError as e:
        print(json.dumps({"open": f"{e.errno} {e}"}))
        sys.exit(0)
    for off, n in job["reads"]:
        try:
            out.append(hashlib.sha256(f.pread(n, off)).hexdigest())
        except OSError as e:
            out.append(f"errno {e.errno}: {e}")
    f.close()
print(json.dumps({"reads": out}))
"""


def _read_node(
    site: dict, name: str, hosts: Path, desc: dict, reads: list[tuple[int, int]], passes: int = 1
) -> list[str]:
    """A node reading `reads` ((offset, length), in order) of one blob, `passes` times (opening it again
    each time): per read the sha256 of the bytes it returned, or "errno N: ..." when it failed."""
    job = {"repo_url": site["repo_url"], "digest": desc["digest"], "size": desc["size"], "reads": reads}
    job["passes"] = passes
    svc = node_service(site["tmp"] / name, hosts, deadline=3)
    p = subprocess.run(
        [sys.executable, "-c", READ_SCRIPT, str(svc), json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO / "python")),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    assert "open" not in doc, doc
    return doc["reads"]


@pytest.fixture
def lying(site: dict):
    """A second nginx slice mirror whose upstream serves blob 0 with every byte inverted (same size and
    headers), and a hosts dir sending the nodes to it first (the origin still behind the logging proxy)."""
    desc, data = site["pairs"][0]
    bad = bytes(b ^ 0xFF for b in data)
    upstream = LyingOrigin({desc["digest"]: bad})
    mirror = NginxSliceMirror(site["tmp"] / "lying-mirror", upstream.host, slice_size=f"{SLICE >> 10}k")
    hosts = write_hosts_dir(site["tmp"] / "lying.d", site["proxy"].host, mirror.host)
    yield {"desc": desc, "good": data, "bad": bad, "hosts": hosts, "mirror": mirror}
    mirror.close()
    upstream.close()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.mark.registry
def test_lying_slice_mirror_is_dropped_for_the_blob_and_the_origin_serves_it(site: dict, lying: dict) -> None:
    """A mirror serving wrong bytes for a blob: the node's read that completes the blob gets EIO (the block
    cache's whole-blob sha256 check), never a complete read of wrong bytes; the mirror is then not used for
    that blob again by this process, so the blob opened again is fetched from the origin and reads right."""
    desc, good = lying["desc"], lying["good"]
    reads = [(0, desc["size"])]
    t0 = time.monotonic()
    got = _read_node(site, "n-lie-whole", lying["hosts"], desc, reads, passes=2)
    took = time.monotonic() - t0
    print(f"whole read through a lying mirror, twice: {got} in {took:.1f}s")
    first, second = got
    assert first.startswith("errno 5:") and "hashes to sha256:" in first and "not used for this blob again" in first
    assert second == _sha(good), got
    assert took < 30, took
    assert any(_digest(a.path) == desc["digest"] for a in site["proxy"].log)  # the origin served the second pass


@pytest.mark.registry
@pytest.mark.xfail(
    strict=True,
    reason="documented limit of uncompressed layers (docs/registry.md, what lazy reads can and cannot "
    "guarantee): they carry no checksum per range, and the whole-blob sha256 runs once every page is present, "
    "so before that a lying source's bytes reach the reader; ZFile layers catch them by their block CRCs",
)
def test_lying_slice_mirror_partial_reads_are_not_trusted(site: dict, lying: dict) -> None:
    """Random partial reads through a mirror that lies about blob 0: each read must be the right bytes or
    fail, never the mirror's wrong bytes."""
    desc, good, bad = lying["desc"], lying["good"], lying["bad"]
    rng = random.Random(SEED)
    reads = [(o, LEN) for o in (rng.randrange(0, desc["size"] - LEN) for _ in range(8))]
    got = _read_node(site, "n-lie-part", lying["hosts"], desc, reads)
    wrong = [i for i, (o, n) in enumerate(reads) if got[i] == _sha(bad[o : o + n])]
    print(f"partial reads through a lying mirror: {len(wrong)} of {len(reads)} returned its wrong bytes")
    assert all(got[i] == _sha(good[o : o + n]) or got[i].startswith("errno 5:") for i, (o, n) in enumerate(reads))
