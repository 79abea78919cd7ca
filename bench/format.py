"""Format benchmark: our LSMT/ZFile code vs reference tools, measured in the same run.

On a realistic ext4 image (default 512 MiB; built with `mkfs.ext4 -d` from a copy of
/usr files plus some random files) it times:

  ZFile lz4 compress   vs  lz4 -1            ZFile zstd compress  vs  zstd -3 -T1
  ZFile lz4 decompress vs  lz4 -d            ZFile zstd decompress vs zstd -d
  commit (RW -> committed) vs cp of the RW data file
  sequential read of a 3-layer lz4 ZFile stack vs cat of the raw image
  N random 4 KiB reads of that stack vs the same reads (os.preadv) on the raw image
  N random 4 KiB reads of the uncompressed 3-layer stack (reads/s; target >= 100k on one core)
and prints ratio = ours / reference next to upstream C++'s ratio and the target
(within 1.5x of upstream). Everything runs with a warm page cache; our side runs
single-threaded (threads=1) like the references.

Then the ZFile build scaling table: `overlaybd-zfile`'s library path (`zfile.compress`, default
threads = usable CPUs) on the committed base layer, in a child process pinned to one CPU
(`taskset -c`) and on all usable CPUs, alternated, for lz4 and zstd; throughput medians and the
ratio (target >= 1.7x on 2 cores), plus the per-MB cost of the serial parts (reading, writing,
jump table, per-batch Python) that bound scaling on many cores. Not run by the tests.

`--random-only` runs just the random 4 KiB read rows: `--rounds` rounds of raw / lz4 ZFile stack /
plain stack, interleaved, reporting the median and range of each ratio and the load average. With
`--files DIR` the built layers are kept in DIR and reused by later runs (for iterating on the read path).

Usage: .venv/bin/python bench/format.py [--size-mib 512] [--reads 500000] [--workdir /var/tmp]
       .venv/bin/python bench/format.py --scaling-only [--size-mib 256] [--scaling-runs 7]
       .venv/bin/python bench/format.py --random-only [--rounds 7] [--files /var/tmp/obd-rand]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

from overlaybd.format import lsmt, opener, zfile
from overlaybd.format.atomic import AtomicOutput
from overlaybd.format.fileio import LocalFile

MiB = 1 << 20
# upstream C++ ratios (ours / reference) from the project issue
UPSTREAM = {
    "lz4 compress": 1.10,
    "zstd compress": 1.88,
    "lz4 decompress": 1.10,
    "zstd decompress": 2.84,
    "commit": 1.19,
    "3-layer zfile seq read": 4.0,
    "random 4K reads zfile stack": 1.69,
    # upstream's CLI does not fsync; its ratio against cp/lz4 -d is the closest published figure
    "commit (both fsynced)": 1.19,
    "lz4 decompress (both fsynced)": 1.10,
    "zstd decompress (both fsynced)": 2.84,
}


def sh(*cmd: str, stdout=None) -> float:
    """Run a reference command; return its wall time."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=stdout if stdout is not None else subprocess.DEVNULL)
    return time.perf_counter() - t0


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def build_tree(root: Path, budget: int, rng: random.Random) -> None:
    """~85 % real files from /usr (text, ELF, python), ~15 % random (incompressible) files."""
    used = 0
    real_budget = budget * 85 // 100
    for top in ("/usr/share", "/usr/lib", "/usr/bin"):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                src = os.path.join(dirpath, name)
                try:
                    if not os.path.isfile(src) or os.path.islink(src):
                        continue
                    size = -(-os.path.getsize(src) // 4096) * 4096 + 4096  # blocks + inode/dir share
                    if size > 16 * MiB or used + size > real_budget:
                        continue
                    dst = root / os.path.relpath(src, "/")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
                    used += size
                except OSError:
                    continue
            if used >= real_budget * 0.98:
                break
        if used >= real_budget * 0.98:
            break
    rnd = root / "random"
    rnd.mkdir()
    i = 0
    while used < budget:
        size = min(rng.choice((4096, 65536, 1 * MiB, 4 * MiB)), budget - used)
        (rnd / f"r{i}").write_bytes(rng.randbytes(size))
        used += size
        i += 1


def build_image(work: Path, size: int) -> Path:
    img = work / "disk.img"
    tree = work / "tree"
    tree.mkdir()
    build_tree(tree, size * 55 // 100, random.Random(7))
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(tree), "-b", "4096", str(img), f"{size // 1024}k"],
        check=True,
    )
    shutil.rmtree(tree)
    return img


