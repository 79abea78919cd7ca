"""Sysext figures: image size per format, build time, start-up time of every frozen tool.

Start-up is measured as `env -i <tool> --version` run from a freshly loop-mounted image (the first
run reads and decompresses the bundle from the image: "cold"; then the median of 5 runs: "warm"),
and compared with the same tool run from the source tree in this run's interpreter (reference).

usage: bench/sysext.py [--flatcar-version V] [--out DIR] [--no-build]   (root: loop mounts)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "flatcar-overlaybd"
SOURCE_MAIN = "import sys; from overlaybd.cli.multicall import main; sys.exit(main(sys.argv[1:]))"


def timed(cmd: list[str], **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=False, capture_output=True, **kw)
    return time.perf_counter() - t0


def build(out: Path, args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run([str(REPO / "build.sh"), *args, "--out", str(out)], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, res.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flatcar-version", default=os.environ.get("FLATCAR_VERSION", "4593.2.5"))
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="obd-bench-sysext-")))
    ap.add_argument("--no-build", action="store_true", help="use the images already in --out")
    args = ap.parse_args()
    out: Path = args.out
    base = ["--flatcar-version", args.flatcar_version]
    if not args.no_build:
        t_full, log = build(out, base)
        freeze = float(re.search(r"freeze ([\d.]+) s", log).group(1))
        print(f"build (freeze + erofs): {t_full:.1f} s, of which PyInstaller {freeze:.1f} s")
    bundle = out / "bundle"
    # squashfs from the same frozen bundle (no second PyInstaller run).
    (out / "sq").mkdir(exist_ok=True)
    subprocess.run(["rm", "-rf", str(out / "sq" / "bundle")], check=True)
    subprocess.run(["cp", "-a", str(bundle), str(out / "sq" / "bundle")], check=True)
    t_sq, _ = build(out / "sq", [*base, "--format", "squashfs", "--reuse-bundle"])
    print(f"squashfs image from the same bundle: {t_sq:.1f} s")
    du = int(subprocess.run(["du", "-sb", str(bundle)], check=True, capture_output=True, text=True).stdout.split()[0])
    erofs = (out / f"{NAME}.raw").stat().st_size
    squash = (out / "sq" / f"{NAME}.raw").stat().st_size
    mib = 1 << 20
    print(f"bundle (uncompressed): {du / mib:.1f} MiB")
    print(f"image erofs lz4hc:     {erofs / mib:.1f} MiB  ({erofs / du:.2f} of the bundle)")
    print(f"image squashfs zstd:   {squash / mib:.1f} MiB  ({squash / du:.2f} of the bundle)")

    mnt = Path(tempfile.mkdtemp(prefix="obd-bench-mnt-"))
    subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(out / f"{NAME}.raw"), str(mnt)], check=True)
    try:
        bindir = mnt / "usr/local/overlaybd/bin"
        print(f"{'tool':<24} {'cold s':>7} {'warm s':>7} {'source s':>8} {'warm/source':>11}")
        for tool in sorted(os.listdir(bindir)):
            cold = timed(["env", "-i", str(bindir / tool), "--version"])
            warm = statistics.median(timed(["env", "-i", str(bindir / tool), "--version"]) for _ in range(5))
            src_cmd = [sys.executable, "-c", SOURCE_MAIN, *([] if tool == "overlaybd" else [tool]), "--version"]
            src = statistics.median(timed(src_cmd) for _ in range(5))
            print(f"{tool:<24} {cold:7.3f} {warm:7.3f} {src:8.3f} {warm / src:11.2f}")
    finally:
        subprocess.run(["umount", "-d", str(mnt)], check=False)
        mnt.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
