"""The built image, loop-mounted read-only: layout, owners, modes, extension-release, units, tmpfiles."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
from helpers.sysext import BUILD_SH, FLATCAR_VERSION, NAME, REPO, Built, run

pytestmark = pytest.mark.sysext

BUNDLE = Path("usr/local/overlaybd")
EXPECTED_FILES = {
    "usr/lib/extension-release.d/extension-release.flatcar-overlaybd": 0o644,
    "usr/lib/systemd/system/overlaybd-tcmu.service": 0o644,
    "usr/lib/systemd/system/overlaybd-snapshotter.service": 0o644,
    "usr/lib/systemd/system/multi-user.target.d/10-overlaybd.conf": 0o644,
    "usr/lib/tmpfiles.d/10-overlaybd.conf": 0o644,
    "usr/lib/tmpfiles.d/10-overlaybd-snapshotter.conf": 0o644,
    "usr/local/overlaybd/overlaybd": 0o755,
    "usr/local/overlaybd/etc/overlaybd.json": 0o644,
    "usr/local/overlaybd/etc/cred.json": 0o600,
    "usr/local/overlaybd/snapshotter/etc/config.json": 0o644,
    "usr/local/overlaybd/baselayers/ext4_64": 0o644,
}
DAEMONS = ("overlaybd-tcmu", "overlaybd-snapshotter")


def parse_env_file(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v.strip("'\"")
    return out


def walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def test_only_usr_at_top_level(mounted: Path) -> None:
    assert sorted(os.listdir(mounted)) == ["usr"]
    assert not (mounted / "usr/lib/os-release").exists()


def test_extension_release_lockstep(mounted: Path) -> None:
    text = (mounted / f"usr/lib/extension-release.d/extension-release.{NAME}").read_text()
    arch = {"x86_64": "x86-64", "aarch64": "arm64"}[os.uname().machine]
    assert parse_env_file(text) == {
        "ID": "flatcar",
        "VERSION_ID": FLATCAR_VERSION,
        "ARCHITECTURE": arch,
        "EXTENSION_RELOAD_MANAGER": "1",
        "SYSEXT_ID": NAME,
    }


def test_every_path_is_root_owned_with_sane_modes(mounted: Path) -> None:
    bad = []
    for p in walk(mounted):
        st = p.lstat()
        if (st.st_uid, st.st_gid) != (0, 0):
            bad.append(f"{p}: owner {st.st_uid}:{st.st_gid}")
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode) and mode != 0o755:
            bad.append(f"{p}: dir mode {mode:o}")
        elif stat.S_ISREG(st.st_mode) and mode not in (0o644, 0o755, 0o600):
            bad.append(f"{p}: file mode {mode:o}")
        elif not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            bad.append(f"{p}: special file")
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
            bad.append(f"{p}: setuid/setgid/sticky")
    assert not bad, "\n".join(bad[:20])


def test_expected_files_and_modes(mounted: Path) -> None:
    for rel, mode in EXPECTED_FILES.items():
        st = (mounted / rel).lstat()
        assert stat.S_ISREG(st.st_mode), rel
        assert stat.S_IMODE(st.st_mode) == mode, f"{rel}: {stat.S_IMODE(st.st_mode):o} != {mode:o}"


def test_bin_has_one_relative_symlink_per_tool(mounted: Path, tools: list[str]) -> None:
    bindir = mounted / BUNDLE / "bin"
    assert sorted(os.listdir(bindir)) == sorted(["overlaybd", *tools])
    for name in os.listdir(bindir):
        assert os.readlink(bindir / name) == "../overlaybd", name
    for name in os.listdir(mounted / BUNDLE / "snapshotter"):
        p = mounted / BUNDLE / "snapshotter" / name
        if p.is_symlink():
            assert (p.parent / os.readlink(p)).resolve().is_relative_to(mounted / BUNDLE)


def test_no_symlink_escapes_the_image(mounted: Path) -> None:
    for p in walk(mounted):
        if p.is_symlink():
            target = os.readlink(p)
            assert not target.startswith("/"), f"{p} -> {target}"
            assert (p.parent / target).resolve().is_relative_to(mounted.resolve()), f"{p} -> {target}"


def test_default_configs(mounted: Path) -> None:
    obd = json.loads((mounted / BUNDLE / "etc/overlaybd.json").read_text())
    # Credentials must be editable without touching the read-only image.
    assert obd["credentialConfig"] == {"mode": "file", "path": "/etc/overlaybd/cred.json"}
    assert json.loads((mounted / BUNDLE / "etc/cred.json").read_text()) == {"auths": {}}
    snap = json.loads((mounted / BUNDLE / "snapshotter/etc/config.json").read_text())
    assert snap["address"] == "/run/overlaybd-snapshotter/overlaybd.sock"
    assert snap["root"] == "/var/lib/containerd/io.containerd.snapshotter.v1.overlaybd"


def test_upholds_dropin(mounted: Path) -> None:
    text = (mounted / "usr/lib/systemd/system/multi-user.target.d/10-overlaybd.conf").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines == ["[Unit]", "Upholds=overlaybd-tcmu.service overlaybd-snapshotter.service"]


@pytest.mark.parametrize("daemon", DAEMONS)
def test_unit_contents(mounted: Path, daemon: str) -> None:
    text = (mounted / f"usr/lib/systemd/system/{daemon}.service").read_text()
    assert f"ExecStart=/usr/local/overlaybd/bin/{daemon}\n" in text
    assert "Restart=always\n" in text
    after = next(ln for ln in text.splitlines() if ln.startswith("After="))
    assert "systemd-tmpfiles-setup.service" in after.split("=", 1)[1].split()
    pre = [ln for ln in text.splitlines() if ln.startswith("ExecStartPre=")]
    # First its own /etc configuration (a runtime merge starts the unit before any tmpfiles run; the file
    # is shipped in the image), then the modules.
    conf = "10-overlaybd.conf" if daemon == "overlaybd-tcmu" else "10-overlaybd-snapshotter.conf"
    assert (mounted / "usr/lib/tmpfiles.d" / conf).is_file()
    assert pre[0] == f"ExecStartPre=/usr/bin/systemd-tmpfiles --create /usr/lib/tmpfiles.d/{conf}"
    # -a: every name is a module (upstream's form passed "overlay" as a parameter of target_core_user).
    if daemon == "overlaybd-tcmu":
        # "-": a kernel without TCMU is fine, the daemon falls back to FUSE + loop.
        assert pre[1:] == ["ExecStartPre=-/usr/sbin/modprobe -a target_core_user tcm_loop fuse loop"]
    else:
        assert pre[1:] == ["ExecStartPre=-/usr/sbin/modprobe -a overlay target_core_user tcm_loop"]


def test_contents_listing_and_sha256(sysext_build: Built) -> None:
    listing = (sysext_build.out / f"{NAME}_contents.txt").read_text().splitlines()
    assert any(ln.endswith(" ./usr/local/overlaybd/overlaybd") for ln in listing)
    digest = (sysext_build.out / f"{NAME}.raw.sha256").read_text().split()[0]
    assert digest == hashlib.sha256(sysext_build.image.read_bytes()).hexdigest()


def test_tmpfiles_populate_etc_and_keep_edits(mounted: Path, tmp_path: Path) -> None:
    """systemd-tmpfiles --root: copies defaults to /etc if absent, creates state dirs and /opt links."""
    root = tmp_path / "root"
    shutil.copytree(mounted / "usr", root / "usr", symlinks=True)
    cmd = ["systemd-tmpfiles", f"--root={root}", "--create"]
    res = run(cmd)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr
    etc = root / "etc"
    assert (etc / "overlaybd/overlaybd.json").read_bytes() == (mounted / BUNDLE / "etc/overlaybd.json").read_bytes()
    assert (etc / "overlaybd-snapshotter/config.json").read_bytes() == (
        mounted / BUNDLE / "snapshotter/etc/config.json"
    ).read_bytes()
    cred = etc / "overlaybd/cred.json"
    assert json.loads(cred.read_text()) == {"auths": {}}
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    for d, mode in [
        ("opt/overlaybd/registry_cache", 0o700),
        ("opt/overlaybd/gzip_cache", 0o700),
        ("var/lib/containerd/io.containerd.snapshotter.v1.overlaybd", 0o700),
        ("run/overlaybd-snapshotter", 0o700),
    ]:
        assert (root / d).is_dir() and stat.S_IMODE((root / d).stat().st_mode) == mode, d
    for link, target in [
        ("opt/overlaybd/bin", "/usr/local/overlaybd/bin"),
        ("opt/overlaybd/baselayers", "/usr/local/overlaybd/baselayers"),
        ("opt/overlaybd/etc", "/usr/local/overlaybd/etc"),
        ("opt/overlaybd/snapshotter", "/usr/local/overlaybd/snapshotter"),
        ("opt/overlaybd/cred.json", "/etc/overlaybd/cred.json"),
    ]:
        assert os.readlink(root / link) == target, link
        assert (root / target.lstrip("/")).exists(), target

    # An edited /etc file survives the next boot's tmpfiles run (C = copy only if absent).
    edited = '{"cacheConfig": {"cacheSizeGB": 99}}\n'
    (etc / "overlaybd/overlaybd.json").write_text(edited)
    cred.write_text('{"auths": {"r.example": {"auth": "dTpw"}}}\n')
    res = run(cmd)
    assert res.returncode == 0, res.stderr
    assert (etc / "overlaybd/overlaybd.json").read_text() == edited
    assert "r.example" in cred.read_text()


def test_portable_squashfs_image(mounted_portable: Path, portable_build: Built) -> None:
    assert portable_build.image.read_bytes()[:4] == b"hsqs"
    assert portable_build.image.name.startswith("overlaybd_") and portable_build.image.name.endswith(".raw")
    text = (mounted_portable / f"usr/lib/extension-release.d/extension-release.{portable_build.name}").read_text()
    rel = parse_env_file(text)
    assert rel["SYSEXT_LEVEL"] == "1.0" and "VERSION_ID" not in rel and rel["ID"] == "flatcar"
    assert (
        rel["SYSEXT_ID"] == "overlaybd"
        and portable_build.image.name == f"overlaybd_{rel['SYSEXT_VERSION_ID']}_x86-64.raw"
    )
    st = (mounted_portable / BUNDLE / "overlaybd").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755)


def test_image_is_reproducible_from_the_same_bundle(sysext_build: Built, tmp_path: Path) -> None:
    """Staging + mkfs + payload are deterministic: same bundle, options, key and SOURCE_DATE_EPOCH => same bytes."""
    out = tmp_path / "again"
    shutil.copytree(sysext_build.bundle, out / "bundle", symlinks=True)
    key = sysext_build.out / "dev-payload-key.pem"  # the key the session's build signed with
    res = run([str(BUILD_SH), *sysext_build.args, "--reuse-bundle", "--payload-key", str(key), "--out", str(out)])
    assert res.returncode == 0, res.stderr
    assert (out / f"{NAME}.raw").read_bytes() == sysext_build.image.read_bytes()
    payload = f"flatcar_test_update-{NAME}.gz"
    assert (out / payload).read_bytes() == (sysext_build.out / payload).read_bytes()
    assert f">> sha256: {hashlib.sha256(sysext_build.image.read_bytes()).hexdigest()}" in res.stdout


@pytest.mark.slow
@pytest.mark.ci_may_skip
def test_full_build_is_reproducible(sysext_build: Built, tmp_path: Path) -> None:
    """A second build from scratch (PyInstaller included) gives a byte-identical image."""
    fresh = tmp_path / "fresh"
    res = run([str(BUILD_SH), *sysext_build.args, "--out", str(fresh)])
    assert res.returncode == 0, res.stderr
    key = f"{NAME}.raw.key"
    if (fresh / key).read_text() != (sysext_build.out / key).read_text():
        pytest.skip("the source tree changed between the two builds (input keys differ)")
    assert (fresh / f"{NAME}.raw").read_bytes() == sysext_build.image.read_bytes()


def test_bundle_contains_every_overlaybd_module(sysext_build: Built) -> None:
    """Tools are imported by name at run time, so PyInstaller must have collected every submodule
    (including the generated *_pb2 stubs); list the frozen archive and compare with the source tree."""
    viewer = Path(sys.executable).parent / "pyi-archive_viewer"
    res = run([str(viewer), "-r", "-b", str(sysext_build.bundle / "overlaybd")], timeout=120)
    assert res.returncode == 0, res.stderr
    frozen = {ln.strip() for ln in res.stdout.splitlines()}
    src = REPO / "python"
    expected = set()
    for p in (src / "overlaybd").rglob("*.py"):
        if "__pycache__" in p.parts:
            continue
        parts = list(p.relative_to(src).with_suffix("").parts)
        expected.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert any(m.endswith("_pb2") for m in expected) == any(m.endswith("_pb2") for m in frozen & expected)
    assert not expected - frozen, sorted(expected - frozen)
    assert not {m for m in frozen if m.split(".")[0] in ("pytest", "hypothesis", "grpc_tools", "PyInstaller")}


def test_frozen_butane_finds_its_templates(sysext_build: Built) -> None:
    res = run(["env", "-i", str(sysext_build.bundle / "bin/overlaybd-butane"), "--var", "cache_size_gb=3"], cwd="/")
    assert res.returncode == 0, res.stderr
    assert "variant: flatcar" in res.stdout and '"cacheSizeGB": 3' in res.stdout


def glibc_files() -> list[Path]:
    """Every shared object of the host's glibc package (libc6) and the dynamic loader, nothing else."""
    res = run(["dpkg", "-L", "libc6"])
    if res.returncode != 0:
        pytest.skip("dpkg -L libc6 failed: cannot tell glibc's files apart")
    return [Path(p) for p in res.stdout.split() if ".so" in Path(p).name and Path(p).is_file()]


