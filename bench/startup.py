"""Container start-up (HelloBench style): full `ctr pull` + overlayfs vs `rpull` + lazy overlaybd.

Builds a ~--size-mib image in several layers with a realistic mix of content, generated here (nothing
downloaded): busybox, a copy of the host's Python stdlib and of /usr/share (compressible text and
binaries) and deterministic pseudo-random files (incompressible). Pushes the plain OCI image and its
overlaybd conversion to a loopback docker-registry behind a byte-counting TCP proxy, then measures for
each path the wall time from "nothing local" to "ready" (the container's first command has run:
`sh -c 'cat /etc/os-release >/dev/null; echo ready'`) and the bytes the registry sent.

  cold: every run on a fresh containerd (empty content store), fresh snapshotter root and fresh
        overlaybd block cache, page cache dropped (`echo 3 > /proc/sys/vm/drop_caches`) just before.
  warm: one stack per path, primed by one untimed run; before each timed run the image is removed
        (`ctr image rm` + synchronous GC, so snapshots, devices and containerd content go), the overlaybd
        registry block cache is kept and the page cache is not dropped. `ctr pull` has no cache that
        survives removing the image, so its warm runs re-fetch everything (page cache warm only).

Prints median and p95 per path and ratio lines (overlaybd vs full pull, measured in this same run; no
fixed reference numbers). Root only; every server listens on 127.0.0.1; everything started is stopped
and every mount, loop device and temp dir released, also on failure or SIGTERM/SIGINT.

    .venv/bin/python bench/startup.py [--size-mib 500] [--runs 5] [--skip-warm]

`--scale-out` runs only the scale-out section instead (`scale_out()`; no root, no containerd): the origin
bytes per node for 1 and 3 nodes reading the same image lazily, directly and through a pull-through mirror.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers.containerd_stack import Registry, Stack, new_base, release_below  # noqa: E402
from helpers.oci_images import MT_CONFIG, MT_LAYER_GZ, MT_MANIFEST, busybox_layer  # noqa: E402

MiB = 1 << 20
OS_RELEASE = 'ID=obdbench\nNAME="overlaybd start-up bench"\n'
READY_CMD = ("/bin/sh", "-c", "cat /etc/os-release >/dev/null; echo ready")
CMD_TIMEOUT = 900  # s; bounds every pull/run so a wedged component cannot hang the bench


# -- byte counting -------------------------------------------------------------------------------
class CountingProxy:
    """127.0.0.1:<port> -> registry; counts bytes flowing registry -> client (what a pull fetched)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=30)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            threading.Thread(target=self._pipe, args=(c, u, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        try:
            while n := src.recv_into(buf):
                if count:
                    self._before_send(n)
                dst.sendall(view[:n])
                if count:
                    with self.lock:
                        self.sent += n
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _before_send(self, n: int) -> None:
        """Called before n bytes go registry -> client (bench/registry.py's LinkRelay paces here)."""

    def take(self) -> int:
        with self.lock:
            n, self.sent = self.sent, 0
        return n

    def close(self) -> None:
        self.sock.close()


# -- image ---------------------------------------------------------------------------------------
class _HashingWriter:
    """File-like sink that hashes what passes (the layer's diffID) on its way into gzip."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink, self.sha = sink, hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        return self.sink.write(b)

    def flush(self) -> None:
        self.sink.flush()


def _tar_info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime, ti.size = kind, mode, 0, size
    return ti


class LayerWriter:
    """Streams one gzip layer blob into an OCI layout (no whole layer in memory); knows its digests."""

    def __init__(self, blobs: Path) -> None:
        self.blobs = blobs
        self.tmp = blobs / f".layer-{os.getpid()}-{time.monotonic_ns()}"
        self.f = open(self.tmp, "wb")
        self.gz = gzip.GzipFile(fileobj=self.f, mode="wb", compresslevel=6, mtime=0)  # docker's default level
        self.raw = _HashingWriter(self.gz)
        self.tf = tarfile.open(fileobj=self.raw, mode="w|", format=tarfile.PAX_FORMAT)
        self.dirs: set[str] = set()
        self.payload = 0

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self.tf.addfile(_tar_info(d, tarfile.DIRTYPE, 0o755))

    def add_bytes(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self.tf.addfile(_tar_info(name, tarfile.REGTYPE, mode, len(data)), _BytesReader(data))
        self.payload += len(data)

    def add_host_file(self, name: str, path: str, size: int) -> None:
        self._parents(name)
        with open(path, "rb") as src:
            self.tf.addfile(_tar_info(name, tarfile.REGTYPE, 0o644, size), src)
        self.payload += size

    def add_tar(self, raw: bytes) -> None:
        """Copy the members of an in-memory tar (busybox_layer) into this layer."""
        import io

        with tarfile.open(fileobj=io.BytesIO(raw)) as src:
            for m in src.getmembers():
                if m.isdir():
                    self.dirs.add(m.name)
                self.tf.addfile(m, src.extractfile(m) if m.isreg() else None)
                self.payload += m.size

    def finish(self) -> dict:
        self.tf.close()
        self.gz.close()
        self.f.close()
        h = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            while b := f.read(4 * MiB):
                h.update(b)
        size = self.tmp.stat().st_size
        self.tmp.rename(self.blobs / h.hexdigest())
        return {
            "desc": {"mediaType": MT_LAYER_GZ, "digest": "sha256:" + h.hexdigest(), "size": size},
            "diff_id": "sha256:" + self.raw.sha.hexdigest(),
            "payload": self.payload,
        }


class _BytesReader:
    """Minimal read() over a bytes object for tarfile.addfile without copying it into a BytesIO."""

    def __init__(self, data: bytes) -> None:
        self.view, self.pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n < 0 else min(len(self.view), self.pos + n)
        out = bytes(self.view[self.pos : end])
        self.pos = end
        return out


def host_files(roots: list[str], budget: int) -> list[tuple[str, int]]:
    """Regular files below `roots` in sorted walk order until `budget` bytes: a deterministic host copy."""
    out: list[tuple[str, int]] = []
    total = 0
    for root in roots:
        for d, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(d, f)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or not os.access(p, os.R_OK):
                    continue
                out.append((p, st.st_size))
                total += st.st_size
                if total >= budget:
                    return out
    return out


def random_file_sizes(budget: int, rng: random.Random) -> list[int]:
    """A spread of file sizes (64 KiB .. 32 MiB) summing to `budget`: model weights, archives, media."""
    sizes, left = [], budget
    while left > 0:
        n = min(left, rng.choice((64 << 10, 256 << 10, 1 * MiB, 4 * MiB, 16 * MiB, 32 * MiB)))
        sizes.append(n)
        left -= n
    return sizes


def build_image(out: Path, name: str, size_mib: int) -> dict:
    """OCI layout of a ~size_mib image: 1 busybox + 2 host-copy (compressible) + 2 random (incompressible)."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    budget = size_mib * MiB
    rng = random.Random(0x0B0B)
    layers = []

    lw = LayerWriter(blobs)
    lw.add_tar(busybox_layer(OS_RELEASE))
    layers.append(lw.finish())

    # about half compressible: Python stdlib (text + .so), then /usr/share (docs, locales, data, icons)
    py = [f"/usr/lib/python3.{v}" for v in range(6, 20) if os.path.isdir(f"/usr/lib/python3.{v}")]
    short = 0  # what a smaller host tree could not fill moves on to the next layer
    for roots, share in ((py + ["/usr/lib/python3"], 0.2), (["/usr/share"], 0.3)):
        lw = LayerWriter(blobs)
        for path, size in host_files(roots, int(budget * share) + short):
            lw.add_host_file("usr/local" + path.removeprefix("/usr"), path, size)
        short = max(0, int(budget * share) + short - lw.payload)
        layers.append(lw.finish())

    # about half incompressible, in two layers; deterministic (seeded PRNG), so reruns build the same image
    for i, share in enumerate((0.25, 0.25)):
        lw = LayerWriter(blobs)
        for j, n in enumerate(random_file_sizes(int(budget * share) + short, rng)):
            lw.add_bytes(f"data/set{i}/blob{j:04d}.bin", rng.randbytes(n))
        short = 0
        layers.append(lw.finish())

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [la["diff_id"] for la in layers]},
    }
    cfg = json.dumps(config).encode()
    cd = hashlib.sha256(cfg).hexdigest()
    (blobs / cd).write_bytes(cfg)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": "sha256:" + cd, "size": len(cfg)},
        "layers": [la["desc"] for la in layers],
    }
    mf = json.dumps(manifest).encode()
    md = hashlib.sha256(mf).hexdigest()
    (blobs / md).write_bytes(mf)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": "sha256:" + md,
                "size": len(mf),
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
            }
        ],
    }
    (out / "index.json").write_text(json.dumps(index))
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return {"payload": [la["payload"] for la in layers], "blob": [la["desc"]["size"] for la in layers]}


