"""Applying an OCI layer tar onto a mounted filesystem that already shows the lower layers.

Why our own loop instead of `tarfile.extractall`: the result must be the image containerd's
overlayfs path shows, bit for bit, and tarfile neither applies whiteouts nor keeps xattrs.

Semantics (what containerd 1.6 does when it unpacks a layer into an overlayfs upper directory,
which is what a container on overlayfs sees; differences are listed in `tests/convert`):

* The merged view is the target, so "this layer" has to be tracked: `_upper` holds every path
  the layer wrote (plus the directories on the way to them), i.e. what overlayfs would have in
  the upper directory. Whiteouts (`.wh.NAME`, `.wh..wh..opq`) remove lower entries only: entries
  of the same layer survive in either order (OCI image spec, "Whiteouts").
* Parent components are resolved like containerd resolves them inside the upper directory: a
  symlink the same layer wrote is followed, scoped to the root (`/` and `..` cannot leave it);
  a lower symlink or lower non-directory on the way is replaced by a new 0755 directory; a
  non-directory the same layer wrote on the way is refused (containerd: ENOTDIR).
* Names are cleaned like containerd does (leading `/` dropped); a `..` that would climb above
  the root is refused rather than clamped: no honest layer has one.
* Metadata order per entry: create, lchown, chmod (after chown, which clears setuid/setgid and
  security.capability), xattrs (SCHILY.xattr.*, LIBARCHIVE.xattr.*, POSIX ACLs), then times
  without following symlinks; directory times last, after their contents.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import shutil
import stat
import struct
import tarfile
import urllib.parse
from collections.abc import Iterator
from decimal import Decimal
from typing import IO, Any, Protocol

log = logging.getLogger(__name__)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
META = ".wh..wh."  # aufs metadata (.wh..wh.plnk, ...): never part of the image
MAX_LINKS = 40  # the kernel's symlink follow limit
CHUNK = 1 << 20

SCHILY_XATTR = "SCHILY.xattr."
LIBARCHIVE_XATTR = "LIBARCHIVE.xattr."
ACL_RECORDS = {"SCHILY.acl.access": "system.posix_acl_access", "SCHILY.acl.default": "system.posix_acl_default"}
# overlayfs interprets these on a lower directory (the converted ext4 is one in rwMode overlayfs),
# and containerd never applies trusted.* from a layer; every other trusted.* name is kept.
DROPPED_XATTR_PREFIX = "trusted.overlay."


class LayerError(ValueError):
    """A layer entry that cannot be applied safely; names the layer and the entry."""

    def __init__(self, layer: str, entry: str, message: str) -> None:
        super().__init__(f"{layer}: {entry}: {message}")


# -- POSIX ACLs --------------------------------------------------------------------------------
# Binary form of system.posix_acl_{access,default} (linux/posix_acl_xattr.h): a u32 version (2),
# then per entry u16 tag, u16 perm, u32 id, sorted by tag then id. Built here rather than calling
# setfacl: setfacl resolves names against the host's passwd/group (not the image's), and it
# would add a package and a process per file.
_ACL_TAGS = {"user": 0x01, "group": 0x04, "mask": 0x10, "other": 0x20}
_ACL_NAMED = {0x01: 0x02, 0x04: 0x08}  # user:ID -> ACL_USER, group:ID -> ACL_GROUP
_ACL_TAG_ALIASES = {"u": "user", "g": "group", "m": "mask", "o": "other"}
_ACL_PERMS = {"r": 4, "w": 2, "x": 1, "-": 0}
_UNDEFINED_ID = 0xFFFFFFFF


def acl_text_to_xattr(text: str) -> bytes:
    """GNU tar (newline-separated) or star/bsdtar (comma-separated, optional `:ID` suffix) ACL text."""
    entries: list[tuple[int, int, int]] = []
    for raw in text.replace("\n", ",").split(","):
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        fields = item.split(":")
        if len(fields) not in (3, 4):
            raise ValueError(f"bad ACL entry {item!r}")
        kind = _ACL_TAG_ALIASES.get(fields[0], fields[0])
        if kind not in _ACL_TAGS:
            raise ValueError(f"bad ACL tag in {item!r}")
        tag, qualifier, perms = _ACL_TAGS[kind], fields[1], fields[2]
        ident = _UNDEFINED_ID
        if qualifier and kind in ("user", "group"):
            tag = _ACL_NAMED[tag]
            number = fields[3] if len(fields) == 4 and fields[3].isdigit() else qualifier
            if not number.isdigit():
                raise ValueError(f"ACL entry {item!r} names {qualifier!r} without a numeric id")
            ident = int(number)
        if len(perms) > 3 or any(ch not in _ACL_PERMS for ch in perms):
            raise ValueError(f"bad ACL permissions in {item!r}")
        perm = sum(_ACL_PERMS[ch] for ch in perms)
        entries.append((tag, perm, ident))
    entries.sort(key=lambda e: (e[0], e[2]))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def entry_xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    """Every xattr a tar entry carries, as raw bytes (pax values come back surrogate-escaped)."""
    out: dict[str, bytes] = {}
    acls: dict[str, bytes] = {}
    for key, value in m.pax_headers.items():
        if key.startswith(SCHILY_XATTR):
            out[key[len(SCHILY_XATTR) :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith(LIBARCHIVE_XATTR):
            name = urllib.parse.unquote(key[len(LIBARCHIVE_XATTR) :])
            data = value.encode("ascii", "surrogateescape")
            out.setdefault(name, base64.b64decode(data + b"=" * (-len(data) % 4)))
        elif key in ACL_RECORDS:
            acls[ACL_RECORDS[key]] = acl_text_to_xattr(value)
    for name, data in acls.items():
        out.setdefault(name, data)  # a raw system.posix_acl_* record (GNU tar writes both) is exact
    return {k: v for k, v in out.items() if not k.startswith(DROPPED_XATTR_PREFIX)}


def _pax_ns(m: tarfile.TarInfo, key: str) -> int | None:
    text = m.pax_headers.get(key)
    if text is None:
        return None if key != "mtime" else int(m.mtime) * 1_000_000_000
    return int(Decimal(text) * 1_000_000_000)


def entry_times(m: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns as containerd sets them: atime = the later of the two; before 1970 -> 0."""
    mtime = max(_pax_ns(m, "mtime") or 0, 0)
    atime = _pax_ns(m, "atime")
    return (max(atime, mtime) if atime is not None else mtime), mtime