def test_runs_with_nothing_but_glibc(mounted: Path, tools: list[str], tmp_path: Path) -> None:
    """A chroot holding only glibc (+ /proc) and the image's bundle: every tool starts (--version)."""
    chroot = tmp_path / "chroot"
    for lib in glibc_files():
        dest = chroot / lib.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dest)
    for link in ("lib64", "lib"):  # merged-/usr style links as on the host
        if Path("/" + link).is_symlink() and not (chroot / link).exists():
            (chroot / link).symlink_to(os.readlink("/" + link))
    shutil.copytree(mounted / "usr/local/overlaybd", chroot / "usr/local/overlaybd", symlinks=True)
    (chroot / "proc").mkdir()
    chroot_bin = shutil.which("chroot") or "/usr/sbin/chroot"
    script = [f"mount -t proc proc {chroot}/proc"]
    for name in ["overlaybd", *tools]:
        script.append(
            f"echo '== {name}'; env -i {chroot_bin} {chroot} /usr/local/overlaybd/bin/{name} --version 2>&1; "
            'echo "rc=$?"'
        )
    res = run(["unshare", "-m", "--propagation", "private", "sh", "-c", "\n".join(script)], timeout=300)
    assert res.returncode == 0, res.stderr
    blocks = dict(b.split("\n", 1) for b in res.stdout.split("== ")[1:])
    for name, out in blocks.items():
        assert "error while loading shared libraries" not in out, (name, out)
        assert "ModuleNotFoundError" not in out and "Traceback" not in out, (name, out)
    assert blocks["overlaybd"].startswith("overlaybd ") and "rc=0" in blocks["overlaybd"]


