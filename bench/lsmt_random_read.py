"""Random 4 KiB reads through an uncompressed 3-layer LSMT stack vs raw os.preadv on a plain file.

Prints reads/s for both and the ratio (stack / raw), measured in the same run.
Usage: .venv/bin/python bench/lsmt_random_read.py [--reads N] [--vsize-mib M]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

from overlaybd.format import lsmt
from overlaybd.format.atomic import AtomicOutput
from overlaybd.format.fileio import LocalFile


def build_layer(tmp: str, i: int, vsize: int, rng: random.Random, parent: str | None) -> tuple[str, str]:
    data, index, out = (os.path.join(tmp, f"L{i}.{ext}") for ext in ("data", "index", "commit"))
    rw = lsmt.create_rw(data, index, vsize, parent_uuid=parent)
    chunk = os.urandom(1 << 20)
    if i == 0:  # the bottom layer covers the whole disk, so every read finds data somewhere
        for off in range(0, vsize, len(chunk)):
            rw.pwrite(chunk, off)
    for _ in range(vsize // (64 << 10)):
        length = rng.choice((4096, 8192, 32768, 65536))
        off = rng.randrange(0, vsize - length, 4096)
        rw.pwrite(chunk[:length], off)
    for _ in range(50):
        rw.discard(rng.randrange(0, vsize - 8192, 4096), 8192)
    with AtomicOutput(out) as f:
        lsmt.commit(rw, f, uuid=rw.uuid)
    uuid = rw.uuid
    rw.close()
    return out, uuid


def time_reads(read, offsets: list[int], buf: memoryview) -> float:
    t0 = time.perf_counter()
    for off in offsets:
        read(buf, off)
    return len(offsets) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reads", type=int, default=200_000)
    ap.add_argument("--vsize-mib", type=int, default=256)
    args = ap.parse_args()
    vsize = args.vsize_mib << 20
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths, parent = [], None
        for i in range(3):
            path, parent = build_layer(tmp, i, vsize, rng, parent)
            paths.append(path)
        layers = [lsmt.open_ro(LocalFile(p)) for p in paths]
        stack = lsmt.Stack(layers, check_order=True)
        raw_path = os.path.join(tmp, "raw")
        with open(raw_path, "wb") as f:
            f.write(os.urandom(1 << 20) * (vsize >> 20))
        raw = LocalFile(raw_path)
        offsets = [rng.randrange(0, vsize // 4096) * 4096 for _ in range(args.reads)]
        buf = memoryview(bytearray(4096))
        time_reads(stack.pread_into, offsets[:10000], buf)  # warm page cache
        time_reads(raw.pread_into, offsets[:10000], buf)
        entries = len(stack.mappings())
        s = time_reads(stack.pread_into, offsets, buf)
        upper = lsmt.create_rw(os.path.join(tmp, "up.data"), os.path.join(tmp, "up.index"), 0)
        for _ in range(1000):
            upper.pwrite(buf, rng.randrange(0, vsize // 4096) * 4096)
        with_upper = lsmt.Stack([lsmt.open_ro(LocalFile(p)) for p in paths], upper)
        u = time_reads(with_upper.pread_into, offsets, buf)
        with_upper.close()
        r = time_reads(raw.pread_into, offsets, buf)
        pre = time_reads(lambda b, o: os.preadv(raw.fd, [b], o), offsets, buf)
        print(f"stack: 3 layers, {entries} merged mappings, vsize {args.vsize_mib} MiB")
        print(f"stack.pread_into   {s:12,.0f} reads/s")
        print(f"+ RW upper (1000 writes) {u:6,.0f} reads/s")
        print(f"LocalFile.pread    {r:12,.0f} reads/s")
        print(f"bare os.preadv     {pre:12,.0f} reads/s")
        print(f"ratio stack/LocalFile = {s / r:.2f}, stack/os.preadv = {s / pre:.2f}")
        print(f"ratio stack with upper/LocalFile = {u / r:.2f}")
        stack.close()
        raw.close()


if __name__ == "__main__":
    main()
