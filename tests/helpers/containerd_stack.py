"""Test harness: a real containerd (temp root/state/socket) wired to a real overlaybd-snapshotter process,
the overlaybd daemon (FUSE frontend) and a loopback docker-registry. Used by the fixtures and bench/startup.py.

Everything started here is stopped in the finalizer even when the test fails: tasks and
containers are killed/deleted, containerd and the snapshotter terminated, then every mount and
loop device below the scratch dir is released before it is deleted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from overlaybd.host import loop
from overlaybd.host.mountinfo import mounts_under

from helpers.oci_images import busybox_layer, write_layout_tar
from helpers.wait import wait_for

VENV_BIN = Path(sys.executable).parent

IMAGE = "localhost/obdtest/busybox:1"


def release_below(path: str) -> None:
    """Unmount everything below `path` and detach loop devices backed by files below it.

    The loop devices are found first: once a FUSE file below `path` is unmounted, its loop device's
    backing file reads "/" and nothing would match it any more (they stayed attached, one per test).
    """
    loops = loop.devices_backed_by(path)
    for mp in mounts_under(path):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    for dev in loops:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def stop_process(p: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


class Stack:
    """containerd + overlaybd-snapshotter in one scratch dir."""

    def __init__(self, base: Path, snap_config: dict | None = None) -> None:
        self.base = base
        self.snap_root = base / "snap"
        self.snap_sock = base / "snap.sock"
        self.sock = base / "containerd.sock"
        self.fuse_sock = base / "fuse.sock"
        self.snap_cfg_path = base / "snapshotter.json"
        cfg = {"root": str(self.snap_root), "address": str(self.snap_sock), "verbose": "debug"}
        cfg.update(snap_config or {})
        self.snap_root = Path(cfg["root"])
        self.snap_cfg_path.write_text(json.dumps(cfg))
        self.containerd: subprocess.Popen | None = None
        self.snapshotter: subprocess.Popen | None = None
        self.extra: list[subprocess.Popen] = []

    # -- processes ------------------------------------------------------------------------------
    def start_snapshotter(self, env: dict | None = None) -> None:
        if self.snap_sock.exists():
            self.snap_sock.unlink()
        log = open(self.base / "snapshotter.log", "ab")
        self.snapshotter = subprocess.Popen(
            [str(VENV_BIN / "overlaybd-snapshotter"), str(self.snap_cfg_path), "--fuse-socket", str(self.fuse_sock)],
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
        )
        wait_for(lambda: self.snap_sock.exists() or self.snapshotter.poll() is not None, 30, "snapshotter socket")
        if self.snapshotter.poll() is not None:
            raise RuntimeError(f"snapshotter exited: {self.log('snapshotter')}")
        if self.containerd is not None and self.containerd.poll() is None:
            self.wait_containerd_reconnects()

    def wait_containerd_reconnects(self) -> None:
        """containerd redials a restarted proxy with gRPC backoff (max 3 s): probe until a Prepare gets through."""
        n = 0

        def probe() -> bool:
            nonlocal n
            n += 1
            key = f"probe-{uuid.uuid4().hex[:8]}"
            ok = self.ctr("snapshots", "--snapshotter", "overlaybd", "prepare", key, check=False).returncode == 0
            if ok:
                self.ctr("snapshots", "--snapshotter", "overlaybd", "rm", key, check=False)
            return ok

        wait_for(probe, 30, "containerd to reconnect to the snapshotter")

    def restart_snapshotter(self, env: dict | None = None) -> None:
        self.stop_snapshotter(signal.SIGKILL)
        self.start_snapshotter(env)

    def backend(self) -> list:
        """Every snapshot the snapshotter has (direct List, bypassing containerd's metadata)."""
        from overlaybd.containerd_api import snapshots_pb2 as pb

        stub, ch = self.snapshot_client()
        try:
            return [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]
        finally:
            ch.close()

    def snapshot_dirs(self) -> list[str]:
        d = self.snap_root / "snapshots"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []

    def kill_daemon(self) -> None:
        """SIGKILL the overlaybd daemon (its FUSE files die with it) and drop the dead FUSE mounts."""
        stop_process(self.daemon, signal.SIGKILL)
        if self.fuse_sock.exists():
            self.fuse_sock.unlink()
        release_below(str(self.base / "fuse"))

    def start_daemon(self) -> None:
        """overlaybd-tcmu with the FUSE frontend (this host has no TCMU), cache and logs in the scratch dir."""
        svc = {
            "logConfig": {"logPath": str(self.base / "overlaybd.log"), "logLevel": 1},
            "cacheConfig": {"cacheType": "file", "cacheDir": str(self.base / "cache"), "cacheSizeGB": 1},
            "credentialConfig": {"mode": "file", "path": str(self.base / "cred.json")},
            "enableAudit": False,
            "auditPath": str(self.base / "audit.log"),
        }
        (self.base / "cred.json").write_text('{"auths": {}}')
        (self.base / "overlaybd.json").write_text(json.dumps(svc))
        log = open(self.base / "daemon.log", "ab")
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "overlaybd.cli.tcmu",
                str(self.base / "overlaybd.json"),
                "--frontend",
                "fuse",
                "--fuse-socket",
                str(self.fuse_sock),
                "--fuse-run-dir",
                str(self.base / "fuse"),
            ],
            stdout=log,
            stderr=log,
        )
        self.extra.append(p)
        self.daemon = p
        wait_for(lambda: self.fuse_sock.exists() or p.poll() is not None, 30, "overlaybd daemon control socket")
        if p.poll() is not None:
            raise RuntimeError(f"overlaybd daemon exited: {self.log('daemon')}")

    def stop_snapshotter(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.snapshotter, sig)
        self.snapshotter = None

    def start_containerd(self) -> None:
        toml = f"""version = 2
root = "{self.base}/root"
state = "{self.base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.base}/opt"
[plugins."io.containerd.gc.v1.scheduler"]
  # GC only when a client asks for it (--sync): makes "unreferenced snapshot gone" deterministic.
  # startup_delay: containerd also collects once shortly after start; on a loaded machine that pass
  # could land in the middle of a test and remove its unreferenced ctr snapshots.
  mutation_threshold = 1000000
  deletion_threshold = 0
  startup_delay = "1h"
[proxy_plugins.overlaybd]
  type = "snapshot"
  address = "{self.snap_sock}"
"""
        (self.base / "containerd.toml").write_text(toml)
        log = open(self.base / "containerd.log", "ab")
        self.containerd = subprocess.Popen(
            ["containerd", "--config", str(self.base / "containerd.toml")], stdout=log, stderr=log
        )
        wait_for(
            lambda: self.sock.exists() and self.ctr("version", check=False).returncode == 0, 30, "containerd socket"
        )

    def log(self, which: str) -> str:
        p = self.base / f"{which}.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    # -- clients -------------------------------------------------------------------------------
    def ctr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(["ctr", "--address", str(self.sock), *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} failed ({r.returncode}): {r.stderr}\n"
                f"--- snapshotter log ---\n{self.log('snapshotter')}"
            )
        return r

    def gc(self) -> None:
        """Run containerd's garbage collector now (deleting a lease with --sync collects synchronously)."""
        out = self.ctr("leases", "create").stdout.split()
        self.ctr("leases", "delete", "--sync", out[0])

    def import_busybox(self, name: str = IMAGE) -> None:
        tar = self.base / "busybox-oci.tar"
        if not tar.exists():
            write_layout_tar(tar, self.base / "layout", name, [busybox_layer()])
        self.ctr("image", "import", "--snapshotter", "overlaybd", str(tar))

    def snapshot_client(self):
        """A direct gRPC client to the snapshotter socket (bypassing containerd)."""
        import grpc
        from overlaybd.containerd_api import snapshots_pb2_grpc

        ch = grpc.insecure_channel(f"unix://{self.snap_sock}")
        return snapshots_pb2_grpc.SnapshotsStub(ch), ch

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        if self.containerd is not None and self.containerd.poll() is None:
            tasks = self.ctr("task", "ls", "-q", check=False).stdout.split()
            for t in tasks:
                self.ctr("task", "kill", "-s", "SIGKILL", t, check=False)
            for t in tasks:
                for _ in range(50):
                    if self.ctr("task", "delete", t, check=False).returncode == 0:
                        break
                    time.sleep(0.1)
            for c in self.ctr("container", "ls", "-q", check=False).stdout.split():
                self.ctr("container", "rm", c, check=False)
        stop_process(self.containerd)
        self.stop_snapshotter()
        release_below(str(self.base / "snap"))  # device mounts before their devices go away
        for p in self.extra:
            stop_process(p)
        release_below(str(self.base))