#: the tools of Flatcar's official overlaybd sysext that its documentation runs, at the same paths (issue 11)
OFFICIAL_TOOLS = (
    "bin/overlaybd-apply",
    "bin/turboOCI-apply",
    "snapshotter/ctr",
    "snapshotter/convertor",
    "snapshotter/overlaybd-attacher",
)


@pytest.mark.parametrize("rel", OFFICIAL_TOOLS)
def test_official_tool_paths_run_with_empty_environment(mounted: Path, rel: str) -> None:
    """Each path exists as a relative symlink to the multi-call executable and starts with `env -i`."""
    p = mounted / BUNDLE / rel
    assert os.readlink(p) == "../overlaybd", rel
    res = run(["env", "-i", str(p), "--version"], cwd="/")
    assert res.returncode == 0, (rel, res.stderr)
    assert res.stdout.startswith(p.name), (rel, res.stdout)
    assert "Traceback" not in res.stderr


def test_official_tools_parse_upstream_flags(mounted: Path, tmp_path: Path) -> None:
    """The documented command lines reach the tools' own logic (errors, not usage failures) under `env -i`."""
    snap = mounted / BUNDLE / "snapshotter"
    res = run(["env", "-i", str(snap / "ctr"), "rpull", "-u", "u:p", "--plain-http", "127.0.0.1:1/app:1"], cwd="/")
    assert res.returncode == 1 and "ctr rpull: 127.0.0.1:1/app:1: cannot fetch manifest" in res.stderr, res.stderr
    res = run(["env", "-i", str(snap / "convertor"), "-r", "r/app", "-i", "1", "-o", "2", "--fastoci", "x"], cwd="/")
    assert res.returncode == 1 and "not supported" in res.stderr, res.stderr
    res = run(["env", "-i", str(snap / "overlaybd-attacher"), "attach", "--id", "1", "--config", "/nonexistent"])
    assert res.returncode == 1 and "config file does not exist" in res.stderr, res.stderr
    layer = tmp_path / "l.tar"
    layer.write_bytes(b"\0" * 1024)
    res = run(
        ["env", "-i", str(mounted / BUNDLE / "bin/overlaybd-apply"), "--gz_index_path", "x", str(layer), str(layer)]
    )
    assert res.returncode == 1 and "not supported" in res.stderr, res.stderr


def test_base_layer_is_an_empty_64g_ext4(mounted: Path) -> None:
    """baselayers/ext4_64 is a committed overlaybd layer of a 64 GiB disk (upstream's convertor base layer)."""
    info = run(
        ["env", "-i", str(mounted / BUNDLE / "bin/overlaybd-info"), str(mounted / BUNDLE / "baselayers/ext4_64")]
    )
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
    assert doc["lsmt"]["kind"] == "committed" and doc["lsmt"]["header"]["virtual_size"] == 64 << 30
