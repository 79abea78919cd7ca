"""overlaybd-tcmu's FUSE frontend on the host (no TCMU here): the ext4 vector through FUSE + loop.

Real everything: the daemon's run() with its control socket, overlaybd.image.open_image on the
upstream-made LSMT vector, /dev/fuse, losetup, ext4, overlaybd-commit for the upper.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from pathlib import Path

import pytest
from helpers.fuse_standin import umount
from overlaybd.config.service import default_service_config
from overlaybd.daemon import main as daemon
from overlaybd.fuse import control

pytestmark = pytest.mark.root  # FUSE mount, loop devices

BLOB = bytes((7 * i + 3) & 255 for i in range(20000))
VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


@pytest.fixture
def fuse_daemon(tmp_path, host_blockdev, caplog):
    """The daemon in auto mode (falls back to FUSE on this kernel), stopped at the end."""
    caplog.set_level(logging.INFO, logger="overlaybd-tcmu")
    sock = str(tmp_path / "fuse.sock")
    ready, stop = threading.Event(), threading.Event()
    rc: list[int] = []
    t = threading.Thread(
        target=lambda: rc.append(
            daemon.run(
                default_service_config(),
                frontend="auto",
                fuse_socket=sock,
                fuse_run_dir=str(tmp_path / "run"),
                ready=ready,
                stop=stop,
            )
        ),
        daemon=True,
    )
    t.start()
    assert ready.wait(30)

    def stop_daemon():
        stop.set()
        t.join(30)
        assert rc == [0]

    host_blockdev.append(stop_daemon)
    return sock


def write_config(path: Path, lowers: list[str], upper: tuple[Path, Path] | None = None) -> Path:
    cfg = {"lowers": [{"file": f} for f in lowers], "resultFile": str(path.parent / "result")}
    if upper:
        cfg["upper"] = {"data": str(upper[0]), "index": str(upper[1])}
    path.write_text(json.dumps(cfg))
    return path


def attach(host_blockdev, sock, cfg: Path, dev_id: str, read_only: bool) -> dict:
    reply = control.request({"op": "attach", "config": str(cfg), "dev_id": dev_id, "read_only": read_only}, sock)
    host_blockdev.append(lambda: control.request({"op": "detach", "dev_id": dev_id}, sock))
    return reply


def attach_and_mount(host_blockdev, sock, cfg: Path, dev_id: str, mnt: Path, opts: str, read_only: bool):
    reply = attach(host_blockdev, sock, cfg, dev_id, read_only)
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "ext4", "-o", opts, reply["device"], str(mnt)], check=True)
    host_blockdev.append(lambda: umount(str(mnt)))
    return reply


def unwind(host_blockdev, n: int) -> None:
    for fn in reversed(host_blockdev[-n:]):
        fn()
    del host_blockdev[-n:]


def test_vector_readonly_mount_and_frontend_choice(tmp_path, fuse_daemon, host_blockdev, vectors, caplog):
    assert any("frontend: fuse" in r.getMessage() for r in caplog.get_records("setup"))
    cfg = write_config(tmp_path / "config.v1.json", [str(vectors / "ext4/ap.commit")])
    reply = attach(host_blockdev, fuse_daemon, cfg, "vec", True)
    assert (tmp_path / "result").read_text() == "success"
    # the loop device's bytes equal overlaybd-dump's (compared before mounting: a mount edits the
    # superblock buffer in the shared page cache even read-only)
    dump = tmp_path / "dump.img"
    subprocess.run([str(VENV_BIN / "overlaybd-dump"), str(cfg), str(dump)], check=True)
    r = subprocess.run(["cmp", str(dump), reply["device"]], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ext4", "-o", "ro,noload", reply["device"], str(mnt)], check=True)
    host_blockdev.append(lambda: umount(str(mnt)))
    assert (mnt / "etc/hello.txt").read_bytes() == b"hello overlaybd\n"
    assert (mnt / "bin/blob").read_bytes() == BLOB
    listing = control.request({"op": "list"}, fuse_daemon)["devices"]
    assert listing == {"vec": reply["device"]}


def test_bad_requests_get_clear_errors(tmp_path, fuse_daemon, vectors):
    with pytest.raises(RuntimeError, match="lowers"):
        bad = write_config(tmp_path / "bad.json", [str(tmp_path / "missing.commit")])
        control.request({"op": "attach", "config": str(bad), "dev_id": "x"}, fuse_daemon)
    assert (tmp_path / "result").read_text().startswith("failed:")
    with pytest.raises(RuntimeError, match="dev_id"):
        control.request({"op": "attach", "config": "/x", "dev_id": "../evil"}, fuse_daemon)
    with pytest.raises(RuntimeError, match="not attached"):
        control.request({"op": "detach", "dev_id": "nope"}, fuse_daemon)
    with pytest.raises(RuntimeError, match="unknown"):
        control.request({"op": "frobnicate"}, fuse_daemon)


def test_writable_upper_write_commit_reopen(tmp_path, fuse_daemon, host_blockdev, vectors):
    data, index = tmp_path / "upper.data", tmp_path / "upper.index"
    subprocess.run([str(VENV_BIN / "overlaybd-create"), str(data), str(index), "1"], check=True)
    lower = str(vectors / "ext4/ap.commit")
    cfg = write_config(tmp_path / "rw.json", [lower], (data, index))
    mnt = tmp_path / "mnt"
    attach_and_mount(host_blockdev, fuse_daemon, cfg, "rw", mnt, "rw,discard", False)
    payload = bytes(range(256)) * 4096
    (mnt / "etc/new.bin").write_bytes(payload)
    (mnt / "scratch.bin").write_bytes(payload * 4)
    subprocess.run(["sync"], check=True)
    (mnt / "scratch.bin").unlink()
    subprocess.run(["fstrim", str(mnt)], check=True)
    unwind(host_blockdev, 2)  # umount, detach (flushes the upper)
    commit = tmp_path / "upper.commit"
    subprocess.run([str(VENV_BIN / "overlaybd-commit"), str(data), str(index), str(commit)], check=True)
    cfg2 = write_config(tmp_path / "ro.json", [lower, str(commit)])
    attach_and_mount(host_blockdev, fuse_daemon, cfg2, "ro", mnt, "ro,noload", True)
    assert (mnt / "etc/new.bin").read_bytes() == payload
    assert (mnt / "etc/hello.txt").read_bytes() == b"hello overlaybd\n"
    assert not (mnt / "scratch.bin").exists()


def test_malformed_control_lines(fuse_daemon):
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(fuse_daemon)
        s.sendall(b'{not json\n[1, 2]\n{"op": "attach"}\n')
        lines = b""
        while lines.count(b"\n") < 3:
            lines += s.recv(4096)
    replies = [json.loads(x) for x in lines.splitlines()]
    assert [r["ok"] for r in replies] == [False, False, False]
    assert "not JSON" in replies[0]["error"] and "JSON object" in replies[1]["error"]
    assert "config" in replies[2]["error"]
