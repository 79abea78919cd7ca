#!/usr/bin/env python3
"""Layer conversion: the mounted path (FUSE + loop + mount, root) vs the userspace path (debugfs on
a sparse scratch image, no root), on the same image, in the same run.

The image is made from the host's own files (no network): layer 0 is a tar of host directories up
to --mib MiB of file data, layer 1 adds files, rewrites some, whites some out and marks a directory
opaque. Both paths convert it with the same options (vsize --vsize GiB, lz4, 4 KiB blocks); reported
per path: wall time (median of --runs), the committed layer sizes, and whether the two results hold
the same tree (compared entry by entry with tests/convert/treecmp.py after a loop mount).

Usage (root): .venv/bin/python bench/convert.py [--mib 200] [--vsize 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "python"))

SOURCES = ["/usr/lib/python3", "/usr/share/perl", "/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/share/doc"]


def host_layer(limit: int) -> bytes:
    """A PAX tar of host files (regular files, symlinks, directories) up to `limit` bytes of data."""
    buf = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for src in SOURCES:
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                if total >= limit:
                    break
                tf.add(dirpath, arcname=dirpath.lstrip("/"), recursive=False)
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.lstat(path)
                        tf.add(path, arcname=path.lstrip("/"), recursive=False)
                    except OSError:
                        continue
                    total += st.st_size if not os.path.islink(path) else 0
                    if total >= limit:
                        break
    return buf.getvalue()


def change_layer(base: bytes) -> bytes:
    """Layer 1: new files, rewrites, whiteouts and an opaque directory over layer 0's paths."""
    from convert import corpus

    with tarfile.open(fileobj=io.BytesIO(base)) as tf:
        names = [m.name for m in tf.getmembers() if m.isreg()]
        dirs = [m.name for m in tf.getmembers() if m.isdir()]
    t = corpus.Tar()
    for i, name in enumerate(names[::50]):
        t.file(name, os.urandom(4096 + i % 7 * 1000))
    for name in names[1::97]:
        t.whiteout(name)
    if len(dirs) > 3:
        t.dir(dirs[3]).opaque(dirs[3]).file(f"{dirs[3]}/only-this", b"x")
    t.dir("added")
    for i in range(200):
        t.file(f"added/f{i}", os.urandom(8192))
    return t.bytes()


def convert(src: Path, dst: Path, work: Path, userspace: bool, vsize: int) -> float:
    from overlaybd.convert.convertor import Options, convert_layout
    from overlaybd.oci.layout import Layout

    shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    convert_layout(
        Layout(src), Layout(dst), "obd", opts=Options(vsize_gb=vsize, userspace=userspace), work_dir=str(work)
    )
    return time.perf_counter() - t0


def tree(layout_dir: Path, scratch: Path) -> dict:
    from convert.test_userspace import _flatten, _nows, tree_without_lost_found
    from overlaybd.oci.layout import Layout

    raw = _flatten(Layout(layout_dir), scratch / f"{layout_dir.name}.raw")
    mnt = scratch / f"mnt-{layout_dir.name}"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop,ro,noload", raw, str(mnt)], check=True)
    try:
        return _nows(tree_without_lost_found(mnt, 0))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        os.unlink(raw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=200, help="file data in layer 0 (MiB)")
    ap.add_argument("--vsize", type=int, default=64, help="virtual size (GiB)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/convert.py: root needed (the mounted path mounts)", file=sys.stderr)
        return 1
    from convert.treecmp import diff
    from helpers.oci_images import write_layout
    from overlaybd.oci.layout import Layout

    base = Path(tempfile.mkdtemp(prefix="obd-bench-convert-", dir="/var/tmp"))
    try:
        l0 = host_layer(args.mib << 20)
        layers = [l0, change_layer(l0)]
        write_layout(base / "src", "localhost/bench/convert:1", layers)
        print(f"image: 2 layers, {len(l0) >> 20} MiB + {len(layers[1]) >> 20} MiB of tar, vsize {args.vsize} GiB")
        results = {}
        for kind, flag in (("mounted", False), ("userspace", True)):
            times = [
                convert(base / "src", base / kind, base / f"work-{kind}", flag, args.vsize) for _ in range(args.runs)
            ]
            img = Layout(base / kind).source("obd")
            sizes = [ly["size"] for ly in img.manifest["layers"]]
            results[kind] = times
            print(
                f"{kind:9s}: median {statistics.median(times):6.2f} s (runs {', '.join(f'{t:.2f}' for t in times)}),"
                f" layers {', '.join(f'{s / 2**20:.1f}' for s in sizes)} MiB"
            )
        same = diff(tree(base / "userspace", base), tree(base / "mounted", base))
        ratio = statistics.median(results["mounted"]) / statistics.median(results["userspace"])
        print(f"userspace/mounted speed-up: {ratio:.2f}x; trees identical: {not same}")
        if same:
            print(same)
            return 1
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
