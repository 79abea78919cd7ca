"""The rootless (userspace) layer path against the mounted one, entry by entry over the tar corpus.

Each corpus image is applied twice: by `apply_layer` onto a kernel-mounted ext4 (the mounted path)
and by `apply_userspace` (e2fsprogs on an image file, no mount); the userspace image is then
loop-mounted read-only and both trees compared with `treecmp` (type, mode, owner, size, sha256,
link target, rdev, xattrs, mtime, hardlink groups), and `e2fsck -fn` must find it clean. The whole
convertor is run both ways on a multi-layer image, and once as an unprivileged user.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.oci_images import write_layout
from overlaybd.convert import userspace
from overlaybd.convert.convertor import ConvertError, Options, convert_layout
from overlaybd.convert.extract import LayerError, apply_layer
from overlaybd.host.mkfs import mkfs_command
from overlaybd.oci.layout import Layout

from . import corpus
from .test_fidelity import CASES, Images, _images
from .treecmp import diff, ext4_dir, now_ns, snapshot

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the reference (mounted path) needs root")
needs_debugfs = pytest.mark.skipif(not shutil.which("debugfs"), reason="e2fsprogs' debugfs not installed")
pytestmark = needs_debugfs

EXTRA = {
    "hardlink-to-lower": [corpus.lower_for_whiteouts(), corpus.hardlink_to_lower()],
    "gnu-sparse": None,  # filled from the corpus writers below
}


def new_image(path: Path, size: int = 1 << 30) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(mkfs_command(str(path)), check=True, capture_output=True)
    return str(path)


def fsck_clean(image: str) -> None:
    r = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def ext4() -> Iterator[Path]:
    with ext4_dir(1024) as mnt:
        yield mnt


@pytest.fixture(scope="module")
def images(ext4: Path) -> Images:
    scratch = ext4 / "corpus-src"
    scratch.mkdir()
    out = Images(_images(scratch))
    out["hardlink-to-lower"] = EXTRA["hardlink-to-lower"]
    out["gnu-sparse"] = [corpus.sparse_layers(ext4 / "corpus-src" / "gnu")["gnu"]]
    return out


def loop_ro(image: str, mnt: Path) -> None:
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop,ro,noload", image, str(mnt)], check=True, capture_output=True)


def tree_without_lost_found(root: Path, t0: int) -> dict[str, dict]:
    return {k: v for k, v in snapshot(str(root), t0).items() if k.split("/")[0] != "lost+found"}


@needs_root
@pytest.mark.parametrize("case", [*CASES, "hardlink-to-lower", "gnu-sparse"])
def test_apply_matches_mounted_path(case: str, images: Images, ext4: Path, tmp_path: Path) -> None:
    if case not in images:
        pytest.skip(f"{case}: its tar writer is not installed")
    layers = images[case]
    t0 = now_ns()
    ref = ext4 / f"ref-{case}"
    ref.mkdir()
    for i, raw in enumerate(layers):
        apply_layer(io.BytesIO(raw), str(ref), f"{case}[{i}]")
    image = new_image(tmp_path / "us.img")
    for i, raw in enumerate(layers):
        userspace.apply_userspace(io.BytesIO(raw), image, str(tmp_path / "staging"), f"{case}[{i}]")
    fsck_clean(image)
    mnt = tmp_path / "mnt"
    loop_ro(image, mnt)
    try:
        ours = tree_without_lost_found(mnt, t0)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert diff(ours, snapshot(str(ref), t0)) == {}
    assert len(ours) > 1


# -- what the userspace path cannot represent: a clear error naming layer and entry ----------------
def test_line_break_in_a_name_is_refused(tmp_path: Path) -> None:
    image = new_image(tmp_path / "us.img", 64 << 20)
    raw = corpus.Tar().dir("d").file("d/two\nlines", b"x").bytes()
    with pytest.raises(LayerError) as ei:
        userspace.apply_userspace(io.BytesIO(raw), image, str(tmp_path / "st"), "layer 2 (sha256:abc)")
    assert "layer 2 (sha256:abc)" in str(ei.value) and "two\\nlines" in str(ei.value)
    assert "userspace" in str(ei.value)
    fsck_clean(image)  # nothing half-applied: commands run only after the whole layer was planned


def test_inherited_default_acl_is_refused(tmp_path: Path) -> None:
    image = new_image(tmp_path / "us.img", 64 << 20)
    acl = "user::rwx,group::r-x,other::r-x,user:1234:rwx:1234,mask::rwx"
    raw = corpus.Tar().dir("shared", pax={"SCHILY.acl.default": acl}).file("shared/f", b"x").bytes()
    with pytest.raises(LayerError, match=r"L1: shared/f: .*default ACL"):
        userspace.apply_userspace(io.BytesIO(raw), image, str(tmp_path / "st"), "L1")


def test_same_refusals_as_the_mounted_path(tmp_path: Path) -> None:
    image = new_image(tmp_path / "us.img", 64 << 20)
    with pytest.raises(LayerError, match="f/child"):
        userspace.apply_userspace(io.BytesIO(corpus.file_then_child()), image, str(tmp_path / "st"), "L")
    t = corpus.Tar()
    t._add("../evil", tarfile.REGTYPE)
    with pytest.raises(LayerError, match="escapes the layer root"):
        userspace.apply_userspace(io.BytesIO(t.bytes()), image, str(tmp_path / "st"), "L")


def test_debugfs_errors_name_the_entry() -> None:
    lines = [('cd "/"', ""), ('write "/s1" "a"', "a"), ('sif "/a" uid 0', "a")]
    out = 'debugfs 1.47.0\ndebugfs: cd "/"\ndebugfs: write "/s1" "a"\nwrite: Ext2 file already exists\n'
    with pytest.raises(userspace.UserspaceError, match=r"L7: /a: debugfs write failed: write: Ext2 file"):
        userspace.check_debugfs_output(out, lines, "L7", 0)
    ok = 'debugfs: cd "/"\ndebugfs: write "/s1" "a"\nAllocated inode: 12\ndebugfs: sif "/a" uid 0\n'
    userspace.check_debugfs_output(ok, lines, "L7", 0)
    with pytest.raises(userspace.UserspaceError, match="after 2 of 3"):
        userspace.check_debugfs_output('debugfs: cd "/"\ndebugfs: w\n', lines, "L7", 0)


def test_ext4_time_encoding() -> None:
    assert userspace._ext4_time(1_600_000_003_123_456_789) == (1_600_000_003, 123_456_789 << 2)
    low, extra = userspace._ext4_time((1 << 32) * 1_000_000_000)  # 2106: epoch bits carry the overflow
    assert (low, extra & 3) == (0, 1)


# -- the whole convertor, both ways ------------------------------------------------------------------
def _stacked_layers() -> list[bytes]:
    lower = corpus.lower_for_whiteouts()
    return [corpus.everything(tarfile.PAX_FORMAT), lower, corpus.upper_for_whiteouts(), corpus.hardlink_to_lower()]


def _convert(src: Path, dst: Path, work: Path, userspace_flag: bool) -> Layout:
    opts = Options(vsize_gb=1, userspace=userspace_flag)
    convert_layout(Layout(src), Layout(dst), "obd", opts=opts, work_dir=str(work))
    return Layout(dst)


def _flatten(layout: Layout, out: Path) -> str:
    """The converted image's whole disk as a sparse raw file (mapped extents only), for e2fsck and a
    loop mount."""
    img = layout.source("obd")
    lowers = [str(layout.blob_path(ly["digest"])) for ly in img.manifest["layers"]]
    from overlaybd.format.fileio import LocalFile
    from overlaybd.format.opener import open_layer

    first = open_layer(LocalFile(lowers[-1]))
    try:
        vsize = first.vsize
    finally:
        first.close()
    with open(out, "wb") as f:
        f.truncate(vsize)
    userspace._materialize(lowers, str(out))
    return str(out)


def _nows(tree: dict[str, dict]) -> dict[str, dict]:
    """Times set by the conversion's clock (directories a layer changed without listing them) read
    "now": the two conversions ran at different moments. Corpus times are all near T0."""
    for e in tree.values():
        if isinstance(e["mtime"], int) and e["mtime"] > (corpus.T0 + 10**6) * 10**9:
            e["mtime"] = "now"
    return tree


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("usconv")
    write_layout(base / "src", "localhost/t/stacked:1", _stacked_layers())
    os.chmod(base, 0o755)
    out = {"src": base / "src", "base": base}
    _convert(base / "src", base / "userspace", base / "work-us", True)
    out["userspace"] = base / "userspace"
    if os.geteuid() == 0:
        _convert(base / "src", base / "mounted", base / "work-m", False)
        out["mounted"] = base / "mounted"
    return out


@needs_root
def test_convert_userspace_matches_mounted(converted: dict[str, Path], tmp_path: Path) -> None:
    trees = {}
    for kind in ("userspace", "mounted"):
        raw = _flatten(Layout(converted[kind]), tmp_path / f"{kind}.raw")
        fsck_clean(raw)
        mnt = tmp_path / f"mnt-{kind}"
        loop_ro(raw, mnt)
        try:
            trees[kind] = tree_without_lost_found(mnt, 0)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    assert diff(_nows(trees["userspace"]), _nows(trees["mounted"])) == {}
    us, mo = Layout(converted["userspace"]).source("obd"), Layout(converted["mounted"]).source("obd")
    assert len(us.manifest["layers"]) == len(mo.manifest["layers"]) == 4


@needs_root
def test_convert_as_unprivileged_user(converted: dict[str, Path], tmp_path: Path) -> None:
    """`overlaybd-convert` run as nobody (no capabilities): takes the userspace path by itself."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv not installed")
    base = Path(tempfile.mkdtemp(prefix="obd-nobody-", dir="/tmp"))  # pytest's own tmp is root-only
    try:
        _as_nobody(converted, base, tmp_path)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _as_nobody(converted: dict[str, Path], base: Path, tmp_path: Path) -> None:
    os.chmod(base, 0o755)
    shutil.copytree(converted["src"], base / "src")
    for d, _dirs, files in os.walk(base / "src"):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    work = base / "nobody"
    work.mkdir()
    shutil.chown(work, 65534, 65534)
    cmd = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        sys.executable,
        "-m",
        "overlaybd.cli.convert",
        f"oci:{base / 'src'}",
        f"oci:{work / 'dst'}:obd",
        "--vsize",
        "1",
        "--work-dir",
        str(work / "w"),
    ]
    env = {**os.environ, "HOME": str(work), "TMPDIR": str(work)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(work))
    assert r.returncode == 0, r.stdout + r.stderr
    ours, ref = Layout(work / "dst").source("obd"), Layout(converted["userspace"]).source("obd")
    assert len(ours.manifest["layers"]) == len(ref.manifest["layers"])
    raw = _flatten(Layout(work / "dst"), tmp_path / "nobody.raw")
    fsck_clean(raw)
    raw_ref = _flatten(Layout(converted["userspace"]), tmp_path / "root.raw")
    a, b = tmp_path / "a", tmp_path / "b"
    loop_ro(raw, a)
    loop_ro(raw_ref, b)
    try:
        ta, tb = tree_without_lost_found(a, 0), tree_without_lost_found(b, 0)
    finally:
        subprocess.run(["umount", str(a)], check=True)
        subprocess.run(["umount", str(b)], check=True)
    assert diff(_nows(ta), _nows(tb)) == {}


def test_userspace_is_taken_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert userspace.wanted(Options())
    assert not userspace.wanted(Options(userspace=False))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert not userspace.wanted(Options()) and userspace.wanted(Options(userspace=True))


def test_failed_layer_is_a_convert_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_layout(src, "localhost/t/bad:1", [corpus.Tar().file("a\nb", b"x").bytes()])
    with pytest.raises((ConvertError, LayerError), match="a\\\\nb"):
        _convert(src, tmp_path / "dst", tmp_path / "work", True)