def layout_layer_bytes(layout: Path) -> int:
    """Sum of the layer blob sizes of the (single) image in an OCI layout."""
    blobs = layout / "blobs" / "sha256"
    idx = json.loads((layout / "index.json").read_text())
    man = json.loads((blobs / idx["manifests"][0]["digest"][7:]).read_text())
    return sum(la["size"] for la in man["layers"])


# -- measuring -----------------------------------------------------------------------------------
def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def start_stack(host: str) -> tuple[Stack, Path]:
    base = new_base()
    s = Stack(base, {"mirrorRegistry": [{"host": host, "insecure": True}]})
    try:
        s.start_daemon()
        s.start_snapshotter()
        s.start_containerd()
    except BaseException:
        close_stack(s, base)
        raise
    return s, base


def close_stack(s: Stack, base: Path) -> None:
    try:
        s.close()
    finally:
        release_below(str(base))
        shutil.rmtree(base, ignore_errors=True)


def pull_cmd(s: Stack, path: str, ref: str) -> list[str]:
    if path == "overlayfs":
        return ["ctr", "--address", str(s.sock), "image", "pull", "--plain-http", "--snapshotter", "overlaybd", ref]
    return [sys.executable, "-m", "overlaybd.cli.rpull", "--address", str(s.sock), "--plain-http", ref]


