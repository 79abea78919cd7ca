"""Readiness through sd_notify (units are Type=notify): READY=1 only once the daemon really serves.

A real AF_UNIX datagram socket stands in for systemd's notify socket (the protocol is one datagram of
KEY=VALUE lines); the daemons are the real processes. On READY=1 the snapshotter's gRPC socket must
accept a connection and overlaybd-tcmu's FUSE control socket must answer, with no waiting.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from overlaybd.host import sd_notify

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(60)
    yield s
    s.close()


def test_notify_sends_one_datagram(notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    assert sd_notify.ready("serving x")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving x"
    assert sd_notify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"obd-notify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify.notify("READY=1")
        assert s.recv(100) == b"READY=1"


def test_without_systemd_it_is_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd_notify.ready()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    assert not sd_notify.ready()  # a vanished socket never breaks the daemon


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_snapshotter_is_ready_only_when_its_socket_accepts(tmp_path: Path, notify_socket: socket.socket) -> None:
    address = tmp_path / "sn" / "overlaybd.sock"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"root": str(tmp_path / "root"), "address": str(address)}))
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()}
    cmd = [str(VENV_BIN / "overlaybd-snapshotter"), str(cfg), "--fuse-socket", str(tmp_path / "no-frontend.sock")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        msg = notify_socket.recv(4096).decode()
        assert msg.startswith("READY=1") and str(address) in msg
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(address))  # no retry: READY=1 promised it
        proc.send_signal(signal.SIGTERM)
        assert notify_socket.recv(4096) == b"STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        _stop(proc)


@pytest.mark.root  # the FUSE frontend sweeps loop devices and FUSE mounts of its run dir
def test_tcmu_daemon_is_ready_only_when_its_frontend_answers(tmp_path: Path, notify_socket: socket.socket) -> None:
    from overlaybd.fuse import control

    svc = tmp_path / "overlaybd.json"
    svc.write_text(json.dumps({"logConfig": {"logPath": str(tmp_path / "overlaybd.log"), "logLevel": 1}}))
    sock = tmp_path / "fuse.sock"
    cmd = [str(VENV_BIN / "overlaybd-tcmu"), str(svc), "--frontend", "fuse", "--fuse-socket", str(sock)]
    cmd += ["--fuse-run-dir", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env={**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()})
    try:
        assert notify_socket.recv(4096).startswith(b"READY=1\nSTATUS=serving images through FUSE")
        try:  # an answer (ok, or an error for a device never attached), not a refused connection
            control.request({"op": "detach", "dev_id": "never-attached"}, str(sock))
        except RuntimeError as e:
            assert "never-attached" in str(e) or "detach" in str(e)
        proc.send_signal(signal.SIGTERM)
        assert notify_socket.recv(4096) == b"STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        _stop(proc)
