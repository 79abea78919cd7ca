"""TCMU command path per core: the daemon's own command loop behind a simulated UIO device.

The "kernel" (`overlaybd.tcmu.uio_sim.SimKernel`) runs in a forked child process: it writes
commands into a real shared mmap laid out as target_core_user.h lays it out (mailbox, ring, data
area), signals the daemon through a socketpair standing in for the uio fd, and consumes the
completions at cmd_tail. The parent runs the daemon's real `TcmuDevice` (poll thread, worker pool,
`Ring`, `ScsiDisk`, the image opened by `open_image` from a config.v1.json), so the parent's CPU time
(`time.process_time`, its main thread only waits) is the daemon's CPU for the commands.

Images (built once, in --workdir): a committed layer (`committed`), a 3-layer uncompressed stack
(`stack`), the same 3 layers as lz4 ZFiles (`zfile`), and a writable upper over the committed layer
(`rw`, for WRITE and UNMAP). Workloads: READ(10) and READ(16) of 4 KiB and 128 KiB at random
LBAs, WRITE(10) 4 KiB, UNMAP of 4 KiB ranges; queue depth --qd (128 KiB ones: as many as the 4 MiB
data area holds). A sample of read completions (every --check-every-th) is compared with the
expected bytes in the kernel process. Reports commands/s and MB/s per daemon CPU second ("per core"),
wall-clock commands/s, and daemon CPU per command. Not run by the tests (tests/tcmu/test_uio_sim.py
runs the same loop for a few hundred commands and checks every byte).

Usage: .venv/bin/python bench/tcmu.py [--size-mib 256] [--commands 100000] [--qd 32] [--workdir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from overlaybd.format import lsmt, zfile
from overlaybd.format.atomic import AtomicOutput
from overlaybd.format.fileio import LocalFile
from overlaybd.image import open_image
from overlaybd.tcmu import uio_sim
from overlaybd.tcmu.backstore import TcmuDevice
from overlaybd.tcmu.scsi import DeviceInfo, ScsiDisk

MiB = 1 << 20
BLOCK = 512
# the simulated kernel and the daemon share one mmap object, so the daemon's UioDevice.close cannot
# unmap it and warns once per run; not a leak here (the bench closes both)
logging.getLogger("overlaybd.tcmu.backstore").setLevel(logging.ERROR)


def _fill(rng: random.Random, n: int) -> bytes:
    """Half random, half text-like bytes (lz4 gets ~2x on it, like a mixed root file system)."""
    words = [rng.randbytes(rng.randrange(3, 9)).hex().encode() for _ in range(256)]
    out = bytearray()
    while len(out) < n:
        if rng.random() < 0.5:
            out += rng.randbytes(16384)
        else:
            out += b" ".join(rng.choice(words) for _ in range(2000))[:16384]
    return bytes(out[:n])


def build(work: Path, size: int) -> dict[str, Path]:
    """Layers, their ZFiles, the expected disk bytes and the configs; reused when present."""
    disk, disk0 = work / "disk.raw", work / "disk0.raw"  # expected bytes: all three layers / L0 alone
    names = ["L0", "L1", "L2"]
    if not disk.exists() or not disk0.exists():
        print(f"building {size // MiB} MiB layers in {work} ...", file=sys.stderr)
        rng = random.Random(5)
        expect = bytearray(size)
        parent = None
        for i, name in enumerate(names):
            data, index = work / f"{name}.data", work / f"{name}.index"
            with lsmt.create_rw(data, index, size, parent_uuid=parent) as rw:
                if i == 0:
                    for off in range(0, size, 4 * MiB):
                        chunk = _fill(rng, 4 * MiB)
                        rw.pwrite(chunk, off)
                        expect[off : off + len(chunk)] = chunk
                else:
                    piece = _fill(rng, 64 * 1024)
                    for _ in range(int(size * (0.10 if i == 1 else 0.05)) // 16384):
                        n = rng.choice((4096, 16384, 65536))
                        off = rng.randrange(0, size - n, 4096)
                        rw.pwrite(piece[:n], off)
                        expect[off : off + n] = piece[:n]
                if i == 0:
                    disk0.write_bytes(expect)
                with AtomicOutput(work / f"{name}.commit") as f:
                    lsmt.commit(rw, f, uuid=rw.uuid)
                parent = rw.uuid
            data.unlink()
            index.unlink()
            with LocalFile(work / f"{name}.commit") as src, AtomicOutput(work / f"{name}.zf") as out:
                zfile.compress(src, out, algorithm="lz4", block_size=4096, verify=True, threads=1)
        disk.write_bytes(expect)
    commits = [str(work / f"{n}.commit") for n in names]
    zfs = [str(work / f"{n}.zf") for n in names]
    cfgs = {
        "committed": {"lowers": [{"file": commits[0]}]},
        "stack": {"lowers": [{"file": p} for p in commits]},
        "zfile": {"lowers": [{"file": p} for p in zfs]},
    }
    paths = {"disk": disk, "disk0": disk0}
    for key, cfg in cfgs.items():
        p = work / f"{key}.config.v1.json"
        p.write_text(json.dumps(cfg))
        paths[key] = p
    return paths


def fresh_rw_config(work: Path, size: int) -> Path:
    """A writable upper (new each run) over the committed base layer."""
    data, index = work / "upper.data", work / "upper.index"
    for p in (data, index):
        if p.exists():
            p.unlink()
    with lsmt.open_ro(LocalFile(work / "L0.commit")) as base:
        uuid = base.uuid
    lsmt.create_rw(data, index, size, parent_uuid=uuid).close()
    cfg = {"lowers": [{"file": str(work / "L0.commit")}], "upper": {"index": str(index), "data": str(data)}}
    p = work / "rw.config.v1.json"
    p.write_text(json.dumps(cfg))
    return p


WORKLOADS: dict[str, tuple[str, int]] = {  # name -> (opcode form, bytes)
    "READ(10) 4K": ("read10", 4096),
    "READ(16) 4K": ("read16", 4096),
    "READ(10) 128K": ("read10", 131072),
    "READ(16) 128K": ("read16", 131072),
    "WRITE(10) 4K": ("write10", 4096),
    "UNMAP 4K": ("unmap", 4096),
}


def kernel_side(
    sim: uio_sim.SimKernel, form: str, nbytes: int, n: int, qd: int, size: int, disk: Path, check_every: int
) -> dict[str, float]:
    """The simulated kernel's loop (in the child): keep `qd` commands queued, reap completions, check samples."""
    rng = random.Random(17)
    blocks = nbytes // BLOCK
    top = size // nbytes
    payload = bytes(range(256)) * (nbytes // 256)
    expect = open(disk, "rb") if form.startswith("read") else None  # noqa: SIM115 - closed by process exit
    bad = checked = errors = 0

    def on_done(cmd: uio_sim.SimCommand, data: memoryview) -> None:
        nonlocal bad, checked, errors
        if cmd.status:
            errors += 1
            return
        if expect is not None and cmd.tag is not None:
            checked += 1
            if os.pread(expect.fileno(), nbytes, int(cmd.tag)) != data[:nbytes]:
                bad += 1

    def make(i: int) -> tuple[bytes, int, bytes | None, object]:
        lba = rng.randrange(0, top) * blocks
        tag = lba * BLOCK if i % check_every == 0 else None
        if form == "read10":
            return uio_sim.read10(lba, blocks), nbytes, None, tag
        if form == "read16":
            return uio_sim.read16(lba, blocks), nbytes, None, tag
        if form == "write10":
            return uio_sim.write10(lba, blocks), nbytes, payload, None
        params = uio_sim.unmap_params([(lba, blocks)])
        return uio_sim.unmap(len(params)), len(params), params, None

    submitted = completed = 0
    t0 = time.perf_counter()
    while completed < n:
        queued = 0
        while submitted < n and len(sim.inflight) < qd:
            cdb, length, out, tag = make(submitted)
            if not sim.queue(cdb, length, out, tag):
                break
            submitted += 1
            queued += 1
        if queued:
            sim.notify()
        if not sim.wait_kick(30):
            raise TimeoutError(f"no completion for 30 s ({completed}/{n} done)")
        completed += sim.reap(on_done)
    wall = time.perf_counter() - t0
    return {"wall": wall, "checked": checked, "bad": bad, "errors": errors}


def run_one(config: Path, form: str, nbytes: int, n: int, qd: int, size: int, disk: Path, check: int) -> dict:
    sim = uio_sim.SimKernel(cmdr_size=1 << 20, data_size=4 << 20)
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the kernel
        code = 0
        try:
            os.close(go_w)
            os.close(res_r)
            os.read(go_r, 1)
            result = kernel_side(sim, form, nbytes, n, qd, size, disk, check)
            os.write(res_w, json.dumps(result).encode())
        except BaseException as e:  # report, never return into the parent's code
            os.write(res_w, json.dumps({"error": repr(e)}).encode())
            code = 1
        os._exit(code)
    os.close(go_r)
    os.close(res_w)
    image = open_image(str(config))
    disk_emu = ScsiDisk(image, DeviceInfo(max_transfer_blocks=2048))
    dev = TcmuDevice(sim.uio_device(), disk_emu)
    dev.start()
    time.sleep(0.05)
    c0 = time.process_time()
    os.write(go_w, b"g")
    raw = b""
    while chunk := os.read(res_r, 65536):
        raw += chunk
    cpu = time.process_time() - c0
    os.waitpid(pid, 0)
    dev.stop()
    image.close()
    sim.close()
    os.close(go_w)
    os.close(res_r)
    result = json.loads(raw)
    if "error" in result:
        raise RuntimeError(f"kernel side: {result['error']}")
    result["cpu"] = cpu
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--commands", type=int, default=100_000, help="commands per 4 KiB run (128 KiB: 1/8)")
    ap.add_argument("--qd", type=int, default=32, help="commands the kernel keeps queued")
    ap.add_argument("--runs", type=int, default=3, help="runs per cell; medians reported")
    ap.add_argument("--check-every", type=int, default=8, help="compare every Nth read with the expected bytes")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--files", help="keep the built layers in this dir and reuse them")
    ap.add_argument("--only", help="comma-separated image keys (committed,stack,zfile,rw)")
    ap.add_argument("--workloads", help="comma-separated workload names (default: all that apply)")
    args = ap.parse_args()
    size = args.size_mib * MiB
    keep = args.files is not None
    work = Path(args.files) if keep else Path(tempfile.mkdtemp(prefix="obd-tcmu-", dir=args.workdir))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    loads = [os.getloadavg()[0]]
    try:
        paths = build(work, size)
        images = (args.only or "committed,stack,zfile,rw").split(",")
        wanted = args.workloads.split(",") if args.workloads else list(WORKLOADS)
        for key in images:
            for wl in wanted:
                form, nbytes = WORKLOADS[wl]
                writes = form in ("write10", "unmap")
                if writes != (key == "rw"):
                    continue
                n = args.commands if nbytes <= 4096 else max(1000, args.commands // 8)
                qd = args.qd if nbytes <= 4096 else min(args.qd, 31)
                results = []
                for _ in range(args.runs):
                    config = fresh_rw_config(work, size) if key == "rw" else paths[key]
                    expected = paths["disk0"] if key in ("committed", "rw") else paths["disk"]
                    results.append(run_one(config, form, nbytes, n, qd, size, expected, args.check_every))
                    loads.append(os.getloadavg()[0])
                cpu = statistics.median(r["cpu"] for r in results)
                wall = statistics.median(r["wall"] for r in results)
                bad = sum(r["bad"] for r in results)
                errors = sum(r["errors"] for r in results)
                checked = sum(r["checked"] for r in results)
                rows.append((key, wl, n, qd, cpu, wall, nbytes, checked, bad, errors))
                print(f"  {key} {wl}: {n / cpu:,.0f} cmd/s per core", file=sys.stderr)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nTCMU command path, simulated UIO ring; {args.size_mib} MiB images, python {sys.version.split()[0]}")
    print(f"medians of {args.runs} runs; per core = per second of daemon CPU (process_time of the daemon process)")
    print(
        "| image | command | commands | qd | cmd/s per core | MB/s per core | cmd/s wall | us CPU/cmd "
        "| checked/bad/errors |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for key, wl, n, qd, cpu, wall, nbytes, checked, bad, errors in rows:
        print(
            f"| {key} | {wl} | {n} | {qd} | {n / cpu:,.0f} | {n * nbytes / cpu / 1e6:,.0f} | {n / wall:,.0f} | "
            f"{cpu / n * 1e6:.1f} | {checked}/{bad}/{errors} |"
        )
    print(f"load average (1 min) during the runs: {min(loads):.2f}-{max(loads):.2f}")
    return 1 if any(r[8] or r[9] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
