"""The layer tar corpus for the fidelity tests, built here (no network, no fixtures from elsewhere).

Why three writers: Python's tarfile gives exact control over names, owners, modes, device numbers
and raw pax records in GNU and PAX form; GNU tar and bsdtar are what real image builders use for
sparse files (GNU old-style, PAX 0.0/0.1/1.0), ACL records and LIBARCHIVE.xattr records, so their
own output is tested rather than our idea of it.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

T0 = 1_600_000_000  # 2020-09-13: every corpus time is fixed and in the past
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # vfs cap v2: cap_net_raw+ep
LONG = "d" * 60 + "/" + "n" * 120 + "/" + "x" * 200  # > 100 (ustar) and > 255 (prefix) characters
ODD = ["sp ace", "tab\tname", "uni-\u00e9\u00df\u4e2d", "back\\slash", "colon:x", "-dash", "#hash", "percent%41"]


class Tar:
    """An in-memory layer tar written with tarfile; entries default to root-owned, T0, 0644/0755."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=fmt)

    def _add(self, name: str, kind: bytes, data: bytes = b"", **kw: object) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = int(kw.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644))  # type: ignore[call-overload]
        ti.mtime = kw.pop("mtime", T0)  # type: ignore[assignment]
        ti.uid, ti.gid = int(kw.pop("uid", 0)), int(kw.pop("gid", 0))  # type: ignore[call-overload]
        ti.uname = ti.gname = ""
        ti.linkname = str(kw.pop("link", ""))
        ti.devmajor, ti.devminor = kw.pop("dev", (0, 0))  # type: ignore[misc]
        ti.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in kw.pop("xattrs", {}).items()
        }  # type: ignore[attr-defined]
        ti.pax_headers.update(kw.pop("pax", {}))  # type: ignore[arg-type]
        assert not kw, kw
        ti.size = len(data)
        self.tf.addfile(ti, io.BytesIO(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else None)

    def dir(self, name: str, **kw: object) -> Tar:
        self._add(name, tarfile.DIRTYPE, **kw)
        return self

    def file(self, name: str, data: bytes = b"", **kw: object) -> Tar:
        self._add(name, tarfile.REGTYPE, data, **kw)
        return self

    def sym(self, name: str, target: str, **kw: object) -> Tar:
        self._add(name, tarfile.SYMTYPE, link=target, mode=0o777, **kw)
        return self

    def link(self, name: str, target: str, **kw: object) -> Tar:
        self._add(name, tarfile.LNKTYPE, link=target, **kw)
        return self

    def fifo(self, name: str, **kw: object) -> Tar:
        self._add(name, tarfile.FIFOTYPE, **kw)
        return self

    def chr(self, name: str, major: int, minor: int, **kw: object) -> Tar:
        self._add(name, tarfile.CHRTYPE, dev=(major, minor), **kw)
        return self

    def blk(self, name: str, major: int, minor: int, **kw: object) -> Tar:
        self._add(name, tarfile.BLKTYPE, dev=(major, minor), **kw)
        return self

    def whiteout(self, path: str) -> Tar:
        d, b = os.path.split(path)
        return self.file(os.path.join(d, ".wh." + b))

    def opaque(self, d: str) -> Tar:
        return self.file(os.path.join(d, ".wh..wh..opq"))

    def bytes(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()


def everything(fmt: int) -> bytes:
    """One layer with every entry type and odd metadata (tarfile; PAX or GNU)."""
    t = Tar(fmt)
    t.dir("bin").dir("etc", mtime=T0 + 1).dir("tmp", mode=0o1777).dir("srv", uid=1000, gid=1000, mode=0o2775)
    t.file("bin/suid", b"#!/bin/sh\n", mode=0o4755).file("bin/sgid", b"x", mode=0o2711).file("bin/both", mode=0o6555)
    t.file("bin/sticky-file", b"s", mode=0o1644)
    t.file("etc/empty").file("etc/odd-owner", b"o", uid=65534, gid=65534, mode=0o600)
    t.file("etc/big-owner", b"b", uid=1_000_000, gid=2_000_000_000, mode=0o640)  # beyond 7 octal digits (ustar)
    t.file("etc/data", os.urandom(300_000), mode=0o444, mtime=T0 + 7)
    t.file("etc/frac-time", b"f", pax={"mtime": f"{T0 + 3}.123456789", "atime": f"{T0 + 2}.5"})
    t.sym("etc/rel", "data").sym("etc/abs", "/etc/data").sym("etc/dangling", "/nonexistent/target")
    t.sym("etc/longlink", "/" + "/".join(["segment"] * 40), mtime=T0 + 9)
    t.sym("etc/dirlink", "../bin", uid=7, gid=8)
    t.link("etc/hard", "etc/data", mode=0o444, mtime=T0 + 7).link("bin/hard2", "etc/data", mode=0o444, mtime=T0 + 7)
    t.link("etc/hard-to-sym", "etc/rel", mode=0o777)
    t.dir("dev").fifo("dev/fifo", mode=0o620, mtime=T0 + 4)
    t.chr("dev/null", 1, 3, mode=0o666).chr("dev/bigdev", 4095, 1048575, mode=0o600).blk("dev/loop9", 7, 9, mode=0o660)
    t.dir("odd")
    for i, name in enumerate(ODD):
        t.file(f"odd/{name}", name.encode(), mtime=T0 + i)
    parts = LONG.split("/")
    for i in range(1, len(parts)):
        t.dir("/".join(parts[:i]))
    t.file(LONG, b"long", mode=0o600).sym(LONG + "-sym", "/" + "t" * 150).link(LONG + "-hard", LONG, mode=0o600)
    t.file("caps", b"\x7fELF", mode=0o755, xattrs={"security.capability": CAP_NET_RAW, "user.note": b"v\x00\xff"})
    t.dir("xdir", xattrs={"user.dirattr": b"1"})
    t.file("xdir/file", xattrs={"user.a": b"", "user.b": b"x" * 1000, "trusted.t": b"kept"})
    return t.bytes()


def lower_for_whiteouts() -> bytes:
    t = Tar()
    t.dir("a").file("a/keep", b"k").file("a/gone", b"g").dir("a/sub").file("a/sub/deep", b"d")
    t.dir("o1").file("o1/lower", b"l").dir("o1/sub").file("o1/sub/lowerdeep")
    t.dir("o2").file("o2/lower", b"l").dir("o2/samesub").file("o2/samesub/lowerdeep")
    t.dir("w").file("w/x", b"lower x").dir("w/d").file("w/d/lower")
    t.dir("repl").dir("repl/was-dir").file("repl/was-dir/inner").file("repl/was-file", b"f")
    t.file("data", b"lower data", mode=0o640, uid=5, gid=6, mtime=T0 + 11).file("lowerfile", b"lf")
    t.dir("target").sym("lowerlink", "target").sym("abslink", "/target")
    t.dir("xd", xattrs={"user.lower": b"1", "user.both": b"lower"})
    return t.bytes()


def upper_for_whiteouts() -> bytes:
    """Opaque dirs and whiteouts before and after entries of the same layer; replacements."""
    t = Tar()
    t.dir("a").whiteout("a/gone")
    t.dir("o1").file("o1/before", b"same layer, before the opaque marker").opaque("o1")
    t.file("o1/after", b"same layer, after it")
    t.dir("o2").opaque("o2").dir("o2/samesub").file("o2/samesub/new")  # lower o2/samesub/* must go
    t.dir("w").whiteout("w/x").file("w/x", b"same layer x, after its whiteout")
    t.whiteout("w/d").dir("w/d", mode=0o700).file("w/d/new")
    t.dir("repl").file("repl/was-dir", b"now a file").dir("repl/was-file", mode=0o750).file("repl/was-file/in")
    t.dir("xd", xattrs={"user.both": b"upper", "user.new": b"n"})
    return t.bytes()


def hardlink_to_lower() -> bytes:
    """A hardlink to a file of a lower layer (`data` of `lower_for_whiteouts`)."""
    return Tar().link("hard-to-lower", "data", mode=0o640, uid=5, gid=6, mtime=T0 + 11).bytes()


def implicit_parents() -> bytes:
    """Entries whose parents the layer does not list: lower file / lower symlinks on the way."""
    t = Tar()
    t.file("lowerfile/child", b"c").file("lowerlink/child", b"c").file("abslink/child", b"c").file("new/deep/file")
    return t.bytes()


def same_layer_symlink_parent() -> bytes:
    """A symlink the same layer wrote is followed (scoped to the root) for later entries."""
    t = Tar()
    t.dir("real").sym("viarel", "real").sym("viaabs", "/real").sym("up", "../../..")
    t.file("viarel/one", b"1").file("viaabs/two", b"2").file("up/three", b"3")
    return t.bytes()


def file_then_child() -> bytes:
    return Tar().file("f", b"regular").file("f/child", b"x").bytes()


def with_gnu_tar(src: Path, out: Path, *args: str) -> bytes:
    subprocess.run(
        ["tar", "-C", str(src), "--numeric-owner", "--owner=0", "--group=0", "-cf", str(out), *args, "."],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def make_sparse(d: Path) -> None:
    """Files with holes at the start, middle and end, and one that is all hole."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "holes", "wb") as f:
        for off in (1 << 20, 5 << 20, 9 << 20):
            f.seek(off)
            f.write(os.urandom(10_000))
        f.truncate(12 << 20)
    with open(d / "allhole", "wb") as f:
        f.truncate(3 << 20)
    for p in d.rglob("*"):
        os.utime(p, (T0, T0))
    os.utime(d, (T0, T0))


def sparse_layers(scratch: Path) -> dict[str, bytes]:
    """The same sparse tree as GNU old-style sparse and PAX sparse 0.0, 0.1 and 1.0 (GNU tar)."""
    src = scratch / "sparse-src"
    make_sparse(src)
    out = {"gnu": with_gnu_tar(src, scratch / "s-gnu.tar", "--format=gnu", "--sparse")}
    for v in ("0.0", "0.1", "1.0"):
        out[f"pax{v}"] = with_gnu_tar(
            src, scratch / f"s-{v}.tar", "--format=posix", "--sparse", f"--sparse-version={v}"
        )
    return out


def xattr_tree(d: Path) -> None:
    """Files with user.*, security.capability and POSIX ACLs (needs an xattr/ACL-capable fs: ext4)."""
    d.mkdir(parents=True)
    (d / "ping").write_bytes(b"\x7fELF ping")
    (d / "ping").chmod(0o755)
    os.setxattr(d / "ping", "security.capability", CAP_NET_RAW)
    (d / "note").write_text("n")
    os.setxattr(d / "note", "user.comment", b"hello")
    os.setxattr(d / "note", "user.bin", bytes(range(256)))
    (d / "acl").write_text("a")
    (d / "shared").mkdir()
    if shutil.which("setfacl"):
        subprocess.run(["setfacl", "-m", "u:1234:rx,g:55:r", str(d / "acl")], check=True)
        subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(d / "shared")], check=True)
    os.setxattr(d / "shared", "user.d", b"dir")
    for p in [*d.rglob("*"), d]:
        os.utime(p, (T0, T0), follow_symlinks=False)


def xattr_layers(scratch: Path) -> dict[str, bytes]:
    """GNU tar (SCHILY.xattr + SCHILY.acl text + raw system.posix_acl_*) and bsdtar (+ LIBARCHIVE.xattr)."""
    src = scratch / "xattr-src"
    xattr_tree(src)
    out = {
        "gnutar": with_gnu_tar(src, scratch / "x-gnu.tar", "--format=posix", "--xattrs", "--xattrs-include=*", "--acls")
    }
    if shutil.which("bsdtar"):
        bsd = scratch / "x-bsd.tar"
        subprocess.run(
            [
                "bsdtar",
                "-C",
                str(src),
                "--numeric-owner",
                "--uid",
                "0",
                "--gid",
                "0",
                "--format",
                "pax",
                "--xattrs",
                "--acls",
                "-cf",
                str(bsd),
                ".",
            ],
            check=True,
            capture_output=True,
        )
        out["bsdtar"] = bsd.read_bytes()
    return out