def time_to_ready(s: Stack, path: str, ref: str, name: str) -> float:
    """Seconds from pull start until the container's first command printed "ready"."""
    t0 = time.monotonic()
    r = subprocess.run(pull_cmd(s, path, ref), capture_output=True, text=True, timeout=CMD_TIMEOUT)
    if r.returncode != 0:
        raise RuntimeError(f"{path} pull failed: {r.stderr[-2000:]}\n--- snapshotter ---\n{s.log('snapshotter')}")
    out = s.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, name, *READY_CMD, timeout=CMD_TIMEOUT).stdout
    dt = time.monotonic() - t0
    if out.strip() != "ready":
        raise RuntimeError(f"{path}: container printed {out!r}, expected 'ready'")
    return dt


def remove_image(s: Stack, ref: str) -> None:
    """Drop the image, its snapshots (devices detach) and content; keeps the overlaybd block cache."""
    s.ctr("image", "rm", ref)
    s.gc()
    left = s.ctr("snapshots", "--snapshotter", "overlaybd", "ls").stdout.strip().splitlines()[1:]
    if left:
        raise RuntimeError(f"snapshots left after image rm + GC: {left}")


def p95(xs: list[float]) -> float:
    """95th percentile, linear interpolation between order statistics (with 5 runs: 0.8 of the way to the max)."""
    return statistics.quantiles(xs, n=20, method="inclusive")[-1] if len(xs) > 1 else xs[0]


PATHS = ("overlayfs", "overlaybd")
LABEL = {"overlayfs": "ctr pull + overlayfs", "overlaybd": "rpull + lazy overlaybd (FUSE)"}


def run_cold(proxy: CountingProxy, host: str, refs: dict[str, str], runs: int) -> dict[str, list[tuple[float, int]]]:
    res: dict[str, list[tuple[float, int]]] = {p: [] for p in PATHS}
    for i in range(runs):
        order = PATHS if i % 2 == 0 else PATHS[::-1]  # alternate, so slow drift of machine load hits both
        for path in order:
            s, base = start_stack(host)
            try:
                drop_caches()
                proxy.take()
                dt = time_to_ready(s, path, refs[path], f"c{path[-2:]}{i}")
                res[path].append((dt, proxy.take()))
            finally:
                close_stack(s, base)
            print(f"  cold {path:<9} run {i + 1}: {dt:6.2f} s, {res[path][-1][1]:>13,} B", flush=True)
    return res


def run_warm(proxy: CountingProxy, host: str, refs: dict[str, str], runs: int) -> dict[str, list[tuple[float, int]]]:
    res: dict[str, list[tuple[float, int]]] = {p: [] for p in PATHS}
    for path in PATHS:
        s, base = start_stack(host)
        try:
            time_to_ready(s, path, refs[path], f"w{path[-2:]}prime")  # fills the block cache / page cache
            for i in range(runs):
                remove_image(s, refs[path])
                proxy.take()
                dt = time_to_ready(s, path, refs[path], f"w{path[-2:]}{i}")
                res[path].append((dt, proxy.take()))
                print(f"  warm {path:<9} run {i + 1}: {dt:6.2f} s, {res[path][-1][1]:>13,} B", flush=True)
        finally:
            close_stack(s, base)
    return res


