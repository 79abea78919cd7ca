"""Block cache integrity against a real docker-registry: random reads, refill and readahead sizes and restarts
(hypothesis), a process killed mid-fill, a cache disk that fills up, and a blob served with a flipped byte.

After each of them the cache files are audited page by page: a page with a record must hold exactly the
blob's bytes (a wrong page with a matching record would be served) and match its checksum (a torn one
would be dropped on read, but the write order promises there are none).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from array import array
from pathlib import Path

import pytest
from crc32c import crc32c
from helpers.registry import build_layout, device, make_service, mounted_tmpfs
from hypothesis import given, settings
from hypothesis import strategies as st
from overlaybd.registry import cache as cache_mod
from overlaybd.registry import cached_blob, open_remote_blob
from overlaybd.registry.cache import COMPLETE, COMPLETE_OFFSET, HEADER_SIZE, MARK, PAGE
from overlaybd.registry.metrics import METRICS

pytestmark = pytest.mark.registry
REPO = Path(__file__).resolve().parents[2]


def audit_cache(cache_dir: Path, digest: str, blob: bytes) -> dict[str, int]:
    """Count recorded pages, those whose bytes differ from the blob, and those failing their own checksum."""
    out = {"present": 0, "wrong": 0, "torn": 0, "complete": 0}
    meta = cache_dir / (digest + ".meta")
    if not meta.exists():
        return out
    raw = meta.read_bytes()
    data = (cache_dir / digest).read_bytes()
    recs = array("I")
    recs.frombytes(raw[HEADER_SIZE : HEADER_SIZE + (len(raw) - HEADER_SIZE) // 8 * 8])
    for i in range(min(len(recs) // 2, (len(blob) + PAGE - 1) // PAGE)):
        if recs[2 * i + 1] != MARK:
            continue
        out["present"] += 1
        page = data[i * PAGE : min((i + 1) * PAGE, len(blob))]
        if crc32c(page) != recs[2 * i]:
            out["torn"] += 1
        elif page != blob[i * PAGE : (i + 1) * PAGE]:
            out["wrong"] += 1
    out["complete"] = int(int.from_bytes(raw[COMPLETE_OFFSET : COMPLETE_OFFSET + 4], "little") == COMPLETE)
    return out


def push_blob(tmp_path: Path, registry, data: bytes, repo: str) -> tuple[str, dict]:
    blob = tmp_path / f"{repo.replace('/', '_')}.bin"
    blob.write_bytes(data)
    (layer,) = build_layout(tmp_path / f"oci-{repo.replace('/', '_')}", "t", [blob])
    registry.push(tmp_path / f"oci-{repo.replace('/', '_')}", "t", repo)
    return f"http://{registry.host}/v2/{repo}/blobs", layer


def restart_cache(cache_dir: Path) -> None:
    """What a daemon restart does to the process-wide cache object: a new one on the same directory."""
    cache_mod._caches.pop(str(cache_dir), None)


@pytest.mark.slow
def test_random_reads_restarts_and_sizes_serve_exact_bytes(tmp_path, registry, monkeypatch):
    size = (3 << 20) + 777  # the last page is short
    blob = os.urandom(size)
    url, layer = push_blob(tmp_path, registry, blob, "prop/blob")
    lower = device(url, [layer]).lowers[0]
    refills = st.sampled_from([4096, 8192, 65536, 262144])
    windows = st.sampled_from([(1 << 20, 256 << 10), (2 << 20, 1 << 20), (32 << 20, 16 << 20), (8 << 20, 0)])
    op = st.one_of(
        st.tuples(st.just("read"), st.integers(0, size - 1), st.integers(1, 300_000)),
        st.tuples(st.just("seq"), st.integers(1, 70_000), st.integers(2, 40)),
        st.tuples(st.just("restart"), refills, windows),
    )
    examples = iter(range(10**6))

    @settings(max_examples=12, deadline=None, database=None)
    @given(first=refills, ops=st.lists(op, min_size=1, max_size=12))
    def run(first: int, ops: list) -> None:
        root = tmp_path / f"ex{next(examples)}"
        root.mkdir()
        cache_dir = root / "cache"
        f = open_remote_blob(url, lower, make_service(root, refill=first))
        pos = 0
        try:
            for o in ops:
                if o[0] == "read":
                    _, off, n = o
                    assert f.pread(n, off) == blob[off : off + n]
                    pos = min(size, off + n)
                elif o[0] == "seq":
                    _, n, k = o
                    for _ in range(k):
                        assert f.pread(n, pos) == blob[pos : pos + n]
                        pos = min(size, pos + n)
                else:
                    _, refill, (ra_max, piece) = o
                    f.close()
                    monkeypatch.setattr(cached_blob, "READAHEAD_MAX", ra_max)
                    monkeypatch.setattr(cached_blob, "READAHEAD_PIECE", piece)
                    restart_cache(cache_dir)
                    f = open_remote_blob(url, lower, make_service(root, refill=refill))
        finally:
            f.close()
            restart_cache(cache_dir)
        a = audit_cache(cache_dir, layer["digest"], blob)
        assert a["wrong"] == 0 and a["torn"] == 0, a
        if a["present"] == (size + PAGE - 1) // PAGE:
            assert a["complete"]
        # everything recorded is served after a restart without the registry's help for those pages
        g = open_remote_blob(url, lower, make_service(root, refill=first))
        try:
            assert g.pread(size, 0) == blob
        finally:
            g.close()
            restart_cache(cache_dir)
        assert audit_cache(cache_dir, layer["digest"], blob)["complete"]

    run()


KILL_SCRIPT = r"""
import json, sys
from pathlib import Path
a = json.load(open(sys.argv[1]))
sys.path.insert(0, a["tests"])
from overlaybd.registry import open_remote_blob
from helpers.registry import device, make_service
svc = make_service(Path(a["root"]), refill=65536)
f = open_remote_blob(a["url"], device(a["url"], [a["layer"]]).lowers[0], svc)
off, step = a["start"], a["step"]
while off < a["size"]:
    f.pread(step, off)
    off += step
    print(off, flush=True)