def import_raw(img: Path, data: Path, index: Path, size: int) -> None:
    """Write the non-zero 1 MiB chunks of the raw image into a fresh RW layer."""
    zero = bytes(MiB)
    with lsmt.create_rw(data, index, size) as rw, open(img, "rb") as f:
        off = 0
        while chunk := f.read(MiB):
            if chunk != zero:
                rw.pwrite(chunk, off)
            off += len(chunk)


def commit_rw(data: Path, index: Path, out: Path) -> float:
    t0 = time.perf_counter()
    with lsmt.open_rw(data, index, readonly=True) as rw, AtomicOutput(out) as f:
        lsmt.commit(rw, f)
    return time.perf_counter() - t0


def compress(src: Path, out: Path, algorithm: str) -> float:
    t0 = time.perf_counter()
    with LocalFile(src) as f, AtomicOutput(out) as o:
        zfile.compress(f, o, algorithm=algorithm, block_size=4096, verify=True, threads=1)
    return time.perf_counter() - t0


def decompress(src: Path, out: Path) -> float:
    t0 = time.perf_counter()
    with AtomicOutput(out) as o:
        zfile.decompress(LocalFile(src), o)
    return time.perf_counter() - t0


def overlay_layer(work: Path, name: str, size: int, fraction: float, rng: random.Random) -> Path:
    """An upper layer rewriting `fraction` of the disk in 4..64 KiB pieces, committed."""
    data, index, out = work / f"{name}.data", work / f"{name}.index", work / f"{name}.commit"
    buf = rng.randbytes(64 * 1024)
    text = (b"overlaybd bench line\n" * 4096)[: 64 * 1024]
    with lsmt.create_rw(data, index, size) as rw:
        written = 0
        while written < size * fraction:
            length = rng.choice((4096, 16384, 65536))
            off = rng.randrange(0, size - length, 4096)
            rw.pwrite((buf if rng.random() < 0.5 else text)[:length], off)
            written += length
    commit_rw(data, index, out)
    data.unlink()
    index.unlink()
    return out


def open_stack(paths: list[Path]) -> lsmt.Stack:
    return lsmt.Stack([opener.open_layer(LocalFile(p)) for p in paths])


def seq_read(f, size: int) -> float:
    buf = memoryview(bytearray(MiB))
    t0 = time.perf_counter()
    for off in range(0, size, MiB):
        f.pread_into(buf[: min(MiB, size - off)], off)
    return time.perf_counter() - t0


def random_reads(read, offsets: list[int]) -> float:
    buf = memoryview(bytearray(4096))
    t0 = time.perf_counter()
    for off in offsets:
        read(buf, off)
    return time.perf_counter() - t0


def random_files(work: Path, size: int) -> tuple[Path, list[Path], list[Path]]:
    """(raw image, lz4 ZFile stack, plain stack) for the random-read rows; reused when `work` has them."""
    img, base = work / "disk.img", work / "base.commit"
    names = ["base.commit", "L1.commit", "L2.commit"]
    plain = [work / n for n in names]
    zfiles = [p.with_suffix(".zf") for p in plain]
    if all(p.exists() for p in [img, *plain, *zfiles]):
        return img, zfiles, plain
    print(f"building a {size // MiB} MiB ext4 image and its layers in {work} ...", file=sys.stderr)
    if img.exists():
        img.unlink()
    img = build_image(work, size)
    data, index = work / "base.data", work / "base.index"
    import_raw(img, data, index, size)
    commit_rw(data, index, base)
    data.unlink()
    index.unlink()
    rng = random.Random(11)
    overlay_layer(work, "L1", size, 0.10, rng)
    overlay_layer(work, "L2", size, 0.05, rng)
    for p, z in zip(plain, zfiles, strict=True):
        compress(p, z, "lz4")
    return img, zfiles, plain


