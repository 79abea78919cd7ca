"""Container start-up: full `ctr pull` + overlayfs vs `rpull` + lazy overlaybd, and bytes fetched.

Builds a busybox image with a big incompressible file the container never reads, pushes the
plain OCI image and its overlaybd conversion to a loopback docker-registry behind a byte-counting
TCP proxy, then measures for each path: wall time from "nothing local" to the container's first
output, and bytes the registry sent. Prints absolute figures and the ratios overlaybd/overlayfs,
both measured in this same run (no fixed reference numbers).

    .venv/bin/python bench/startup.py [--size-mib 64] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from snapshotter.harness import Registry, Stack, new_base, release_below  # noqa: E402
from snapshotter.images import busybox_layer, files_layer, write_layout  # noqa: E402


class CountingProxy:
    """127.0.0.1:<port> -> registry; counts bytes flowing registry -> client."""

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
                u = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            threading.Thread(target=self._pipe, args=(c, u, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if count:
                    with self.lock:
                        self.sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take(self) -> int:
        with self.lock:
            n, self.sent = self.sent, 0
        return n


def timed_start(stack: Stack, pull: list[str], ref: str, name: str) -> float:
    t0 = time.monotonic()
    subprocess.run(pull, check=True, capture_output=True)
    out = stack.ctr("run", "--rm", "--snapshotter", "overlaybd", ref, name, "/bin/cat", "/etc/motd").stdout
    dt = time.monotonic() - t0
    assert "bench" in out, out
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=64, help="size of the never-read file in the image")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="obdbench-", dir="/tmp"))
    reg = Registry(work)
    proxy = CountingProxy(("127.0.0.1", reg.port))
    host = f"127.0.0.1:{proxy.port}"
    try:
        layers = [busybox_layer(), files_layer({"data/big.bin": os.urandom(args.size_mib << 20),
                                                "etc/motd": b"bench\n"})]
        write_layout(work / "oci", "oci", layers)
        t0 = time.monotonic()
        from overlaybd.cli.convert import main as convert_main

        assert convert_main([f"oci:{work / 'oci'}", f"oci:{work / 'obd'}:obd", "--vsize", "4",
                             "--work-dir", str(work)]) == 0
        conv = time.monotonic() - t0
        reg.push_layout(work / "oci", "oci", "bench/plain:1")
        reg.push_layout(work / "obd", "obd", "bench/obd:1")
        plain_ref, obd_ref = f"{host}/bench/plain:1", f"{host}/bench/obd:1"
        times: dict[str, list[float]] = {"overlayfs": [], "overlaybd": []}
        fetched: dict[str, list[int]] = {"overlayfs": [], "overlaybd": []}
        for i in range(args.runs):
            base = new_base()
            s = Stack(base, {"mirrorRegistry": [{"host": host, "insecure": True}]})
            try:
                s.start_daemon()
                s.start_snapshotter()
                s.start_containerd()
                proxy.take()
                ctr = ["ctr", "--address", str(s.sock)]
                times["overlayfs"].append(timed_start(
                    s, [*ctr, "image", "pull", "--plain-http", "--snapshotter", "overlaybd", plain_ref],
                    plain_ref, f"p{i}"))
                fetched["overlayfs"].append(proxy.take())
                rpull = [sys.executable, "-m", "overlaybd.cli.rpull", "--address", str(s.sock), "--plain-http"]
                times["overlaybd"].append(timed_start(s, [*rpull, obd_ref], obd_ref, f"o{i}"))
                fetched["overlaybd"].append(proxy.take())
            finally:
                s.close()
                release_below(str(base))
                shutil.rmtree(base, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        byt = {k: statistics.median(v) for k, v in fetched.items()}
        print(f"image: busybox + {args.size_mib} MiB never-read file; conversion took {conv:.1f}s; {args.runs} runs")
        print(f"{'path':<34}{'start (median s)':>18}{'bytes fetched':>16}")
        print(f"{'ctr pull + overlayfs fallback':<34}{med['overlayfs']:>18.2f}{int(byt['overlayfs']):>16,}")
        print(f"{'rpull + lazy overlaybd (FUSE)':<34}{med['overlaybd']:>18.2f}{int(byt['overlaybd']):>16,}")
        print(f"ratio overlaybd/overlayfs: time {med['overlaybd'] / med['overlayfs']:.2f}x, "
              f"bytes {byt['overlaybd'] / max(byt['overlayfs'], 1):.3f}x")
    finally:
        proxy.sock.close()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