def report(mode: str, res: dict[str, list[tuple[float, int]]], obd_total: int) -> dict[str, float]:
    t = {p: [x[0] for x in res[p]] for p in PATHS}
    b = {p: statistics.median([x[1] for x in res[p]]) for p in PATHS}
    print(f"\n{mode}: {len(t['overlayfs'])} runs")
    print(f"{'path':<32}{'median s':>10}{'p95 s':>9}{'min s':>8}{'max s':>8}{'bytes fetched (median)':>25}")
    for p in PATHS:
        print(
            f"{LABEL[p]:<32}{statistics.median(t[p]):>10.2f}{p95(t[p]):>9.2f}{min(t[p]):>8.2f}"
            f"{max(t[p]):>8.2f}{int(b[p]):>25,}"
        )
    speed = statistics.median(t["overlayfs"]) / statistics.median(t["overlaybd"])
    speed95 = p95(t["overlayfs"]) / p95(t["overlaybd"])
    frac_plain = b["overlaybd"] / max(b["overlayfs"], 1)
    frac_obd = b["overlaybd"] / max(obd_total, 1)
    print(
        f"ratio {mode}: overlaybd ready {speed:.2f}x faster than full pull (median; p95 {speed95:.2f}x); "
        f"fetched {frac_plain:.1%} of what the full pull fetched, {frac_obd:.1%} of the overlaybd image's layers"
    )
    return {"speed": speed, "frac_plain": frac_plain}


