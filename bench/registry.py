"""Registry read path vs references measured in the same run (real docker-registry on loopback).

1. cold sequential read of a blob (default 256 MiB) through open_remote_blob vs `curl -o FILE` of the same blob
   (both write the blob to a file: curl its output, the product its cache file); CPU seconds of both and of
   the registry are printed as well, and two more references: a verifying download with standard tools
   (`curl | tee FILE | openssl dgst -sha256`: the product checks the blob's digest before the read that
   completes it returns) and the sha256 of the blob alone, in memory, as a share of curl's download
7. "link": the same cold sequential read of a blob of its own (default 128 MiB) through a paced TCP relay
   (default 1000 Mbit/s, a separate process) vs curl through the same relay: on loopback both sides are
   CPU-bound, through a link the question is whether the product keeps the link busy
2. random 4 KiB cold reads per second (fresh cache), vs random 4 KiB `curl` range requests on one connection
3. warm (cached) sequential and random reads vs the same blob as a local file (LocalFile)
4. warm random 4 KiB reads through the image stack (L0+L1 vectors from the registry) vs the same stack on local files
6. "restart": odd-sized sequential and random cold reads, a daemon restart (new cache object on the same
   directory), the same reads again; prints the bytes fetched by the second run (should be 0)
5. "startup" of a realistic layer (the Python stdlib as ext4): the reads `debugfs` makes to cat the files
   an interpreter imports at start, replayed on the registry-backed image; prints bytes fetched / bytes read

Timed sections run --runs times (default 5), interleaved with their reference so both see the same
machine state; the ratio printed is of the medians (the min ratio is printed too). The machine these
figures come from is shared, so one run says little.

Usage: .venv/bin/python bench/registry.py [--mib 256] [--reads 2000] [--runs 5] [--only cold,link,stack,restart]
       [--link-mbit 1000] [--link-mib 128]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers.registry import Registry, build_layout  # noqa: E402
from overlaybd.config.image_config import device_config_from_dict  # noqa: E402
from overlaybd.config.service import service_config_from_dict  # noqa: E402
from overlaybd.format.fileio import LocalFile  # noqa: E402
from overlaybd.image.image import open_image  # noqa: E402
from overlaybd.registry import open_remote_blob  # noqa: E402
from overlaybd.registry.metrics import METRICS  # noqa: E402
from startup import CountingProxy  # noqa: E402  (bench/startup.py: the same relay, counting what it sends)

VECTORS = Path(os.environ.get("OVERLAYBD_VECTORS", REPO.parent / "shared" / "vectors"))
CHUNK = 1 << 20


def push_random_blob(tmp: Path, reg: Registry, name: str, mib: int) -> tuple[Path, str]:
    """A blob of `mib` MiB of random bytes, pushed as the one layer of bench/<name>: (its file, its digest)."""
    blob = tmp / f"{name}.bin"
    with open(blob, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(CHUNK))
    layers = build_layout(tmp / f"oci-{name}", name, [blob])
    reg.push(tmp / f"oci-{name}", name, f"bench/{name}")
    return blob, layers[0]["digest"]


def service(cache_dir: str, refill: int = 262144):
    return service_config_from_dict(
        {
            "cacheConfig": {"cacheType": "file", "cacheDir": cache_dir, "cacheSizeGB": 4, "refillSize": refill},
            "credentialConfig": {"mode": "file", "path": "/nonexistent"},
            "enableAudit": False,
        }
    )


def lower(digest: str, size: int):
    return device_config_from_dict({"lowers": [{"digest": digest, "size": size}]}).lowers[0]


def seq_read(f, size: int) -> float:
    buf = memoryview(bytearray(CHUNK))
    t0 = time.perf_counter()
    off = 0
    while off < size:
        n = f.pread_into(buf[: min(CHUNK, size - off)], off)
        off += n
    return time.perf_counter() - t0


def rand_reads(f, offsets: list[int]) -> float:
    buf = memoryview(bytearray(4096))
    t0 = time.perf_counter()
    for off in offsets:
        f.pread_into(buf, off)
    return time.perf_counter() - t0


def best(fn, n: int = 3) -> float:
    return min(fn() for _ in range(n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--only",
        default="cold,link,random,warm,stack,restart,startup",
        help="comma-separated sections: cold, link, random, warm, stack, restart, startup",
    )
    ap.add_argument("--link-mbit", type=int, default=1000, help="link section: the paced link's rate (Mbit/s)")
    ap.add_argument("--link-mib", type=int, default=128, help="link section: MiB read through the link")
    ap.add_argument("--relay", default="", help=argparse.SUPPRESS)  # internal: the link section's relay process
    args = ap.parse_args()
    if args.relay:
        run_relay(args.relay, args.link_mbit)
        return
    tmp = Path(tempfile.mkdtemp(prefix="obd-bench-reg-"))
    reg = Registry(tmp / "registry")
    try:
        run(args, tmp, reg)
    finally:
        reg.close()
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path, reg: Registry) -> None:
    size = args.mib << 20
    blob, digest = push_random_blob(tmp, reg, "big", args.mib)
    repo_url = f"http://{reg.host}/v2/bench/big/blobs"
    url = f"{repo_url}/{digest}"

    # 1. cold sequential vs curl. The reference writes a file (`curl -o`), as the product writes its cache file;
    # CPU seconds (user+sys) of each side and of the registry are printed too: on a shared 2-vCPU machine the
    # wall-clock ratio mostly says how busy the other cores were, the CPU budget says what each side costs.
    cpu: dict[str, list[float]] = {"curl": [], "ours": [], "reg curl": [], "reg ours": []}

    def reg_cpu() -> float:
        stat = Path(f"/proc/{reg.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def curl_once() -> float:
        out = tmp / "curl.out"
        r0, g0 = resource.getrusage(resource.RUSAGE_CHILDREN), reg_cpu()
        t0 = time.perf_counter()
        subprocess.run(["curl", "-sS", "-o", str(out), url], check=True)
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu["curl"].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        cpu["reg curl"].append(reg_cpu() - g0)
        out.unlink()
        return dt

    def verify_once() -> float:
        """The verifying reference: what a pull that checks the digest does with standard tools (curl writes
        the file through tee while OpenSSL hashes the same stream in a third process)."""
        out = tmp / "curl.out"
        t0 = time.perf_counter()
        got = subprocess.run(
            f"curl -sS {url} | tee {out} | openssl dgst -sha256", shell=True, check=True, capture_output=True, text=True
        ).stdout
        dt = time.perf_counter() - t0
        if digest.split(":", 1)[1] not in got:
            raise SystemExit(f"verifying reference: {got!r} does not name {digest}")
        out.unlink()
        return dt

    def sha_only() -> float:
        """sha256 of the blob from memory, in this process: the digest check's own CPU, which no cold read that
        verifies the blob can avoid (hashlib: OpenSSL)."""
        data = blob.read_bytes()
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        return time.perf_counter() - t0

    def cold_once() -> float:
        cache = tmp / f"cache-{random.random()}"
        f = open_remote_blob(repo_url, lower(digest, size), service(str(cache)))
        r0, g0 = resource.getrusage(resource.RUSAGE_SELF), reg_cpu()
        dt = seq_read(f, size)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu["ours"].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        cpu["reg ours"].append(reg_cpu() - g0)
        f.close()
        shutil.rmtree(cache)
        return dt

    only = set(args.only.split(","))
    if "cold" in only:
        curl_times, cold_times, verify_times, sha_times = [], [], [], []
        for _ in range(args.runs):  # interleaved so both see the same machine state (page cache, other load)
            curl_times.append(curl_once())
            cold_times.append(cold_once())
            verify_times.append(verify_once())
            sha_times.append(sha_only())
        t_curl, t_cold = statistics.median(curl_times), statistics.median(cold_times)
        t_verify, t_sha = statistics.median(verify_times), statistics.median(sha_times)
        print(
            f"cold sequential {args.mib} MiB (median of {args.runs}): curl {t_curl:.3f}s "
            f"({size / t_curl / 2**20:.0f} MiB/s), overlaybd {t_cold:.3f}s ({size / t_cold / 2**20:.0f} MiB/s)  "
            f"ratio {t_cold / t_curl:.2f}x (target <= 1.3); min ratio {min(cold_times) / min(curl_times):.2f}x"
        )
        print(
            f"  verifying reference `curl | tee FILE | openssl dgst -sha256` {t_verify:.3f}s: "
            f"ratio {t_cold / t_verify:.2f}x; sha256 of the blob alone (hashlib, in memory) {t_sha:.3f}s "
            f"= {t_sha / t_curl:.2f}x curl's whole download"
        )
        print(
            "  CPU s (median): "
            + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in cpu.items())
            + f"; load average {os.getloadavg()[0]:.1f}"
        )
    if "link" in only:
        link(args, tmp, reg)
    if "random" in only:
        cold_random(args, tmp, repo_url, digest, size, url)
    if "warm" in only:
        warm(args, tmp, repo_url, digest, size, blob)
    if "stack" in only:
        stack(args, tmp, reg)
    if "restart" in only:
        restart(args, tmp, repo_url, digest, size)
    if "startup" in only:
        startup(tmp, reg)


class LinkRelay(CountingProxy):
    """A TCP relay in front of the registry that paces the bytes it sends back to `mbit` Mbit/s in total
    (one token bucket shared by all connections, like one network link). Why: on loopback both sides are
    CPU-bound and the ratio is a CPU budget; a node pulls through a network link, where the question is
    whether the product keeps the link busy. `tc` shaping needs kernel modules this machine lacks."""

    def __init__(self, upstream: tuple[str, int], mbit: int) -> None:
        self.rate = mbit * 1_000_000 / 8  # bytes/s
        self.pace_lock = threading.Lock()
        self.next_free = time.monotonic()
        super().__init__(upstream)
        self.host = f"127.0.0.1:{self.port}"

    def _before_send(self, n: int) -> None:
        with self.pace_lock:  # reserve the link time for n bytes, then wait for its start
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
        if start > now:
            time.sleep(start - now)


def link(args, tmp: Path, reg: Registry) -> None:
    """7. cold sequential through a paced link (default 1 Gbit/s) vs curl through the same link."""
    n = args.link_mib << 20  # a blob of its own, read whole (the product's read ends with its digest check)
    _, digest = push_random_blob(tmp, reg, "link", args.link_mib)
    # The relay runs in a process of its own: its threads must not compete for this process's GIL.
    relay = subprocess.Popen(
        [sys.executable, __file__, "--relay", reg.host, "--link-mbit", str(args.link_mbit)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        repo_url = f"http://{relay.stdout.readline().strip()}/v2/bench/link/blobs"  # type: ignore[union-attr]
        url = f"{repo_url}/{digest}"
        ours, ref = [], []
        for _ in range(args.runs):
            out = tmp / "curl.out"
            t0 = time.perf_counter()
            subprocess.run(["curl", "-sS", "-o", str(out), url], check=True)
            ref.append(time.perf_counter() - t0)
            out.unlink()
            cache = tmp / f"cache-{random.random()}"
            f = open_remote_blob(repo_url, lower(digest, n), service(str(cache)))
            ours.append(seq_read(f, n))
            f.close()
            shutil.rmtree(cache)
        t_ref, t_ours = statistics.median(ref), statistics.median(ours)
        print(
            f"cold sequential {n >> 20} MiB through a {args.link_mbit} Mbit/s link (median of {args.runs}): "
            f"curl {t_ref:.3f}s ({n / t_ref / 2**20:.0f} MiB/s), overlaybd {t_ours:.3f}s "
            f"({n / t_ours / 2**20:.0f} MiB/s)  ratio {t_ours / t_ref:.2f}x (target <= 1.3)"
        )
    finally:
        relay.kill()
        relay.wait()


def run_relay(upstream: str, mbit: int) -> None:
    """--relay: run a LinkRelay in front of `upstream` until killed; print its address first."""
    host, _, port = upstream.rpartition(":")
    relay = LinkRelay((host, int(port)), mbit)
    print(relay.host, flush=True)
    threading.Event().wait()


def cold_random(args, tmp: Path, repo_url: str, digest: str, size: int, url: str) -> None:
    # 2. random 4K cold reads/s vs curl ranges on one connection
    rng = random.Random(7)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(args.reads)]
    cache = tmp / "cache-rand"
    f = open_remote_blob(repo_url, lower(digest, size), service(str(cache), refill=4096))
    t_rand = rand_reads(f, offsets)
    f.close()
    n_curl = min(300, args.reads)
    cfg = tmp / "curl.cfg"
    cfg.write_text(
        "".join(f'url = "{url}"\nrange = "{o}-{o + 4095}"\noutput = "/dev/null"\n' for o in offsets[:n_curl])
    )
    t0 = time.perf_counter()
    subprocess.run(["curl", "-sS", "-K", str(cfg)], check=True)
    t_curl_r = time.perf_counter() - t0
    print(
        f"random 4K cold (refill 4K): overlaybd {args.reads / t_rand:.0f} reads/s, "
        f"curl ranges {n_curl / t_curl_r:.0f} reads/s  ratio {(n_curl / t_curl_r) / (args.reads / t_rand):.2f}x"
    )


def warm(args, tmp: Path, repo_url: str, digest: str, size: int, blob: Path) -> None:
    rng = random.Random(7)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(args.reads)]
    cache = tmp / "cache-warm"
    f = open_remote_blob(repo_url, lower(digest, size), service(str(cache)))
    seq_read(f, size)  # populate
    local = LocalFile(blob)
    t_warm = best(lambda: seq_read(f, size))
    t_local = best(lambda: seq_read(local, size))
    print(
        f"warm sequential: overlaybd {size / t_warm / 2**20:.0f} MiB/s, local file {size / t_local / 2**20:.0f} "
        f"MiB/s  ratio {t_warm / t_local:.2f}x"
    )
    t_warm_r = best(lambda: rand_reads(f, offsets))
    t_local_r = best(lambda: rand_reads(local, offsets))
    print(
        f"warm random 4K: overlaybd {args.reads / t_warm_r:.0f} reads/s, local file {args.reads / t_local_r:.0f} "
        f"reads/s  ratio {t_warm_r / t_local_r:.2f}x"
    )
    f.close()
    local.close()


def stack(args, tmp: Path, reg: Registry) -> None:
    """4. image stack: registry (warm) vs local vector files."""
    rng = random.Random(7)
    vec = [VECTORS / "zfile" / "L0.commit.z_lz4", VECTORS / "zfile" / "L1.commit.z_lz4.tar"]
    vlayers = build_layout(tmp / "oci-vec", "v", vec)
    reg.push(tmp / "oci-vec", "v", "bench/vec")
    rcfg = device_config_from_dict(
        {
            "repoBlobUrl": f"http://{reg.host}/v2/bench/vec/blobs",
            "lowers": [{"digest": x["digest"], "size": x["size"]} for x in vlayers],
        }
    )
    lcfg = device_config_from_dict({"lowers": [{"file": str(p)} for p in vec]})
    svc = service(str(tmp / "cache-vec"))
    # only where the vectors have data (0..64K, 8M..9M), so every read goes through ZFile and the blob
    data_pages = list(range(0, 16)) + list(range((8 << 20) // 4096, (9 << 20) // 4096))
    voffs = [rng.choice(data_pages) * 4096 for _ in range(args.reads)]
    with open_image(rcfg, svc) as rimg, open_image(lcfg, svc) as limg:
        rand_reads(rimg, voffs)  # warm the cache
        rs, ls = [], []
        for _ in range(args.runs):  # interleaved, like the cold runs
            rs.append(rand_reads(rimg, voffs))
            ls.append(rand_reads(limg, voffs))
        t_r, t_l = statistics.median(rs), statistics.median(ls)
    print(
        f"image stack warm random 4K (median of {args.runs}): registry-backed {args.reads / t_r:.0f} reads/s, "
        f"local files {args.reads / t_l:.0f} reads/s  ratio {t_r / t_l:.2f}x (target <= 1.5); "
        f"min ratio {min(rs) / min(ls):.2f}x"
    )


def restart(args, tmp: Path, repo_url: str, digest: str, size: int) -> None:
    """6. the issue's "second cold run after a restart refetched 183 of 218 MB": the same odd-sized reads
    (half the blob sequentially in 1,000,001-byte reads, random 10,007-byte reads in the other half) before
    and after a restart; the second run must fetch nothing."""
    from overlaybd.registry import cache as cache_mod

    rng = random.Random(11)
    reads = [(o, 1_000_001) for o in range(0, size // 2, 1_000_001)]
    reads += [(rng.randrange(size // 2, size - 10_007), 10_007) for _ in range(args.reads // 4)]
    cache = str(tmp / "cache-restart")
    fetched, read = [], 0
    for _ in range(2):
        before = METRICS.bytes_fetched
        f = open_remote_blob(repo_url, lower(digest, size), service(cache))
        buf = memoryview(bytearray(1_000_001))
        for off, n in reads:
            f.pread_into(buf[:n], off)
        f.close()
        cache_mod._caches.pop(cache, None)  # a restarted daemon: a new cache object on the same directory
        fetched.append(METRICS.bytes_fetched - before)
        read = sum(n for _, n in reads)
    print(
        f"restart: {len(reads)} reads, {read} bytes read; fetched {fetched[0]} bytes cold, "
        f"{fetched[1]} bytes after the restart (target 0)"
    )


STARTUP_FILES = [
    "os.py",
    "site.py",
    "codecs.py",
    "io.py",
    "abc.py",
    "stat.py",
    "_collections_abc.py",
    "posixpath.py",
    "genericpath.py",
    "_sitebuiltins.py",
    "encodings/__init__.py",
    "encodings/utf_8.py",
    "encodings/aliases.py",
]


def startup(tmp: Path, reg: Registry) -> None:
    """A realistic layer: this machine's Python stdlib as an ext4 overlaybd layer (mkfs.ext4 -d, then
    overlaybd-commit -z -t). "Start-up" = what `debugfs` reads to open the filesystem and cat the files
    an interpreter imports at start (STARTUP_FILES), recorded with strace and replayed page-aligned on the
    registry-backed image with the default 256 KiB refill."""
    src = Path("/usr/lib/python3.11")
    if not all(shutil.which(t) for t in ("strace", "debugfs", "mkfs.ext4")) or not src.is_dir():
        print("startup: skipped (needs strace, debugfs, mkfs.ext4 and /usr/lib/python3.11)")
        return
    from overlaybd.format import lsmt

    disk = tmp / "disk.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^has_journal", "-d", str(src), str(disk), "256M"], check=True
    )
    rw = lsmt.create_rw(tmp / "l.data", tmp / "l.index", disk.stat().st_size)
    with open(disk, "rb") as f:
        off = 0
        while chunk := f.read(CHUNK):
            for i in range(0, len(chunk), 65536):
                piece = chunk[i : i + 65536]
                if piece.count(0) != len(piece):
                    rw.pwrite(piece, off + i)
            off += len(chunk)
    rw.close()
    blob = tmp / "layer.commit"
    subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "overlaybd-commit"),
            "-z",
            "-t",
            str(tmp / "l.data"),
            str(tmp / "l.index"),
            str(blob),
        ],
        check=True,
    )
    layers = build_layout(tmp / "oci-ext4", "e", [blob])
    reg.push(tmp / "oci-ext4", "e", "bench/ext4")
    cmds = tmp / "debugfs.cmds"
    cmds.write_text("".join(f"cat /{name}\n" for name in STARTUP_FILES))
    tr = subprocess.run(
        ["strace", "-e", "trace=pread64", "debugfs", "-f", str(cmds), str(disk)], capture_output=True, text=True
    )
    reads = [
        (int(m.group(2)), int(m.group(1))) for m in re.finditer(r"pread64\(\d+, .*?, (\d+), (\d+)\) = \d+", tr.stderr)
    ]
    rcfg = device_config_from_dict(
        {
            "repoBlobUrl": f"http://{reg.host}/v2/bench/ext4/blobs",
            "lowers": [{"digest": layers[0]["digest"], "size": layers[0]["size"]}],
        }
    )
    before = METRICS.bytes_fetched
    pages: set[int] = set()
    with open_image(rcfg, service(str(tmp / "cache-ext4"))) as img:
        for off, n in reads:  # as the kernel would issue them: whole 4 KiB pages
            a, e = off // 4096 * 4096, min(img.size(), (off + n + 4095) // 4096 * 4096)
            img.pread(e - a, a)
            pages.update(range(a // 4096, e // 4096))
    read_total = len(pages) * 4096
    fetched = METRICS.bytes_fetched - before
    print(
        f"startup (ext4 of /usr/lib/python3.11, {len(STARTUP_FILES)} files via debugfs, {len(reads)} reads): "
        f"read {read_total} distinct bytes, fetched {fetched} bytes of a {layers[0]['size']} byte blob; "
        f"fetched/read {fetched / max(1, read_total):.1f}, fetched/blob {fetched / layers[0]['size']:.3f}"
    )


if __name__ == "__main__":
    main()