def _kind(st_mode: int) -> str:
    return "directory" if stat.S_ISDIR(st_mode) else "symlink" if stat.S_ISLNK(st_mode) else "non-directory"


def write_new_file(path: str, size: int, pieces: Iterator[tuple[int, bytes]]) -> None:
    """Create `path` (mode 0600; it must not exist, not even as a symlink) from `(offset, bytes)` pieces,
    `size` bytes long (what the pieces leave out is a hole)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        for offset, chunk in pieces:
            os.pwrite(fd, chunk, offset)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


class HostFs:
    """The layer's target as a mounted directory: every operation is the kernel's own (os.* calls).

    Why an object: the userspace path (`convert/userspace.py`) runs the same `_Applier` against an
    ext4 image it edits with e2fsprogs, so the semantics live in one place; paths are relative to
    the root ('' is the root)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def abspath(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def lstat(self, rel: str) -> os.stat_result:
        return os.lstat(self.abspath(rel))

    def listdir(self, rel: str) -> list[str]:
        return os.listdir(self.abspath(rel))

    def readlink(self, rel: str) -> str:
        return os.readlink(self.abspath(rel))

    def mkdir(self, rel: str, mode: int) -> None:
        os.mkdir(self.abspath(rel), mode)

    def remove(self, rel: str) -> None:
        path = self.abspath(rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    def link(self, src: str, dst: str) -> None:
        os.link(self.abspath(src), self.abspath(dst), follow_symlinks=False)

    def symlink(self, target: str, rel: str) -> None:
        os.symlink(target, self.abspath(rel))

    def mknod(self, rel: str, mode: int, device: int) -> None:
        os.mknod(self.abspath(rel), mode, device)

    def write(self, rel: str, size: int, pieces: Iterator[tuple[int, bytes]]) -> None:
        write_new_file(self.abspath(rel), size, pieces)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        os.chown(self.abspath(rel), uid, gid, follow_symlinks=False)

    def chmod(self, rel: str, mode: int) -> None:
        os.chmod(self.abspath(rel), mode)

    def utime(self, rel: str, atime_ns: int, mtime_ns: int) -> None:
        os.utime(self.abspath(rel), ns=(atime_ns, mtime_ns), follow_symlinks=False)

    def listxattr(self, rel: str) -> list[str]:
        return os.listxattr(self.abspath(rel), follow_symlinks=False)

    def setxattr(self, rel: str, name: str, value: bytes) -> None:
        os.setxattr(self.abspath(rel), name, value, follow_symlinks=False)

    def removexattr(self, rel: str, name: str) -> None:
        os.removexattr(self.abspath(rel), name, follow_symlinks=False)


class LayerFs(Protocol):
    """What `_Applier` needs of its target (`HostFs` is the reference); paths are root-relative."""

    def lstat(self, rel: str) -> Any: ...
    def listdir(self, rel: str) -> list[str]: ...
    def readlink(self, rel: str) -> str: ...
    def mkdir(self, rel: str, mode: int) -> None: ...
    def remove(self, rel: str) -> None: ...
    def link(self, src: str, dst: str) -> None: ...
    def symlink(self, target: str, rel: str) -> None: ...
    def mknod(self, rel: str, mode: int, device: int) -> None: ...
    def write(self, rel: str, size: int, pieces: Iterator[tuple[int, bytes]]) -> None: ...
    def chown(self, rel: str, uid: int, gid: int) -> None: ...
    def chmod(self, rel: str, mode: int) -> None: ...
    def utime(self, rel: str, atime_ns: int, mtime_ns: int) -> None: ...
    def listxattr(self, rel: str) -> list[str]: ...
    def setxattr(self, rel: str, name: str, value: bytes) -> None: ...
    def removexattr(self, rel: str, name: str) -> None: ...


def _lexists(fs: LayerFs, rel: str) -> bool:
    try:
        fs.lstat(rel)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _isdir(fs: LayerFs, rel: str) -> bool:
    try:
        return stat.S_ISDIR(fs.lstat(rel).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


class _Applier:
    def __init__(self, tf: tarfile.TarFile, fs: LayerFs, layer: str) -> None:
        self.tf, self.fs, self.layer = tf, fs, layer
        self.upper: set[str] = set()  # what overlayfs would hold in this layer's upper directory
        self.dirs: list[tuple[str, tarfile.TarInfo]] = []

    # -- paths ---------------------------------------------------------------------------------
    def clean(self, name: str, entry: str) -> list[str]:
        parts: list[str] = []
        for p in name.split("/"):
            if p in ("", "."):
                continue
            if p == "..":
                if not parts:
                    raise LayerError(self.layer, entry, "path escapes the layer root")
                parts.pop()
            else:
                parts.append(p)
        return parts

    def mark(self, rel: str) -> None:
        while rel and rel not in self.upper:
            self.upper.add(rel)
            rel = os.path.dirname(rel)

    def resolve_dir(self, parts: list[str], entry: str, create: bool) -> str | None:
        """Relative path of the directory `parts` names, resolved as described in the module doc.

        With `create`, missing directories are made (0755, root) and lower non-directories on the way
        replaced by directories; without it, None when something on the way is not a directory."""
        todo, links = list(parts), 0
        out: list[str] = []
        while todo:
            c = todo.pop(0)
            if c in ("", "."):
                continue
            if c == "..":
                out = out[:-1]  # scoped: `..` at the root stays at the root (containerd's RootPath)
                continue
            rel = "/".join([*out, c])
            try:
                st = self.fs.lstat(rel)
            except FileNotFoundError:
                if not create:
                    return None
                self.mkdir_implicit(rel, entry)
                self.mark(rel)
                out.append(c)
                continue
            if stat.S_ISDIR(st.st_mode):
                out.append(c)
                continue
            if rel in self.upper:
                if not stat.S_ISLNK(st.st_mode):
                    raise LayerError(
                        self.layer, entry, f"parent {rel!r} is a {_kind(st.st_mode)} this layer wrote (not a directory)"
                    )
                links += 1
                if links > MAX_LINKS:
                    raise LayerError(self.layer, entry, f"too many levels of symbolic links at {rel!r}")
                target = self.fs.readlink(rel)
                if target.startswith("/"):
                    out = []
                todo = target.split("/") + todo
                continue
            if not create:
                return None
            self.fs.remove(rel)  # a lower symlink/file on the way: the upper directory hides it
            self.mkdir_implicit(rel, entry)
            self.mark(rel)
            out.append(c)
        return "/".join(out)

    def mkdir_implicit(self, rel: str, entry: str) -> None:
        try:
            self.fs.mkdir(rel, 0o755)
            self.fs.chmod(rel, 0o755)  # not subject to the umask
        except OSError as e:
            raise LayerError(self.layer, entry, f"cannot create parent {rel!r}: {e.strerror or e}") from e

    def prune(self, rel: str) -> None:
        """Remove what lower layers put at `rel`, keeping what this layer wrote there."""
        if rel not in self.upper:
            self.fs.remove(rel)
        elif _isdir(self.fs, rel):
            for child in self.fs.listdir(rel):
                self.prune(f"{rel}/{child}")

    # -- entries -------------------------------------------------------------------------------
    def apply(self, m: tarfile.TarInfo) -> bool:
        entry = m.name
        parts = self.clean(m.name, entry)
        if not parts:
            return False  # the root itself: containerd ignores it too
        base = parts[-1]
        if base.startswith(META) and base != OPAQUE:
            return False
        parent = self.resolve_dir(parts[:-1], entry, create=True)
        assert parent is not None
        if base == OPAQUE:
            for child in self.fs.listdir(parent):
                self.prune(f"{parent}/{child}" if parent else child)
            return True
        if base.startswith(WHITEOUT):
            name = base[len(WHITEOUT) :]
            if name in ("", ".", ".."):
                raise LayerError(self.layer, entry, "invalid whiteout name")
            victim = f"{parent}/{name}" if parent else name
            if _lexists(self.fs, victim):
                self.prune(victim)
            return True
        rel = f"{parent}/{base}" if parent else base
        try:
            existing = self.fs.lstat(rel)
        except FileNotFoundError:
            existing = None
        merge_dir = existing is not None and m.isdir() and stat.S_ISDIR(existing.st_mode)
        if existing is not None and not merge_dir:
            self.fs.remove(rel)
        try:
            self.create(m, rel, merge_dir)
        except OSError as e:
            raise LayerError(self.layer, entry, f"cannot create: {e.strerror or e}") from e
        self.mark(rel)
        return True

    def create(self, m: tarfile.TarInfo, rel: str, merge_dir: bool) -> None:
        fs = self.fs
        if m.islnk():
            self.hardlink(m, rel)
            return
        if m.isdir():
            if not merge_dir:
                fs.mkdir(rel, 0o700)
            self.dirs.append((rel, m))
        elif m.isreg():
            fs.write(rel, m.size, self.pieces(m))
        elif m.issym():
            fs.symlink(m.linkname, rel)
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            fs.mknod(rel, kind | 0o600, os.makedev(m.devmajor, m.devminor))
        elif m.isfifo():
            fs.mknod(rel, stat.S_IFIFO | 0o600, 0)
        else:
            raise LayerError(self.layer, m.name, f"unsupported tar entry type {m.type!r}")
        fs.chown(rel, m.uid, m.gid)
        if not m.issym():
            fs.chmod(rel, m.mode & 0o7777)
        self.set_xattrs(m, rel, replace=merge_dir)
        if not m.isdir():
            atime, mtime = entry_times(m)
            fs.utime(rel, atime, mtime)

    def hardlink(self, m: tarfile.TarInfo, rel: str) -> None:
        """Link to the entry named by the link (same layer or lower), never following its last component.

        The link header's owner, xattrs and times are applied as containerd does; its mode is not,
        and an owner change restores the mode bits chown clears (setuid of a linked binary)."""
        fs = self.fs
        lparts = self.clean(m.linkname, m.name)
        if not lparts:
            raise LayerError(self.layer, m.name, "hardlink to the layer root")
        lparent = self.resolve_dir(lparts[:-1], m.name, create=False)
        src = (f"{lparent}/{lparts[-1]}" if lparent else lparts[-1]) if lparent is not None else None
        if src is None or not _lexists(fs, src):
            raise LayerError(self.layer, m.name, f"hardlink target {m.linkname!r} does not exist")
        if _isdir(fs, src):
            raise LayerError(self.layer, m.name, f"hardlink target {m.linkname!r} is a directory")
        fs.link(src, rel)
        st = fs.lstat(rel)
        if (st.st_uid, st.st_gid) != (m.uid, m.gid):
            fs.chown(rel, m.uid, m.gid)
            if not stat.S_ISLNK(st.st_mode):
                fs.chmod(rel, stat.S_IMODE(st.st_mode))
        self.set_xattrs(m, rel, replace=False)
        atime, mtime = entry_times(m)
        fs.utime(rel, atime, mtime)

    def pieces(self, m: tarfile.TarInfo) -> Iterator[tuple[int, bytes]]:
        """(offset, data) of a member's content straight from the archive; sparse members yield only
        their data, so holes stay holes (GNU and PAX 0.x/1.0)."""
        src = self.tf.fileobj
        assert src is not None
        src.seek(m.offset_data)
        sparse: list[tuple[int, int]] = m.sparse or [(0, m.size)]  # type: ignore[assignment]  # typeshed: list[int]
        for offset, length in sparse:
            while length > 0:
                chunk = src.read(min(length, CHUNK))
                if not chunk:
                    raise LayerError(self.layer, m.name, "archive truncated inside the entry's data")
                yield offset, chunk
                offset += len(chunk)
                length -= len(chunk)

    def set_xattrs(self, m: tarfile.TarInfo, rel: str, replace: bool) -> None:
        fs = self.fs
        try:
            wanted = entry_xattrs(m)
        except ValueError as e:  # a malformed ACL record
            raise LayerError(self.layer, m.name, str(e)) from e
        if replace:  # a directory entry over a lower directory: its xattrs are the entry's, as in an upper dir
            for name in fs.listxattr(rel):
                if name not in wanted:
                    fs.removexattr(rel, name)
        for name, value in wanted.items():
            try:
                fs.setxattr(rel, name, value)
            except OSError as e:
                special = not (m.isreg() or m.isdir() or m.islnk())
                if e.errno == errno.ENOTSUP or (e.errno == errno.EPERM and special and name.startswith("user.")):
                    log.warning("%s: %s: xattr %s not supported here, skipped: %s", self.layer, m.name, name, e)
                    continue
                raise LayerError(self.layer, m.name, f"cannot set xattr {name}: {e.strerror}") from e

    def finish(self) -> None:
        for rel, m in self.dirs:  # containerd's order: tar order, after every entry
            if _isdir(self.fs, rel):
                atime, mtime = entry_times(m)
                self.fs.utime(rel, atime, mtime)


def apply_layer(stream: IO[bytes], root: str, layer_name: str = "<layer>") -> int:
    """Apply an uncompressed layer tar stream onto the mounted directory `root`; returns the entry count."""
    return apply_layer_to(stream, HostFs(root), layer_name)


def apply_layer_to(stream: IO[bytes], fs: LayerFs, layer_name: str = "<layer>") -> int:
    """Apply an uncompressed layer tar stream onto any `LayerFs`; returns the number of entries applied."""
    count = 0
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        applier = _Applier(tf, fs, layer_name)
        for m in tf:
            if applier.apply(m):
                count += 1
        applier.finish()
    return count