def new_base() -> Path:
    return Path(tempfile.mkdtemp(prefix="obdsn-", dir="/tmp"))


class Registry:
    """docker-registry (distribution 2.8) on 127.0.0.1:<free port>, storage in a scratch dir."""

    def __init__(self, base: Path) -> None:
        import socket

        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            self.port = sk.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        cfg = base / "registry.yml"
        cfg.write_text(f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {base}/registry
  delete:
    enabled: true
http:
  addr: {self.host}
""")
        self.log = open(base / "registry.log", "ab")
        self.cfg = cfg
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        import urllib.request

        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.cfg)], stdout=self.log, stderr=self.log)

        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).status == 200
            except OSError:
                return False

        wait_for(up, 30, "docker-registry")

    def stop(self) -> None:
        stop_process(self.proc)

    def push_layout(self, layout: Path, name: str, repo: str) -> str:
        ref = f"{self.host}/{repo}"
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--quiet",
                "--preserve-digests",
                "--dest-tls-verify=false",
                f"oci:{layout}:{name}",
                f"docker://{ref}",
            ],
            check=True,
            capture_output=True,
        )
        return ref


RPULL = [sys.executable, "-m", "overlaybd.cli.rpull"]


def rpull(stack: Stack, ref: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`rpull` of `ref` into the stack's containerd over plain http; on failure the daemons' logs are shown."""
    r = subprocess.run(
        [*RPULL, "--address", str(stack.sock), "--plain-http", ref], capture_output=True, text=True, timeout=120
    )
    if check:
        assert r.returncode == 0, (
            f"{r.stderr}\n--- snapshotter ---\n{stack.log('snapshotter')}\n--- daemon ---\n{stack.log('daemon')}"
        )
    return r