def random_only(args: argparse.Namespace) -> int:
    """Only the random 4 KiB read rows, `--rounds` interleaved rounds: medians and ranges of the ratios."""
    size = args.size_mib * MiB
    keep = args.files is not None
    work = Path(args.files) if keep else Path(tempfile.mkdtemp(prefix="obd-bench-", dir=args.workdir))
    work.mkdir(parents=True, exist_ok=True)
    try:
        img, zfiles, plain = random_files(work, size)
        size = img.stat().st_size
        for p in [img, *zfiles, *plain]:
            warm(p)
        rng3 = random.Random(3)  # one generator: a fresh Random(3) per read would repeat one offset
        offsets = [rng3.randrange(0, size // 4096) * 4096 for _ in range(args.reads)]
        times: dict[str, list[float]] = {"raw": [], "zfile": [], "plain": []}
        cpus: dict[str, list[float]] = {"raw": [], "zfile": [], "plain": []}
        loads = [os.getloadavg()[0]]
        with LocalFile(img) as raw, open_stack(zfiles) as zst, open_stack(plain) as pst:
            for _ in range(args.rounds):
                for key, read in (("raw", raw.pread_into), ("zfile", zst.pread_into), ("plain", pst.pread_into)):
                    c0 = time.process_time()
                    times[key].append(random_reads(read, offsets))
                    cpus[key].append(time.process_time() - c0)
                loads.append(os.getloadavg()[0])
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    n = args.reads
    print(
        f"\nrandom 4 KiB reads: {args.size_mib} MiB ext4 image, {n} reads x {args.rounds} rounds, "
        f"python {sys.version.split()[0]}"
    )
    print("| stack | median us/read | median reads/s | ratio to raw (median) | range | min-time ratio | CPU ratio |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for key, label in (("zfile", "3-layer lz4 ZFile"), ("plain", "3-layer uncompressed")):
        ratios = [t / r for t, r in zip(times[key], times["raw"], strict=True)]
        cpu_ratios = [t / r for t, r in zip(cpus[key], cpus["raw"], strict=True)]
        med = statistics.median(times[key])
        print(
            f"| {label} | {med / n * 1e6:.2f} | {n / med:,.0f} | {statistics.median(ratios):.2f}x | "
            f"{min(ratios):.2f}-{max(ratios):.2f}x | {min(times[key]) / min(times['raw']):.2f}x | "
            f"{statistics.median(cpu_ratios):.2f}x |"
        )
    med_raw = statistics.median(times["raw"])
    print(f"| raw file (os.preadv) | {med_raw / n * 1e6:.2f} | {n / med_raw:,.0f} | 1.00x | - | 1.00x | 1.00x |")
    print("(CPU ratio: median over rounds of process_time ratios, the steadier figure on a loaded machine)")
    print(
        f"target: lz4 ZFile stack <= {1.5 * UPSTREAM['random 4K reads zfile stack']:.2f}x raw; "
        f"load average (1 min) during the rounds {min(loads):.2f}-{max(loads):.2f}"
    )
    return 0


# ---- ZFile build scaling --------------------------------------------------------------------------------------
_CHILD = """
import json, sys, time
from overlaybd.format import zfile
from overlaybd.format.fileio import LocalFile
from overlaybd.format.zfile import writer
src, dst, algo = sys.argv[1:4]
with LocalFile(src) as f, open(dst, "wb") as out:
    t0, c0 = time.perf_counter(), time.process_time()
    zfile.compress(f, out, algorithm=algo)  # default threads: the CPUs taskset left us
    out.flush()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"wall": wall, "cpu": cpu, "threads": writer.default_threads(), "accel": writer.ACCELERATED}))
"""


def busy_cpus() -> tuple[int, int]:
    """(busy, total) jiffies from /proc/stat: to report how loaded the machine was during a run."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def build_scaling(src: Path, work: Path, runs: int) -> list[dict]:
    """Median throughput of a ZFile build on 1 CPU vs all usable CPUs (child processes, alternated)."""
    cpus = sorted(os.sched_getaffinity(0))
    size = src.stat().st_size
    dst = work / "scaling.zf"
    rows = []
    for algo in ("lz4", "zstd"):
        res: dict[str, list[dict]] = {"1": [], "all": []}
        b0 = busy_cpus()
        for i in range(runs):
            for which in ("1", "all") if i % 2 == 0 else ("all", "1"):
                pin = ["taskset", "-c", str(cpus[0])] if which == "1" else []
                out = subprocess.run(
                    [*pin, sys.executable, "-c", _CHILD, str(src), str(dst), algo],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                res[which].append(json.loads(out))
                dst.unlink()
        b1 = busy_cpus()
        one = statistics.median(r["wall"] for r in res["1"])
        many = statistics.median(r["wall"] for r in res["all"])
        rows.append(
            {
                "algo": algo,
                "cpus": len(cpus),
                "threads": res["all"][0]["threads"],
                "accel": res["all"][0]["accel"],
                "mbs_1": size / one / 1e6,
                "mbs_all": size / many / 1e6,
                "ratio": one / many,
                "best_ratio": min(r["wall"] for r in res["1"]) / min(r["wall"] for r in res["all"]),
                "ratios": sorted(a["wall"] / b["wall"] for a, b in zip(res["1"], res["all"], strict=True)),
                "cpu_1": statistics.median(r["cpu"] for r in res["1"]),
                "cpu_all": statistics.median(r["cpu"] for r in res["all"]),
                "busy": len(cpus) * (b1[0] - b0[0]) / max(1, b1[1] - b0[1]),
            }
        )
    return rows


def _best_ms_per_mb(fn, mb: float) -> float:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000 / mb


def _algo_serial(algo: str, batches: list[bytes], work: Path, mb: float) -> dict[str, float]:
    """The per-algorithm rows of serial_costs()."""
    import zstandard
    from overlaybd.format.crc32c import crc32c_raw
    from overlaybd.format.zfile import writer

    batcher = writer._BATCHERS[writer.hdr.ALGORITHMS[algo]]
    # the builder hands the C LZ4 path recycled output buffers; do the same here (fresh ones would add
    # page faults that the builder does not have)
    bufs = writer.out_buffers(len(batches[0]), 4096) if algo == "lz4" and writer._accel is not None else None
    results = [(bytes(d), lens) for d, lens in (batcher(b, 4096, True, bufs) for b in batches)]
    total = _best_ms_per_mb(lambda: [batcher(b, 4096, True, bufs) for b in batches], mb)
    if algo == "lz4" and writer._accel is not None:
        acc = writer._accel
        out, lens = writer.out_buffers(len(batches[0]), 4096)
        seed = writer.BLOCK_CRC_SEED
        codec = _best_ms_per_mb(lambda: [acc.lz4_batch_into(b, 4096, seed, out, lens) for b in batches], mb)
    elif algo == "zstd":
        c = zstandard.ZstdCompressor(level=3)
        segs = [zstandard.BufferWithSegments(b, writer._segments(len(b), 4096)) for b in batches]
        codec = _best_ms_per_mb(lambda: [c.multi_compress_to_buffer(s, threads=1) for s in segs], mb)
    else:  # pure-Python lz4: every block's call takes the GIL, nothing is GIL-free per batch
        codec = 0.0
    path = work / "serial.out"

    def write() -> None:
        with open(path, "wb") as f:
            for r in results:
                f.write(r[0])

    def table() -> None:
        t = array("I")
        for r in results:
            t.extend(r[1])
        crc32c_raw(t.tobytes())

    rows = {
        f"{algo}: batch task total (codec + CRC + Python; runs in parallel)": total,
        f"{algo}: Python in the task holding the GIL (total - GIL-free call)": total - codec,
        f"{algo}: write output (page cache)": _best_ms_per_mb(write, mb),
        f"{algo}: jump table (extend, serialise, CRC)": _best_ms_per_mb(table, mb),
    }
    path.unlink()
    return rows


def serial_costs(src: Path, work: Path) -> dict[str, float]:
    """Per-MB (of input) cost of what one thread does in order, measured alone (ms/MB, best of 3):
    reading the input, writing the output, the jump table, and the per-batch Python around the codec."""
    from overlaybd.format.zfile import writer

    mb = src.stat().st_size / 1e6
    step = writer.ZFileBuilder(io.BytesIO(), threads=1).batch_bytes
    data = src.read_bytes()
    batches = [data[o : o + step] for o in range(0, len(data), step)]

    def read() -> None:
        with LocalFile(src) as f:
            for o in range(0, len(data), step):
                f.pread_into(memoryview(bytearray(min(step, len(data) - o))), o)

    out = {"read input (pread, fresh 512 KiB buffers)": _best_ms_per_mb(read, mb)}
    for algo in ("lz4", "zstd"):
        out.update(_algo_serial(algo, batches, work, mb))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        t0 = time.perf_counter()
        for _ in range(len(batches)):
            pool.submit(int).result()
        out["pool hand-off per batch (submit + result; streaming write() path only)"] = (
            (time.perf_counter() - t0) * 1000 / mb
        )
    lens = array("I", range(step // 4096))

    def commit() -> None:  # what a worker does in batch order (writer._ParallelFds._work)
        cond, table, stored = threading.Condition(), array("I"), 0
        for i in range(len(batches)):
            with cond:
                while i < 0:
                    cond.wait()
                stored += len(lens)
                table.extend(lens)
                cond.notify_all()

    out["ordered commit per batch (lock, offset, jump table extend)"] = _best_ms_per_mb(commit, mb)
    return out


def print_scaling(rows: list[dict], serial: dict[str, float]) -> None:
    print("\nZFile build scaling (zfile.compress of the committed base layer, 4 KiB blocks, CRCs on;")
    print("child process on 1 CPU via taskset vs all usable CPUs; medians, runs alternated)")
    print(
        "| algorithm | CPUs | MB/s 1 CPU | MB/s all | ratio (median) | ratio (best runs) | per-run ratios |"
        " CPU s 1 / all | machine busy (CPUs) | C batch |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | --- |")
    for r in rows:
        ratios = " ".join(f"{x:.2f}" for x in r["ratios"])
        print(
            f"| {r['algo']} | {r['cpus']} | {r['mbs_1']:.0f} | {r['mbs_all']:.0f} | {r['ratio']:.2f}x | "
            f"{r['best_ratio']:.2f}x | {ratios} | {r['cpu_1']:.2f} / {r['cpu_all']:.2f} | {r['busy']:.2f} | "
            f"{'yes' if r['accel'] else 'no'} |"
        )
    print("\nserial parts, ms per MB of input (one thread each, measured alone, best of 3):")
    for k, v in serial.items():
        print(f"  {k}: {v:.3f}")
    read = serial["read input (pread, fresh 512 KiB buffers)"]
    commit = serial["ordered commit per batch (lock, offset, jump table extend)"]
    print("  zfile.compress(LocalFile, file): each worker reads, compresses and writes its own batches;")
    print("  in batch order only the commit; one file's page-cache writes are serialised by the kernel (inode lock)")
    for algo in ("lz4", "zstd"):
        write = serial[f"{algo}: write output (page cache)"]
        ordered = commit + serial[f"{algo}: jump table (extend, serialise, CRC)"]
        gil = serial[f"{algo}: Python in the task holding the GIL (total - GIL-free call)"] + ordered
        task = read + serial[f"{algo}: batch task total (codec + CRC + Python; runs in parallel)"] + write
        bound = max(write, gil)
        print(
            f"  {algo}: per worker {task:.3f} ms/MB (read + task + write); serial: GIL-held + ordered "
            f"{gil:.3f} ms/MB, kernel write {write:.3f} ms/MB -> scaling flattens near {task / bound:.0f} cores "
            f"(~{1000 / bound:.0f} MB/s)"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512, help="ext4 image size (default 512)")
    ap.add_argument("--reads", type=int, default=500_000, help="random 4 KiB reads (default 500000)")
    ap.add_argument("--workdir", default="/var/tmp", help="where to put the scratch files")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    ap.add_argument("--scaling-only", action="store_true", help="only the ZFile build scaling table")
    ap.add_argument("--scaling-runs", type=int, default=7, help="runs per scaling cell (default 7)")
    ap.add_argument("--random-only", action="store_true", help="only the random 4 KiB read rows")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of --random-only (default 7)")
    ap.add_argument("--files", help="--random-only: keep the built layers in this dir and reuse them")
    args = ap.parse_args()
    if args.random_only:
        return random_only(args)
    for tool in ("mkfs.ext4", "lz4", "zstd", "cp", "cat"):
        if shutil.which(tool) is None:
            print(f"bench/format.py: {tool} not found", file=sys.stderr)
            return 1
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="obd-bench-", dir=args.workdir))
    rows: list[tuple[str, float, float, str]] = []
    try:
        print(f"building a {args.size_mib} MiB ext4 image in {work} ...", file=sys.stderr)
        img = build_image(work, size)
        data, index = work / "base.data", work / "base.index"
        import_raw(img, data, index, size)
        warm(data)
        warm(index)

        t_cp = sh("cp", str(data), str(work / "cp.out"))
        (work / "cp.out").unlink()
        # like for like: our commit fsyncs its output (AtomicOutput), so also time cp + fsync of the copy
        t_cp_sync = sh("sh", "-c", f"cp {data} {work / 'cp.out'} && sync {work / 'cp.out'}")
        (work / "cp.out").unlink()
        base = work / "base.commit"
        t_commit = commit_rw(data, index, base)
        rows.append(("commit", t_commit, t_cp, "cp"))
        rows.append(("commit (both fsynced)", t_commit, t_cp_sync, "cp + sync FILE"))
        data.unlink()
        index.unlink()
        warm(base)
        print(f"ZFile build scaling ({args.scaling_runs} runs per cell) ...", file=sys.stderr)
        load0 = os.getloadavg()
        scaling = build_scaling(base, work, args.scaling_runs)
        serial = serial_costs(base, work)
        load1 = os.getloadavg()
        if args.scaling_only:
            print(f"\nbase layer {base.stat().st_size / MiB:.1f} MiB, python {sys.version.split()[0]}")
            print_scaling(scaling, serial)
            print(f"load average before/after: {load0[0]:.2f} / {load1[0]:.2f}")
            return 0

        refs = {  # algo -> (compress argv, decompress argv, label, file suffix); {i}/{o} = input/output
            "lz4": (["lz4", "-1", "-q", "-f", "{i}", "{o}"], ["lz4", "-d", "-q", "-f", "{i}", "{o}"], "lz4", "lz4"),
            "zstd": (
                ["zstd", "-3", "-T1", "-q", "-f", "{i}", "-o", "{o}"],
                ["zstd", "-d", "-q", "-f", "{i}", "-o", "{o}"],
                "zstd",
                "zst",
            ),
        }
        for algo, (ref_c, ref_d, label, ext) in refs.items():
            packed, ref_out, ours_out = work / f"base.{ext}", work / f"base.{ext}.out", work / f"base.{algo}.ours"
            ours = compress(base, work / f"base.{algo}.zf", algo)
            ref = sh(*(a.format(i=base, o=packed) for a in ref_c))
            label_c = " ".join(a for a in ref_c if "{" not in a and a not in ("-q", "-f", "-o"))
            rows.append((f"{algo} compress", ours, ref, label_c))
            ours_d = decompress(work / f"base.{algo}.zf", ours_out)
            ref_dt = sh(*(a.format(i=packed, o=ref_out) for a in ref_d))
            rows.append((f"{algo} decompress", ours_d, ref_dt, f"{label} -d"))
            ref_out.unlink()
            ref_ds = sh("sh", "-c", " ".join(a.format(i=packed, o=ref_out) for a in ref_d) + f" && sync {ref_out}")
            rows.append((f"{algo} decompress (both fsynced)", ours_d, ref_ds, f"{label} -d + sync FILE"))
            for p in (ours_out, ref_out, packed):
                p.unlink()

        rng = random.Random(11)
        uppers = [overlay_layer(work, "L1", size, 0.10, rng), overlay_layer(work, "L2", size, 0.05, rng)]
        plain = [base, *uppers]
        zfiles = [work / "base.lz4.zf"]
        for p in uppers:
            compress(p, p.with_suffix(".zf"), "lz4")
            zfiles.append(p.with_suffix(".zf"))
        (work / "base.zstd.zf").unlink()
        for p in zfiles + [img]:
            warm(p)

        t_cat = sh("cat", str(img))
        with open_stack(zfiles) as stack:
            t_seq = seq_read(stack, size)
        rows.append(("3-layer zfile seq read", t_seq, t_cat, "cat"))

        rng3 = random.Random(3)  # one generator: a fresh Random(3) per read would repeat one offset
        offsets = [rng3.randrange(0, size // 4096) * 4096 for _ in range(args.reads)]
        with LocalFile(img) as raw:
            t_raw = random_reads(raw.pread_into, offsets)
        with open_stack(zfiles) as stack:
            t_zrand = random_reads(stack.pread_into, offsets)
        rows.append(("random 4K reads zfile stack", t_zrand, t_raw, "preadv raw file"))
        for p in plain:
            warm(p)
        with open_stack(plain) as stack:
            t_urand = random_reads(stack.pread_into, offsets)
        rows.append(("random 4K reads plain stack", t_urand, t_raw, "preadv raw file"))

        rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        sizes = {p.name: p.stat().st_size for p in [base, *zfiles]}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    pyver = sys.version.split()[0]
    print(f"\nformat benchmark: {args.size_mib} MiB ext4 image, {args.reads} random reads, python {pyver}")
    print("| operation | ours (s) | reference | ref (s) | ratio | upstream | target <= | ok |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for name, ours, ref, ref_name in rows:
        ratio = ours / ref
        up = UPSTREAM.get(name)
        target = f"{1.5 * up:.2f}x" if up else "-"
        ok = ("yes" if ratio <= 1.5 * up else "NO") if up else "-"
        upstr = f"{up:.2f}x" if up else "-"
        print(f"| {name} | {ours:.3f} | {ref_name} | {ref:.3f} | {ratio:.2f}x | {upstr} | {target} | {ok} |")
    reads_per_s = args.reads / t_urand
    zreads_per_s = args.reads / t_zrand
    print(
        f"\nrandom 4K reads/s: plain stack {reads_per_s:,.0f} (target >= 100,000), "
        f"zfile stack {zreads_per_s:,.0f}, raw file {args.reads / t_raw:,.0f}"
    )
    print(f"peak RSS: ours {rss_self:.0f} MiB, reference tools {rss_children:.0f} MiB")
    print_scaling(scaling, serial)
    print(f"load average before/after the scaling runs: {load0[0]:.2f} / {load1[0]:.2f}")
    print("file sizes: " + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