def scale_out(layers: int, layer_mib: int, reads: int) -> int:
    """Origin bytes per node for 1 and 3 nodes, directly, through a pull-through mirror and through an nginx
    slice cache (issue 13).

    Each node is its own process with its own block cache, reading `reads` random 4 KiB ranges of every
    layer lazily (what a container start does: a fraction of each layer). The mirror is docker-registry with
    `proxy: remoteurl:` (fresh storage per scenario), found through a containerd hosts directory; the origin
    is reached through an access-logging proxy whose log is what the origin sent. Needs no root. With nginx
    installed, two more scenarios use it as a range-caching site mirror (`slice 1m` + `proxy_cache_lock`).

    Per scenario: origin bytes (total, per node, against one direct node), and what the origin's GETs were:
    range GETs (a node reading from the origin itself), complete whole-blob GETs (the mirror's fills) and
    cut-short whole-blob GETs (docker-registry's stream to a node that answered its range request with 200
    while filling, which the node hung up on), with the number of such 200s the nodes got."""
    from helpers.nginx_mirror import NGINX, NginxSliceMirror
    from registry.mirror_env import (  # tests/registry: the same site as test_mirror.py
        AccessLogProxy,
        PullThroughMirror,
        expected_reads,
        finish_node,
        node_service,
        start_node,
        write_hosts_dir,
    )

    try:
        from helpers.registry import Registry as Origin
        from helpers.registry import build_layout
    except ImportError:  # older trees
        from registry.conftest import Registry as Origin  # type: ignore[no-redef]
        from registry.conftest import build_layout

    work = Path(tempfile.mkdtemp(prefix="obdscale-", dir="/tmp"))
    origin = Origin(work / "origin")
    proxy = AccessLogProxy(origin.port)
    try:
        files, datas = [], []
        for i in range(layers):
            data = os.urandom(layer_mib * MiB)
            (work / f"layer{i}").write_bytes(data)
            files.append(work / f"layer{i}")
            datas.append(data)
        descs = build_layout(work / "oci", "v1", files)
        origin.push(work / "oci", "v1", "bench/app")
        repo_url = f"http://{proxy.host}/v2/bench/app/blobs"
        want = expected_reads(list(zip(descs, datas, strict=True)), reads, 4096, 7)
        image = layers * layer_mib * MiB
        sizes = {d["digest"]: d["size"] for d in descs}
        rows: list[tuple[str, int, float, int, int, float, int, int, str]] = []
        per_node: dict[tuple[str, int], float] = {}
        # mirror: the 3 nodes start together on a cold mirror; staggered: one node first, then the other two
        scenarios = [("direct", 1), ("direct", 3), ("mirror", 1), ("mirror", 3), ("staggered", 3)]
        scenarios += [("slice", 3), ("slicestag", 3)] if os.access(NGINX, os.X_OK) else []
        for mode, n in scenarios:
            tag = f"{mode}{n}"
            mirror: Any = None
            if mode.startswith("slice"):  # nginx slice cache (1 MiB slices) in front of the origin's proxy
                mirror = NginxSliceMirror(work / f"m-{tag}", proxy.host, slice_size="1m")
            elif mode != "direct":
                mirror = PullThroughMirror(work / f"m-{tag}", f"http://{proxy.host}")
            hosts = write_hosts_dir(work / f"h-{tag}", proxy.host, mirror.host) if mirror else work / "none"
            proxy.reset()
            t0 = time.monotonic()
            got = []
            filling: dict[str, int] = {}  # 200 answers ("filling") the nodes got from the mirror, per blob
            later = 0
            for wave in [[0], [1, 2]] if mode in ("staggered", "slicestag") else [list(range(n))]:
                wave_t0 = time.monotonic()
                procs = [
                    start_node(node_service(work / f"n-{tag}-{i}", hosts), repo_url, descs, reads, 4096, 7)
                    for i in wave
                ]
                got += [finish_node(p, timeout=CMD_TIMEOUT, filling=filling) for p in procs]
                # what the requests of the last wave's time caused (staggered: nodes 2 and 3)
                later = proxy.blob_bytes(since=wave_t0)
            took = time.monotonic() - t0
            time.sleep(1.0)  # anything the mirror still fetches in the background is counted too
            if mirror:
                mirror.close() if isinstance(mirror, NginxSliceMirror) else mirror.stop()
            if any(g != want for g in got):
                print(f"scale-out {tag}: WRONG BYTES read by a node", file=sys.stderr)
                return 1
            total = proxy.blob_bytes()
            gets = proxy.whole_gets()
            complete = sum(1 for d, v in gets.items() for x in v if x == sizes.get(d))
            cut = [x for d, v in gets.items() for x in v if x != sizes.get(d)]
            ranged = len(proxy.ranged_blob_gets())
            twice = sum(proxy.overlap().values())  # bytes of a blob the origin sent more than once
            per_node[(mode, n)] = total / n
            after = f"{later / MiB:.1f}" if mode in ("staggered", "slicestag") else "-"
            rows.append(
                (tag, n, total, ranged, complete, max(cut, default=0), len(cut), sum(filling.values()), after, twice)
            )
            print(
                f"scale-out {mode:9s} {n} node(s): origin sent {total / MiB:7.1f} MiB = "
                f"{total / n / MiB:6.1f} MiB/node ({total / n / image:.1%} of the {image / MiB:.0f} MiB image "
                f"per node); at the origin: {ranged} range GETs, {complete} complete whole-blob GETs, "
                f"{len(cut)} cut-short ones ({sum(cut) / MiB:.1f} MiB, largest {max(cut, default=0) / MiB:.1f}); "
                f"mirror 200s to the nodes {sum(filling.values())}; sent twice {twice / MiB:.1f} MiB"
                + (f"; nodes 2+3 added {later / MiB:.1f} MiB" if mode in ("staggered", "slicestag") else "")
                + f"; {took:.1f}s"
            )
        d1 = per_node[("direct", 1)]
        print(
            "ratio scale-out (origin bytes per node / direct 1 node): "
            + "; ".join(f"{m} {n} node(s) {v / d1:.2f}x" for (m, n), v in per_node.items())
        )
        names = {
            "direct1": "direct, 1 node",
            "direct3": "direct, 3 nodes",
            "mirror1": "mirror (cold), 1 node",
            "mirror3": "mirror (cold), 3 nodes starting together",
            "staggered3": "mirror (cold), 1 node, then 2 together",
            "slice3": "nginx slice cache (cold), 3 nodes starting together",
            "slicestag3": "nginx slice cache (cold), 1 node, then 2 together",
        }
        print(f"\nblobs {len(descs)} x {layer_mib} MiB = {image / MiB:.0f} MiB\n")
        print(
            "| scenario | origin MiB | per node | per node / direct 1 node | range GETs at the origin "
            "| complete whole-blob GETs | cut-short GETs (largest MiB) | mirror 200s to nodes "
            "| MiB added by nodes 2+3 | MiB the origin sent twice |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for tag, n, total, ranged, complete, largest, ncut, n200, after, twice in rows:
            print(
                f"| {names[tag]} | {total / MiB:.1f} | {total / n / MiB:.1f} | {total / n / d1:.2f}x | {ranged} "
                f"| {complete} | {ncut} ({largest / MiB:.1f}) | {n200} | {after} | {twice / MiB:.1f} |"
            )
        return 0
    finally:
        proxy.close()
        origin.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=500, help="image payload size in MiB (default 500)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per path and cache state (default 5)")
    ap.add_argument("--skip-warm", action="store_true", help="cold-cache runs only")
    ap.add_argument(
        "--scale-out",
        action="store_true",
        help="only the scale-out section: origin bytes per node, 1 and 3 nodes, direct and through a "
        "pull-through mirror (no root needed)",
    )
    ap.add_argument("--layers", type=int, default=3, help="scale-out: layers (default 3)")
    ap.add_argument("--layer-mib", type=int, default=32, help="scale-out: MiB per layer (default 32)")
    ap.add_argument("--reads", type=int, default=32, help="scale-out: random 4 KiB reads per layer (default 32)")
    args = ap.parse_args()
    if args.scale_out:
        return scale_out(args.layers, args.layer_mib, args.reads)
    if os.geteuid() != 0:
        print("startup.py: needs root (containerd, mounts, drop_caches)", file=sys.stderr)
        return 2
    if args.size_mib < 8 or args.runs < 1:
        ap.error("--size-mib must be >= 8 and --runs >= 1")

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally below: servers, mounts, temp dirs

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    work = Path(tempfile.mkdtemp(prefix="obdbench-", dir="/tmp"))
    reg: Registry | None = None
    proxy: CountingProxy | None = None
    try:
        reg = Registry(work)
        proxy = CountingProxy(("127.0.0.1", reg.port))
        host = f"127.0.0.1:{proxy.port}"
        t0 = time.monotonic()
        img = build_image(work / "oci", "oci", args.size_mib)
        build = time.monotonic() - t0
        t0 = time.monotonic()
        from overlaybd.cli.convert import main as convert_main

        (work / "convert").mkdir()
        vsize = max(4, (args.size_mib * 3) // 1024 + 1)
        with contextlib.redirect_stdout(sys.stderr):  # it prints the new manifest digest
            ok = (
                convert_main(
                    [
                        f"oci:{work / 'oci'}",
                        f"oci:{work / 'obd'}:obd",
                        "--vsize",
                        str(vsize),
                        "--work-dir",
                        str(work / "convert"),
                    ]
                )
                == 0
            )
        if not ok:
            raise RuntimeError("overlaybd-convert failed")
        conv = time.monotonic() - t0
        release_below(str(work / "convert"))
        shutil.rmtree(work / "convert", ignore_errors=True)
        obd_total = layout_layer_bytes(work / "obd")
        reg.push_layout(work / "oci", "oci", "bench/plain:1")
        reg.push_layout(work / "obd", "obd", "bench/obd:1")
        refs = {"overlayfs": f"{host}/bench/plain:1", "overlaybd": f"{host}/bench/obd:1"}

        print(
            f"image: {len(img['payload'])} layers, payload {sum(img['payload']) / MiB:.1f} MiB "
            f"(per layer MiB: {', '.join(f'{x / MiB:.1f}' for x in img['payload'])}); "
            f"gzip blobs {sum(img['blob']) / MiB:.1f} MiB "
            f"({', '.join(f'{x / MiB:.1f}' for x in img['blob'])}); overlaybd lz4 blobs {obd_total / MiB:.1f} MiB"
        )
        print(
            f"build {build:.1f} s, overlaybd-convert {conv:.1f} s; ready = {' '.join(READY_CMD[:2])} "
            f"'{READY_CMD[2]}' printed 'ready'",
            flush=True,
        )

        cold = run_cold(proxy, host, refs, args.runs)
        warm = None if args.skip_warm else run_warm(proxy, host, refs, args.runs)
        rc = report("cold", cold, obd_total)
        if warm is not None:
            report("warm", warm, obd_total)
        print(
            f"\ntarget (cold, {args.size_mib} MiB): >= 4x faster: {rc['speed']:.2f}x "
            f"{'met' if rc['speed'] >= 4 else 'NOT met'}; < 10% of bytes: {rc['frac_plain']:.1%} "
            f"{'met' if rc['frac_plain'] < 0.10 else 'NOT met'}"
        )
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 shared CPUs)")
    finally:
        if proxy is not None:
            proxy.close()
        if reg is not None:
            reg.stop()
        release_below(str(work))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