print("done", flush=True)
"""


@pytest.mark.slow
def test_process_killed_mid_fill_leaves_only_correct_pages(tmp_path, registry):
    size = 24 << 20
    blob = os.urandom(size)
    url, layer = push_blob(tmp_path, registry, blob, "kill/blob")
    cache_dir = tmp_path / "cache"
    script = tmp_path / "reader.py"
    script.write_text(KILL_SCRIPT)
    kills = 0
    for i, (start, stop_after) in enumerate([(0, 2 << 20), (5 << 20, 9 << 20), (1 << 20, 20 << 20)]):
        args = tmp_path / f"args{i}.json"
        args.write_text(
            json.dumps(
                {
                    "tests": str(REPO / "tests"),
                    "root": str(tmp_path),
                    "layer": layer,
                    "url": url,
                    "start": start,
                    "step": 61_440 + 4096 * i + 1000,  # odd steps: readahead grows by unaligned byte counts
                    "size": size,
                }
            )
        )
        p = subprocess.Popen([sys.executable, str(script), str(args)], stdout=subprocess.PIPE, text=True)
        try:
            for line in p.stdout:
                if line.strip() == "done" or int(line) >= stop_after:
                    break
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)  # mid-fill: readahead and the cache writer are busy
                kills += 1
        finally:
            p.wait(30)
        a = audit_cache(cache_dir, layer["digest"], blob)
        assert a["present"] > 0 and a["wrong"] == 0 and a["torn"] == 0, a
    assert kills >= 2
    svc = make_service(tmp_path, refill=65536)
    restart_cache(cache_dir)
    f = open_remote_blob(url, device(url, [layer]).lowers[0], svc)
    try:
        assert hashlib.sha256(f.pread(size, 0)).hexdigest() == layer["digest"].split(":")[1]
    finally:
        f.close()
        restart_cache(cache_dir)
    assert audit_cache(cache_dir, layer["digest"], blob)["complete"]


@pytest.fixture
def small_tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "512k") as mnt:
        yield mnt


def test_cache_disk_full_reads_through_with_one_warning(tmp_path, registry, small_tmpfs, caplog):
    size = (3 << 20) + 100
    blob = os.urandom(size)
    url, layer = push_blob(tmp_path, registry, blob, "full/blob")
    cache_dir = small_tmpfs / "cache"
    svc = make_service(
        tmp_path,
        extra={"cacheConfig": {"cacheType": "file", "cacheDir": str(cache_dir), "refillSize": 65536}},
    )
    caplog.set_level(logging.WARNING, logger="overlaybd.registry")
    full_before = METRICS.errors.get("cache_full", 0)
    f = open_remote_blob(url, device(url, [layer]).lowers[0], svc)
    try:
        for _ in range(2):
            assert f.pread(size, 0) == blob
            for off in range(0, size, 200_001):
                assert f.pread(70_000, off) == blob[off : off + 70_000]
    finally:
        f.close()
        restart_cache(cache_dir)
    assert METRICS.errors.get("cache_full", 0) > full_before
    full = [r for r in caplog.records if "is full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    a = audit_cache(cache_dir, layer["digest"], blob)
    assert a["wrong"] == 0 and a["torn"] == 0, a


def _lsmt_layer(tmp_path: Path) -> Path:
    """An uncompressed committed LSMT layer (no ZFile CRC above it) with 6 MiB of random data."""
    from overlaybd.format import lsmt

    rw = lsmt.create_rw(tmp_path / "l.data", tmp_path / "l.index", 16 << 20)
    for i in range(6):
        rw.pwrite(os.urandom(1 << 20), (i * 2) << 20)
    rw.close()
    out = tmp_path / "layer.commit"
    subprocess.run(
        [str(REPO / ".venv/bin/overlaybd-commit"), str(tmp_path / "l.data"), str(tmp_path / "l.index"), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def _dump_sha256(config: Path, service: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / ".venv/bin/overlaybd-dump"), "--sha256", "--service_config_path", str(service), str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_uncompressed_layer_with_a_flipped_byte_never_reads_back_successfully(tmp_path, registry):
    layer_file = _lsmt_layer(tmp_path)
    local_cfg = tmp_path / "local.json"
    local_cfg.write_text(json.dumps({"lowers": [{"file": str(layer_file)}]}))
    svc_path = tmp_path / "overlaybd.json"
    svc_path.write_text(
        json.dumps(
            {
                "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp_path / "cache"), "cacheSizeGB": 1},
                "credentialConfig": {"mode": "file", "path": str(tmp_path / "none.json")},
                "download": {"enable": False},
            }
        )
    )
    want = _dump_sha256(local_cfg, svc_path)
    assert want.returncode == 0, want.stderr
    (layer,) = build_layout(tmp_path / "oci", "u", [layer_file])
    registry.push(tmp_path / "oci", "u", "flip/u")
    remote_cfg = tmp_path / "remote.json"
    remote_cfg.write_text(
        json.dumps(
            {
                "repoBlobUrl": f"http://{registry.host}/v2/flip/u/blobs",
                "lowers": [{"digest": layer["digest"], "size": layer["size"]}],
            }
        )
    )
    good = _dump_sha256(remote_cfg, svc_path)
    assert good.returncode == 0 and good.stdout == want.stdout, good.stderr
    subprocess.run(
        [str(REPO / ".venv/bin/overlaybd-cache"), "--service_config_path", str(svc_path), "clear"], check=True
    )
    stored = registry.blob_path(layer["digest"])
    raw = bytearray(stored.read_bytes())
    raw[(3 << 20) + 12345] ^= 0x01  # in the data area: no checksum of the format covers it
    stored.write_bytes(bytes(raw))
    for _ in range(2):  # also with the (emptied) cache of the first attempt
        bad = _dump_sha256(remote_cfg, svc_path)
        assert bad.returncode != 0, (bad.stdout, bad.stderr)
        assert bad.stdout.strip() != want.stdout.strip()
        assert "hashes to sha256:" + hashlib.sha256(raw).hexdigest() in bad.stderr
    a = audit_cache(tmp_path / "cache", layer["digest"], bytes(raw))
    assert a["present"] == 0 and not a["complete"]


def test_second_open_after_restart_fetches_nothing_already_read(tmp_path, registry, fault_proxy):
    """The issue's "second cold run refetched 183 of 218 MB": odd-sized sequential and random reads, a
    restart, the same reads again: no byte comes from the registry the second time."""
    size = (6 << 20) + 3000
    blob = os.urandom(size)
    _, layer = push_blob(tmp_path, registry, blob, "again/blob")
    url = f"http://{fault_proxy.host}/v2/again/blob/blobs"
    reads = [(o, 50_001) for o in range(0, 3 << 20, 50_001)] + [(5_000_000 + 77 * i, 9_999) for i in range(30)]
    for run in range(2):
        before = fault_proxy.bytes_relayed
        t0 = time.monotonic()
        f = open_remote_blob(url, device(url, [layer]).lowers[0], make_service(tmp_path))
        try:
            for off, n in reads:
                assert f.pread(n, off) == blob[off : off + n]
        finally:
            f.close()
            restart_cache(tmp_path / "cache")
        fetched = fault_proxy.bytes_relayed - before
        assert time.monotonic() - t0 < 60
        if run == 0:
            assert fetched > 0
        else:
            assert fetched == 0
    assert audit_cache(tmp_path / "cache", layer["digest"], blob)["wrong"] == 0
