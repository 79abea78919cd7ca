"""build.sh argument checks and sysext/buildtool.py (glibc check, extension-release, listing): fast, no image."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.sysext import BUILD_SH, REPO, run

sys.path.insert(0, str(REPO / "sysext"))
import buildtool


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--flatcar-version is required"),
        (["--flatcar-version", "4593.2"], "'4593.2' is not MAJOR.MINOR.PATCH"),
        (["--flatcar-version", "4593.2.5", "--arch", "riscv64"], "--arch: 'riscv64' is not x86-64 or arm64"),
        (["--flatcar-version", "4593.2.5", "--format", "ext4"], "--format: 'ext4' is not erofs or squashfs"),
        (["--bogus"], "unknown argument: --bogus"),
    ],
)
def test_build_sh_rejects_bad_arguments(args: list[str], message: str, tmp_path: Path) -> None:
    res = run([str(BUILD_SH), *args, "--out", str(tmp_path / "out")], timeout=60)
    assert res.returncode != 0
    assert message in res.stderr
    assert not (tmp_path / "out").exists(), "nothing may be built after an argument error"


def test_print_key_depends_on_options() -> None:
    a = run([str(BUILD_SH), "--print-key", "--flatcar-version", "4593.2.5"], timeout=60).stdout
    b = run([str(BUILD_SH), "--print-key", "--flatcar-version", "4593.2.6"], timeout=60).stdout
    c = run([str(BUILD_SH), "--print-key", "--flatcar-version", "4593.2.5"], timeout=60).stdout
    assert len(a.strip()) == 64 and a == c and a != b


def test_extension_release_bodies() -> None:
    assert buildtool.extension_release("4593.2.5", "x86-64", False) == (
        "ID=flatcar\nVERSION_ID=4593.2.5\nARCHITECTURE=x86-64\nEXTENSION_RELOAD_MANAGER=1\nSYSEXT_ID=flatcar-overlaybd\n"
    )
    assert buildtool.extension_release(None, "arm64", True) == (
        "ID=flatcar\nSYSEXT_LEVEL=1.0\nARCHITECTURE=arm64\nEXTENSION_RELOAD_MANAGER=1\nSYSEXT_ID=overlaybd\n"
    )
    with pytest.raises(buildtool.BuildError, match="ARCHITECTURE 'i386'"):
        buildtool.extension_release("4593.2.5", "i386", False)
    with pytest.raises(buildtool.BuildError, match="VERSION_ID '4593'"):
        buildtool.extension_release("4593", "x86-64", False)


def test_glibc_required_reads_elf_version_needs(tmp_path: Path) -> None:
    shutil.copy2(sys.executable, tmp_path / "py")
    shutil.copy2("/bin/true", tmp_path / "true")
    (tmp_path / "script.sh").write_text("#!/bin/sh\n")
    need, where = buildtool.glibc_required(tmp_path)
    assert where is not None and where.parent == tmp_path
    assert buildtool.version_tuple(need) >= (2, 2)
    # The maximum must match what objdump itself reports for the two ELF files.
    out = subprocess.run(
        ["objdump", "-p", str(tmp_path / "py"), str(tmp_path / "true")], check=True, capture_output=True
    ).stdout
    versions = [buildtool.version_tuple(m.group(1).decode()) for m in buildtool.GLIBC_RE.finditer(out)]
    assert buildtool.version_tuple(need) == max(versions)


def test_glibc_check_fails_when_target_is_older(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy2("/bin/true", tmp_path / "true")
    need, _ = buildtool.glibc_required(tmp_path)
    assert buildtool.main(["glibc-check", str(tmp_path), "--flatcar-version", "4593.2.5", "--target-glibc", need]) == 0
    assert buildtool.main(["glibc-check", str(tmp_path), "--flatcar-version", "4593.2.5", "--target-glibc", "2.1"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'true'}: requires GLIBC_{need} but Flatcar 4593.2.5 ships glibc 2.1" in err


def test_glibc_table_lookup(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    table.write_text("# comment\n4593\t2.41\n4593.9.9 2.99\n")
    assert buildtool.target_glibc("4593.2.5", table) == "2.41"
    assert buildtool.target_glibc("4593.9.9", table) == "2.99"
    with pytest.raises(buildtool.BuildError, match=r"t.tsv: no glibc known for Flatcar 1234.0.0"):
        buildtool.target_glibc("1234.0.0", table)
    table.write_text("4593 2.41 extra\n")
    with pytest.raises(buildtool.BuildError, match=r"t.tsv:1: expected 'release glibc'"):
        buildtool.target_glibc("4593.2.5", table)
    # The shipped table covers the Makefile's default release.
    assert buildtool.target_glibc("4593.2.5", REPO / "sysext/flatcar-glibc.tsv")


def test_normalize_fixes_modes_and_times(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "usr/d").mkdir(parents=True)
    (root / "usr/d").chmod(0o700)
    (root / "usr/x").write_text("x")
    (root / "usr/x").chmod(0o775)
    (root / "usr/f").write_text("f")
    (root / "usr/f").chmod(0o664)
    (root / "usr/s").write_text("s")
    (root / "usr/s").chmod(0o600)
    (root / "usr/l").symlink_to("f")
    buildtool.main(["normalize", str(root), "1234"])
    modes = {p.name: p.lstat().st_mode & 0o7777 for p in (root / "usr").iterdir() if not p.is_symlink()}
    assert modes == {"d": 0o755, "x": 0o755, "f": 0o644, "s": 0o600}
    assert {p.lstat().st_mtime for p in root.rglob("*")} == {1234}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flatcar-version", "4593.2.5", "--sysext-level", "--payload-key", "/etc/hostname"], "not --sysext-level"),
        (["--flatcar-version", "4593.2.5", "--payload-key", "/nonexistent.pem"], "is not a readable file"),
        (["--flatcar-version", "4593.2.5", "--payload-key", "/etc/hostname"], "not a usable RSA private key"),
        (["--flatcar-version", "4593.2.5", "--payload-key", "/etc/hostname", "--no-payload"], "exclude each other"),
        (["--flatcar-version", "4593.2.5", "--sysext-version", "1.0"], "--sysext-version needs --sysext-level"),
        (["--flatcar-version", "4593.2.5", "--sysupdate-url", "http://x/"], "--sysupdate-url needs --sysext-level"),
        (["--flatcar-version", "4593.2.5", "--sysext-level", "--sysext-version", "1_0"], "is not a version"),
        (["--flatcar-version", "4593.2.5", "--sysext-level", "--sysupdate-url", "ftp://x/"], "is not an http(s) URL"),
    ],
)
def test_build_sh_rejects_bad_release_options(args: list[str], message: str, tmp_path: Path) -> None:
    res = run([str(BUILD_SH), *args, "--out", str(tmp_path / "out")], timeout=60)
    assert res.returncode != 0 and message in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_print_key_depends_on_payload_key_and_route(tmp_path: Path) -> None:
    def key(*extra: str) -> str:
        res = run([str(BUILD_SH), "--print-key", "--flatcar-version", "4593.2.5", *extra], timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    for name in ("a.pem", "b.pem"):
        assert buildtool.main(["gen-key", str(tmp_path / name)]) == 0
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    keys = [
        key(),
        key("--no-payload"),
        key("--payload-key", str(tmp_path / "a.pem")),
        key("--payload-key", str(tmp_path / "b.pem")),
        key("--sysext-level"),
        key("--sysext-level", "--sysext-version", "9.9"),
        key("--sysext-level", "--sysupdate-url", "http://other/"),
    ]
    assert len(set(keys)) == len(keys)
    assert key("--payload-key", str(tmp_path / "a.pem")) == keys[2]


def test_sysext_level_extension_release() -> None:
    assert buildtool.extension_release(None, "x86-64", True, "0.2.0") == (
        "ID=flatcar\nSYSEXT_LEVEL=1.0\nARCHITECTURE=x86-64\nEXTENSION_RELOAD_MANAGER=1\nSYSEXT_ID=overlaybd\n"
        "SYSEXT_VERSION_ID=0.2.0\n"
    )
    assert buildtool.sysext_id(True) == "overlaybd" and buildtool.sysext_id(False) == "flatcar-overlaybd"


def test_sha256sums_lists_every_version(tmp_path: Path) -> None:
    (tmp_path / "overlaybd_0.2.0_x86-64.raw").write_bytes(b"b")
    (tmp_path / "overlaybd_0.1.0_x86-64.raw").write_bytes(b"a")
    (tmp_path / "flatcar-overlaybd.raw").write_bytes(b"c")
    assert buildtool.main(["sha256sums", str(tmp_path), "overlaybd_*_*.raw"]) == 0
    import hashlib

    assert (tmp_path / "SHA256SUMS").read_text() == (
        f"{hashlib.sha256(b'a').hexdigest()}  overlaybd_0.1.0_x86-64.raw\n"
        f"{hashlib.sha256(b'b').hexdigest()}  overlaybd_0.2.0_x86-64.raw\n"
    )
    # The format sha256sum -c reads.
    res = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert buildtool.main(["sha256sums", str(tmp_path / "empty-nothing"), "x*"]) == 1
