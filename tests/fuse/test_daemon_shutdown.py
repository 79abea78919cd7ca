"""Stopping overlaybd-tcmu (FUSE frontend) leaves no loop device and no mount behind (issue 10, "Leaks").

Real daemon process, real SIGTERM: images are attached through the control socket, one is left
mounted, one is detached while its file system is still busy; after the stop, `losetup -a` and
/proc/self/mountinfo show nothing of ours. Before the fix a busy loop device was only marked for
auto-clear while its FUSE file was unmounted lazily: it stayed attached with backing file "/".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers.fuse_standin import umount
from helpers.wait import wait_for
from overlaybd.fuse import control
from overlaybd.host import loop
from overlaybd.host.mountinfo import mounts_under

pytestmark = pytest.mark.root  # FUSE mount, loop devices

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def losetup_lines() -> set[str]:
    return set(subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout.splitlines())


@pytest.fixture
def daemon(tmp_path, host_blockdev):
    """overlaybd-tcmu --frontend fuse as its own process; killed (and swept) if a test leaves it running."""
    svc = tmp_path / "overlaybd.json"
    svc.write_text(json.dumps({"logConfig": {"logPath": str(tmp_path / "overlaybd.log"), "logLevel": 1}}))
    sock, run_dir = tmp_path / "fuse.sock", tmp_path / "run"
    cmd = [str(VENV_BIN / "overlaybd-tcmu"), str(svc), "--frontend", "fuse"]
    proc = subprocess.Popen([*cmd, "--fuse-socket", str(sock), "--fuse-run-dir", str(run_dir)])

    def cleanup() -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for mp in mounts_under(str(tmp_path)):
            umount(mp)
        for dev in loop.devices_backed_by(str(run_dir)):
            loop.detach(dev)

    host_blockdev.append(cleanup)
    wait_for(lambda: sock.exists() or proc.poll() is not None, 30, "the control socket")
    assert proc.poll() is None, "daemon exited at start"
    return proc, str(sock), run_dir


def attach(sock: str, cfg: Path, dev_id: str, read_only: bool) -> str:
    req = {"op": "attach", "config": str(cfg), "dev_id": dev_id, "read_only": read_only}
    return control.request(req, sock)["device"]


def config(tmp_path: Path, name: str, lowers: list[str], upper: tuple[Path, Path] | None = None) -> Path:
    cfg = {"lowers": [{"file": f} for f in lowers], "resultFile": str(tmp_path / f"{name}.result")}
    if upper:
        cfg["upper"] = {"data": str(upper[0]), "index": str(upper[1])}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def mount_ro(dev: str, mnt: Path) -> None:
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload", dev, str(mnt)], check=True)


def test_sigterm_detaches_every_loop_device_and_unmounts_everything(tmp_path, daemon, vectors):
    proc, sock, run_dir = daemon
    before = losetup_lines()
    lower = str(vectors / "ext4/ap.commit")
    ro = attach(sock, config(tmp_path, "ro", [lower]), "ro", True)
    data, index = tmp_path / "upper.data", tmp_path / "upper.index"
    subprocess.run([str(VENV_BIN / "overlaybd-create"), str(data), str(index), "1"], check=True)
    rw = attach(sock, config(tmp_path, "rw", [lower], (data, index)), "rw", False)
    mount_ro(ro, tmp_path / "mnt")  # still mounted when the daemon stops, as after a download-mode run
    ours = {ro, rw}
    assert loop.devices_backed_by(str(run_dir)) == sorted(ours)
    assert len(mounts_under(str(run_dir))) == 2

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0

    assert mounts_under(str(tmp_path)) == [], "a FUSE file or a file system on our loop device is still mounted"
    assert loop.devices_backed_by(str(run_dir)) == []
    leaked = [ln for ln in losetup_lines() - before if str(tmp_path) in ln or ln.split(":", 1)[0] in ours]
    assert leaked == [], leaked
    assert not os.path.exists(sock)


def test_detach_of_a_busy_device_waits_for_its_release(tmp_path, daemon, vectors):
    """A file system unmounted lazily while a file is open keeps the device: it is served until released."""
    proc, sock, run_dir = daemon
    dev = attach(sock, config(tmp_path, "busy", [str(vectors / "ext4/ap.commit")]), "busy", True)
    mnt = tmp_path / "mnt"
    mount_ro(dev, mnt)
    held = open(mnt / "etc/hello.txt", "rb")  # held open across the lazy unmount
    try:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
        assert control.request({"op": "detach", "dev_id": "busy"}, sock) == {"ok": True}
        assert control.request({"op": "list"}, sock)["devices"] == {}
        assert held.read() == b"hello overlaybd\n"  # still served: reads of the busy file system work
        assert loop.devices_backed_by(str(run_dir)) == [dev]
        with pytest.raises(RuntimeError, match="still in use"):
            attach(sock, config(tmp_path, "busy2", [str(vectors / "ext4/ap.commit")]), "busy", True)
    finally:
        held.close()
    wait_for(lambda: not loop.devices_backed_by(str(run_dir)), 15, "the loop device to be released")
    wait_for(lambda: not mounts_under(str(run_dir)), 15, "the FUSE file to be unmounted")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert mounts_under(str(tmp_path)) == []
