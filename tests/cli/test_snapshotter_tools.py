"""The snapshotter directory's tools (ctr, convertor, overlaybd-attacher) and rpull's credentials: flags and errors.

They run as real subprocesses through a symlink named like the shipped file, pointing at the multi-call
console script, so the argv[0] dispatch of the frozen bundle is what is tested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from overlaybd.config.service import load_service_config
from overlaybd.containerd_client.lazy_pull import UserCredential
from overlaybd.registry.client import RegistryClient
from overlaybd.registry.credentials import Credential

MULTICALL = Path(sys.executable).parent / "overlaybd"


@pytest.fixture
def snapdir(tmp_path: Path) -> Path:
    d = tmp_path / "snapshotter"
    d.mkdir()
    for name in ("ctr", "convertor", "overlaybd-attacher"):
        (d / name).symlink_to(MULTICALL)
    return d


def run(
    exe: Path, *args: object, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(exe), *map(str, args)], capture_output=True, timeout=timeout, env=e, stdin=subprocess.DEVNULL
    )


# ------------------------------------------------------------------------------------------- ctr


def test_ctr_version_and_help(snapdir: Path) -> None:
    assert run(snapdir / "ctr", "--version").stdout.startswith(b"ctr (overlaybd rpull) ")
    r = run(snapdir / "ctr", "--help")
    assert r.returncode == 0 and b"rpull [-u USER[:PASS]] [--plain-http]" in r.stdout


def test_ctr_hands_other_commands_to_the_system_ctr(snapdir: Path, tmp_path: Path) -> None:
    other = tmp_path / "sysbin"
    other.mkdir()
    fake = other / "ctr"
    fake.write_text('#!/bin/sh\necho "system ctr: $*"\nexit 7\n')
    fake.chmod(0o755)
    path = f"{snapdir}:{other}"  # our own ctr comes first on PATH and is skipped
    r = run(snapdir / "ctr", "-n", "k8s.io", "images", "ls", "-q", env={"PATH": path})
    assert r.returncode == 7 and r.stdout == b"system ctr: -n k8s.io images ls -q\n"
    r = run(snapdir / "ctr", "images", "ls", env={"PATH": str(snapdir)})
    assert r.returncode == 1 and b"no system ctr found on PATH" in r.stderr and b"'images'" in r.stderr


def test_ctr_rpull_flags_and_errors(snapdir: Path, tmp_path: Path) -> None:
    ctr = snapdir / "ctr"
    r = run(ctr, "rpull")
    assert r.returncode == 2 and b"ctr rpull" in r.stderr and b"ref" in r.stderr
    r = run(ctr, "rpull", "-u", "alice", "127.0.0.1:1/app:1")  # no password, stdin not a terminal
    assert r.returncode == 1 and b"no password given" in r.stderr
    svc = tmp_path / "overlaybd.json"
    svc.write_text("{}")
    args = ["--service_config_path", svc, "--plain-http", "-u", "alice:pw", "127.0.0.1:1/app:1"]
    r = run(ctr, "-a", tmp_path / "none.sock", "rpull", *args)
    assert r.returncode == 1 and r.stderr.startswith(b"ctr rpull: 127.0.0.1:1/app:1: cannot fetch manifest")
    assert b"pw" not in r.stderr
    r = run(Path(sys.executable).parent / "rpull", *args)  # the rpull tool takes the same flags
    assert r.returncode == 1 and r.stderr.startswith(b"rpull: 127.0.0.1:1/app:1: cannot fetch manifest")


def test_rpull_credentials_as_the_daemons_read_them(tmp_path: Path) -> None:
    cred = tmp_path / "cred.json"
    cred.write_text(json.dumps({"auths": {"reg.example": {"username": "bob", "password": "b0b"}}}))
    svc = tmp_path / "overlaybd.json"
    svc.write_text(json.dumps({"credentialConfig": {"mode": "file", "path": str(cred)}}))
    client = RegistryClient(load_service_config(str(svc)))
    url = "https://reg.example/v2/app/manifests/1"
    assert client.credentials.lookup(url) == Credential("bob", "b0b")
    client.credentials = UserCredential("reg.example", Credential("alice", "pw"), client.credentials)
    assert client.credentials.lookup(url) == Credential("alice", "pw")  # -u wins for the image's registry
    assert client.credentials.lookup("https://other.example/v2/x/blobs/sha256:1") is None


# ------------------------------------------------------------------------------------- convertor


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-r", "reg/app"], b"one of input-tag [-i] or input-digest [-g] is required"),
        (["-r", "reg/app", "-i", "1"], b"output-tag is required"),
        (["-r", "reg/app", "-i", "1", "--fastoci", "f"], b"TurboOCI images are not supported"),
        (["-r", "reg/app", "-i", "1", "--turboOCI", "f"], b"TurboOCI images are not supported"),
        (["-r", "reg/app", "-i", "1", "-o", "2", "--db-str", "x", "--db-type", "mysql"], b"not supported"),
        (["-r", "reg/app", "-i", "1", "-o", "2", "--referrer"], b"--referrer"),
        (["-r", "reg/app", "-i", "1", "-o", "2", "--root-ca", "ca.pem"], b"--cert-dir"),
        (["-r", "reg/app", "-i", "1", "-o", "2", "--fstype", "xfs"], b"only ext4"),
        (["-r", "reg/app", "-i", "1", "-o", "2", "--vsize", "0"], b"--vsize"),
    ],
)
def test_convertor_refusals(snapdir: Path, flags: list[str], message: bytes) -> None:
    r = run(snapdir / "convertor", *flags)
    assert r.returncode == 1 and message in r.stderr and r.stderr.startswith(b"convertor: ")


def test_convertor_usage(snapdir: Path, tmp_path: Path) -> None:
    r = run(snapdir / "convertor", "-i", "1", "-o", "2")
    assert r.returncode == 2 and b"-r/--repository" in r.stderr
    r = run(snapdir / "convertor", "-r", "r/a", "-i", "1", "-o", "2", "--mkfs=maybe")
    assert r.returncode == 2 and b"invalid boolean" in r.stderr
    assert run(snapdir / "convertor", "--version").stdout.startswith(b"convertor ")
    work = tmp_path / "conv"
    r = run(
        snapdir / "convertor", "-r", "127.0.0.1:1/app", "-i", "1", "-o", "2", "--plain", "-u", "a:s3cr3t", "-d", work
    )
    assert r.returncode == 1 and b"convertor: " in r.stderr and b"127.0.0.1:1/app:1" in r.stderr
    assert b"s3cr3t" not in r.stderr and not work.exists()  # temp data removed, password never shown


def test_convertor_registry_roundtrip(snapdir: Path, tmp_path: Path) -> None:
    """convertor -r REPO -i TAG -o TAG against a real registry: Docker v2 by default, UUIDs, pushed."""
    from helpers.oci_images import busybox_layer, files_layer, write_layout
    from helpers.registry import Registry, need_tools

    need_tools()
    reg = Registry(tmp_path / "registry")
    try:
        src = tmp_path / "src"
        write_layout(src, "app:1", [busybox_layer(), files_layer({"etc/x": b"x\n"})])
        repo = f"{reg.host}/conv/app"
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{src}:1", f"docker://{repo}:1"],
            check=True,
            capture_output=True,
        )
        r = run(
            snapdir / "convertor", "-r", repo, "-i", "1", "-o", "1_obd", "--plain", "-d", tmp_path / "w", timeout=600
        )
        assert r.returncode == 0, r.stderr
        m = RegistryClient().get_manifest(f"{repo}:1_obd", scheme="http")
        assert m.media_type == "application/vnd.docker.distribution.manifest.v2+json"
        assert len(m.layers) == 2
        for ly in m.layers:
            assert ly["annotations"]["containerd.io/snapshot/overlaybd/blob-digest"] == ly["digest"]
    finally:
        reg.close()


# ---------------------------------------------------------------------------- overlaybd-attacher


def test_attacher_flags_and_errors(snapdir: Path, tmp_path: Path) -> None:
    att = snapdir / "overlaybd-attacher"
    assert run(att).returncode == 2
    r = run(att, "attach", "--config", "x")
    assert r.returncode == 2 and b"--id" in r.stderr
    r = run(att, "attach", "--id", "7", "--config", tmp_path / "missing.json")
    assert r.returncode == 1 and b"config file does not exist" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = run(att, "attach", "--id", "7", "--config", bad)
    assert r.returncode == 1 and b"invalid JSON config file" in r.stderr
    r = run(att, "attach", "--id", "../x", "--config", bad)
    assert r.returncode == 1 and b"--id" in r.stderr
    sock = tmp_path / "none.sock"
    if not Path("/sys/kernel/config/target/core").is_dir():  # no TCMU here: the FUSE frontend is asked
        cfg = tmp_path / "config.v1.json"
        cfg.write_text(json.dumps({"lowers": [], "resultFile": "result"}))
        (tmp_path / "result").write_text("failed: no layers")
        r = run(att, "attach", "--id", "7", "--config", cfg, "--fuse-socket", sock, timeout=120)
        assert r.returncode == 1 and b"after 5 attempts" in r.stderr and b"not reachable" in r.stderr
        assert b"failed: no layers" in r.stderr  # the reason from the config's resultFile
        r = run(att, "detach", "--id", "7", "--fuse-socket", sock)
        assert r.returncode == 1 and b"failed to detach device 7" in r.stderr
