"""Rootless layer building: a layer's ext4 changes made in user space with e2fsprogs, no mount.

Why: upstream's userspace convertor needs no containerd, no tcmu/FUSE device, no mount and no
root. Here the layer is applied by the very `_Applier` the mounted path uses (`extract.py`), but
against `Ext4Fs`, a model of the image's tree that reads the lower state straight from the ext4
bytes (`image/ext4map.py`) and turns every change into a `debugfs -w` command. What the kernel
does as a side effect on the mounted path is done explicitly (a directory's mtime when an entry
is added or removed, setuid/setgid and security.capability dropped by chown, the mode a POSIX
access ACL implies); what this path cannot reproduce raises `LayerError` naming the layer and the
entry, never a silent difference.

The block image is a sparse scratch file that stays the merged image across the layers of one
conversion (lowers are never copied again); per layer, the 4 KiB blocks whose content changed
(a digest per allocated block, compared after debugfs ran) become the layer's LSMT data, and the
writable layer is committed exactly as on the mounted path.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import IO, Any

from ..host.command import HostError, run
from ..host.mkfs import mkfs_command
from ..image.ext4map import ROOT_INO, Ext4
from .extract import LayerError, apply_layer_to, write_new_file

log = logging.getLogger(__name__)

BLOCK = 4096  # change-tracking granularity of the scratch image
SCAN_CHUNK = 4 << 20
ZERO_DIGEST = hashlib.blake2b(bytes(BLOCK), digest_size=16).digest()
XATTR_MAGIC = 0xEA020000
XATTR_PREFIXES = {
    1: "user.",
    2: "system.posix_acl_access",
    3: "system.posix_acl_default",
    4: "trusted.",
    6: "security.",
    7: "system.",
    8: "system.richacl",
}
SETTABLE = ("user.", "trusted.", "security.")
ACL_ACCESS, ACL_DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
CAPS = "security.capability"
UNCHANGED_ID = 0xFFFFFFFF  # chown(-1): leave the id as it is
DEBUGFS_OK = ("Allocated inode: ",)


class UserspaceError(RuntimeError):
    """e2fsprogs failed on the scratch image; the message names the layer, the path and the tool's words."""


def unrepresentable(layer: str, rel: str, why: str) -> LayerError:
    why = f"the userspace path cannot apply this: {why} (convert as root without --userspace)"
    return LayerError(layer, rel, why)


# -- the lower tree, read from the ext4 bytes ---------------------------------------------------
def inode_attrs(raw: bytes) -> tuple[int, int, int, int]:
    """(mode, uid, gid, links) of an ext4 inode (32-bit ids: low halves plus osd2's high halves)."""
    mode, uid_lo = struct.unpack_from("<HH", raw, 0)
    gid_lo, links = struct.unpack_from("<HH", raw, 24)
    uid_hi, gid_hi = struct.unpack_from("<HH", raw, 120)
    return mode, uid_lo | uid_hi << 16, gid_lo | gid_hi << 16, links


def _xattr_names(buf: bytes, pos: int, end: int) -> Iterator[str]:
    while pos + 16 <= end:
        name_len, index = buf[pos], buf[pos + 1]
        if name_len == 0 and index == 0 and struct.unpack_from("<I", buf, pos)[0] == 0:
            return
        name = buf[pos + 16 : pos + 16 + name_len].decode("utf-8", "surrogateescape")
        prefix = XATTR_PREFIXES.get(index)
        if prefix is not None and not (index == 7 and name == "data"):  # system.data: inline data, not listed
            yield prefix + name if index not in (2, 3, 8) else prefix
        pos += (16 + name_len + 3) & ~3


def xattr_names(fs: Ext4, raw: bytes) -> set[str]:
    """Names of the xattrs an inode carries, in the inode body and in its xattr block."""
    names: set[str] = set()
    if fs.inode_size > 128:
        (extra,) = struct.unpack_from("<H", raw, 128)
        at = 128 + extra
        if at + 4 <= len(raw) and struct.unpack_from("<I", raw, at)[0] == XATTR_MAGIC:
            names.update(_xattr_names(raw, at + 4, len(raw)))
    block = struct.unpack_from("<I", raw, 104)[0] | struct.unpack_from("<H", raw, 118)[0] << 32
    if block:
        data = fs._get(fs.block_size, block * fs.block_size, "xattr block")
        if struct.unpack_from("<I", data, 0)[0] == XATTR_MAGIC:
            names.update(_xattr_names(data, 32, len(data)))
    return names


@dataclass(eq=False)
class Node:
    """One inode of the merged tree: read lazily from the lower image, or made by this layer."""

    mode: int
    uid: int = 0
    gid: int = 0
    links: int = 1
    ino: int | None = None  # lower inode number; None: created by this layer
    target: str | None = None  # symlink target (new symlinks only)
    xattrs: set[str] | None = None  # None: a lower inode whose names are not read yet
    children: dict[str, Node] | None = None  # directories; None: not listed yet
    gone: bool = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _q(text: str, layer: str, rel: str) -> str:
    """A debugfs (libss) argument: double quotes, a quote doubled; a line break cannot be written."""
    if any(c in text for c in "\n\r\0"):
        raise unrepresentable(layer, rel, f"{text!r} holds a line break or NUL, which debugfs commands cannot carry")
    return '"' + text.replace('"', '""') + '"'


def _ext4_time(ns: int) -> tuple[int, int]:
    """(32-bit seconds field, extra field) of ext4's timestamp encoding (epoch bits, nanoseconds)."""
    sec, frac = divmod(ns, 1_000_000_000)
    low = sec & 0xFFFFFFFF
    signed = low - (1 << 32) if low >= 1 << 31 else low
    return low, (frac << 2) | (((sec - signed) >> 32) & 3)


def _parse_acl(value: bytes) -> list[tuple[int, int, int]]:
    if len(value) < 4 or (len(value) - 4) % 8 or struct.unpack_from("<I", value, 0)[0] != 2:
        raise OSError(errno.EINVAL, "invalid POSIX ACL")
    return [struct.unpack_from("<HHI", value, 4 + 8 * i) for i in range((len(value) - 4) // 8)]


class Ext4Fs:
    """A `LayerFs` over an ext4 image file: reads the lower tree, records changes as debugfs commands.

    Paths are root-relative. Commands refer to entries by the path they have when the command runs
    (debugfs executes the script in order, so the model's state at emission time is the image's)."""

    def __init__(self, image: str, staging: str, layer: str, *, now_ns: int | None = None) -> None:
        self.image, self.staging, self.layer = image, staging, layer
        self.fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        self.reader = Ext4(lambda size, off: os.pread(self.fd, size, off), image)
        self.by_ino: dict[int, Node] = {}
        self.root = self._lower(ROOT_INO)
        self.lines: list[tuple[str, str]] = []  # (command, the path it is about)
        self.cwd = "/"
        self.dir_times: dict[int, tuple[Node, str, int | None, int | None]] = {}
        self.now_ns = now_ns if now_ns is not None else time.time_ns()
        self.staged = 0
        self.values: dict[bytes, str] = {}

    def close(self) -> None:
        os.close(self.fd)

    # -- model ---------------------------------------------------------------------------------
    def _lower(self, ino: int) -> Node:
        node = self.by_ino.get(ino)
        if node is None:
            mode, uid, gid, links = inode_attrs(self.reader.inode(ino))
            node = Node(mode, uid, gid, links, ino=ino)
            self.by_ino[ino] = node
        return node

    def _children(self, node: Node) -> dict[str, Node]:
        if node.children is None:
            assert node.ino is not None
            node.children = {name: self._lower(child) for name, child, _t in self.reader.entries(node.ino)}
        return node.children

    def _xattrs(self, node: Node) -> set[str]:
        if node.xattrs is None:
            assert node.ino is not None
            node.xattrs = xattr_names(self.reader, self.reader.inode(node.ino))
        return node.xattrs

    def _node(self, rel: str) -> Node:
        node = self.root
        for part in rel.split("/") if rel else []:
            if not node.is_dir:
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
            child = self._children(node).get(part)
            if child is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), rel)
            node = child
        return node

    def _parent(self, rel: str, inherits: bool = True) -> tuple[Node, str, str]:
        prel, _, name = rel.rpartition("/")
        parent = self._node(prel)
        if not parent.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
        if name in self._children(parent):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), rel)
        if inherits and ACL_DEFAULT in self._xattrs(parent):
            raise unrepresentable(self.layer, rel, f"its directory /{prel} has a default ACL (inherited ACLs)")
        return parent, prel, name

    def _touch(self, node: Node, rel: str) -> None:
        """The kernel sets a directory's mtime when an entry is added or removed."""
        self.dir_times[id(node)] = (node, rel, None, None)

    # -- commands ------------------------------------------------------------------------------
    def _emit(self, rel: str, *words: str) -> None:
        self.lines.append((" ".join(words), rel))

    def _p(self, rel: str) -> str:
        return _q("/" + rel, self.layer, rel)

    def _unlink_path(self, rel: str) -> str:
        """rm/rmdir look the part before the last '/' up on its own, and "" means cwd: entries of the
        root are named from the root."""
        if "/" in rel:
            return self._p(rel)
        self._cd("")
        return _q(rel, self.layer, rel)

    def _cd(self, prel: str) -> None:
        if self.cwd != "/" + prel:
            self._emit(prel, "cd", self._p(prel))
            self.cwd = "/" + prel

    def _sif(self, rel: str, fld: str, value: int | str) -> None:
        self._emit(rel, "sif", self._p(rel), fld, str(value))

    def _stage(self, data: bytes | None = None) -> str:
        self.staged += 1
        path = os.path.join(self.staging, f"s{self.staged}")
        if data is not None:
            with open(path, "wb") as f:
                f.write(data)
        return path

    def _value_file(self, value: bytes) -> str:
        path = self.values.get(value)
        if path is None:
            path = self.values[value] = self._stage(value)
        return path

    def _new(self, parent: Node, prel: str, name: str, rel: str, node: Node) -> Node:
        self._children(parent)[name] = node
        self._touch(parent, prel)
        node.xattrs = set()
        return node

    # -- LayerFs -------------------------------------------------------------------------------
    def lstat(self, rel: str) -> Any:
        node = self._node(rel)
        return SimpleNamespace(st_mode=node.mode, st_uid=node.uid, st_gid=node.gid, st_nlink=node.links)

    def listdir(self, rel: str) -> list[str]:
        node = self._node(rel)
        if not node.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
        return list(self._children(node))

    def readlink(self, rel: str) -> str:
        node = self._node(rel)
        if node.target is None:
            raise OSError(errno.EINVAL, "not a symlink this layer wrote", rel)
        return node.target

    def mkdir(self, rel: str, mode: int) -> None:
        parent, prel, name = self._parent(rel)
        self._cd(prel)
        self._emit(rel, "mkdir", _q(name, self.layer, rel))
        node = self._new(parent, prel, name, rel, Node(stat.S_IFDIR | (mode & 0o7777), links=2, children={}))
        parent.links += 1
        self._sif(rel, "mode", f"0{node.mode:o}")
        self._sif(rel, "uid", 0)
        self._sif(rel, "gid", 0)

    def remove(self, rel: str) -> None:
        prel, _, name = rel.rpartition("/")
        parent = self._node(prel)
        node = self._children(parent).get(name)
        if node is None:
            return
        if node.is_dir:
            for child in list(self._children(node)):
                self.remove(f"{rel}/{child}")
            self._emit(rel, "rmdir", self._unlink_path(rel))
            parent.links -= 1
            node.gone = True
        else:
            if node.links == 1 and self._xattrs(node):
                # debugfs frees the inode but not its xattr block: empty it first (rm's kill_file leaks it)
                self._emit(rel, "ea_rm", self._p(rel), *(_q(n, self.layer, rel) for n in sorted(self._xattrs(node))))
            self._emit(rel, "rm", self._unlink_path(rel))
            node.links -= 1
            node.gone = node.links == 0
        del self._children(parent)[name]
        self._touch(parent, prel)

    def link(self, src: str, dst: str) -> None:
        node = self._node(src)
        parent, prel, name = self._parent(dst, inherits=False)
        self._cd(prel)
        self._emit(dst, "ln", self._p(src), _q(name, self.layer, dst))
        self._children(parent)[name] = node
        self._touch(parent, prel)
        node.links += 1
        self._sif(dst, "links_count", node.links)

    def symlink(self, target: str, rel: str) -> None:
        if not target:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), rel)
        if len(target.encode("utf-8", "surrogateescape")) >= self.reader.block_size:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), rel)
        parent, prel, name = self._parent(rel)
        self._cd(prel)
        self._emit(rel, "symlink", _q(name, self.layer, rel), _q(target, self.layer, rel))
        self._new(parent, prel, name, rel, Node(stat.S_IFLNK | 0o777, target=target))

    def mknod(self, rel: str, mode: int, device: int) -> None:
        parent, prel, name = self._parent(rel)
        self._cd(prel)
        kind = "p" if stat.S_ISFIFO(mode) else "c" if stat.S_ISCHR(mode) else "b" if stat.S_ISBLK(mode) else None
        if kind is None:
            raise OSError(errno.EINVAL, "unsupported node type", rel)
        self._emit(rel, "mknod", _q(name, self.layer, rel), *([kind] if kind == "p" else [kind, "0", "0"]))
        node = self._new(parent, prel, name, rel, Node(mode))
        self._sif(rel, "mode", f"0{node.mode:o}")
        if kind != "p":  # ext4's encoding, as the kernel's ext4 writes it (debugfs mknod caps minors at 65535)
            major, minor = os.major(device), os.minor(device)
            if major < 256 and minor < 256:
                old, new = major << 8 | minor, 0
            else:
                old, new = 0, (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
            self._sif(rel, "block[0]", old)
            self._sif(rel, "block[1]", new)

    def write(self, rel: str, size: int, pieces: Iterator[tuple[int, bytes]]) -> None:
        parent, prel, name = self._parent(rel)
        path = self._stage()
        write_new_file(path, size, pieces)
        self._cd(prel)
        self._emit(rel, "write", _q(path, self.layer, rel), _q(name, self.layer, rel))
        self._new(parent, prel, name, rel, Node(stat.S_IFREG | 0o600))

    def chown(self, rel: str, uid: int, gid: int) -> None:
        node = self._node(rel)
        if uid != UNCHANGED_ID:
            node.uid = uid
            self._sif(rel, "uid", uid)
        if gid != UNCHANGED_ID:
            node.gid = gid
            self._sif(rel, "gid", gid)
        if not node.is_dir and not stat.S_ISLNK(node.mode):  # notify_change's ATTR_KILL_SUID/SGID/PRIV
            mode = node.mode & ~stat.S_ISUID
            if mode & stat.S_IXGRP:
                mode &= ~stat.S_ISGID
            if mode != node.mode:
                self.chmod(rel, mode & 0o7777)
            if CAPS in self._xattrs(node):
                self.removexattr(rel, CAPS)

    def chmod(self, rel: str, mode: int) -> None:
        node = self._node(rel)
        node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
        self._sif(rel, "mode", f"0{node.mode:o}")

    def utime(self, rel: str, atime_ns: int, mtime_ns: int) -> None:
        node = self._node(rel)
        if node.is_dir:  # set last, after the kernel-like touches of its entries
            self.dir_times[id(node)] = (node, rel, atime_ns, mtime_ns)
            return
        self._times(rel, atime_ns, mtime_ns)

    def _times(self, rel: str, atime_ns: int | None, mtime_ns: int) -> None:
        for fld, ns in (("atime", atime_ns), ("mtime", mtime_ns)):
            if ns is None:
                continue
            low, extra = _ext4_time(ns)
            self._sif(rel, fld, f"@{low}")
            self._sif(rel, f"{fld}_extra", extra)

    def listxattr(self, rel: str) -> list[str]:
        return sorted(self._xattrs(self._node(rel)))

    def setxattr(self, rel: str, name: str, value: bytes) -> None:
        node = self._node(rel)
        if name in (ACL_ACCESS, ACL_DEFAULT):
            self._set_acl(node, rel, name, value)
            return
        if not name.startswith(SETTABLE) or name in SETTABLE:
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP), rel)
        if name.startswith("user.") and not (node.is_dir or stat.S_ISREG(node.mode)):
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), rel)  # the kernel refuses user.* there
        if name == CAPS:
            value = self._caps(value, rel)
        self._ea_set(node, rel, name, value)

    def _ea_set(self, node: Node, rel: str, name: str, value: bytes) -> None:
        source = _q(self._value_file(value), self.layer, rel)
        self._emit(rel, "ea_set", "-f", source, self._p(rel), _q(name, self.layer, rel))
        self._xattrs(node).add(name)

    @staticmethod
    def _caps(value: bytes, rel: str) -> bytes:
        """security.capability as the kernel stores it from a privileged setxattr (cap_convert_nscap)."""
        magic = struct.unpack_from("<I", value, 0)[0] if len(value) >= 4 else 0
        if len(value) == 20 and magic & 0xFF000000 == 0x02000000:
            return value
        if len(value) == 24 and magic & 0xFF000000 == 0x03000000:
            return struct.pack("<I", 0x03000000 | (magic & 1)) + value[4:]
        raise OSError(errno.EINVAL, "invalid security.capability value", rel)

    def _set_acl(self, node: Node, rel: str, name: str, value: bytes) -> None:
        """The kernel's set_posix_acl: an access ACL sets the mode bits and, when the mode says it all,
        is not stored at all."""
        if stat.S_ISLNK(node.mode):
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP), rel)
        if name == ACL_DEFAULT and not node.is_dir:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), rel)
        entries = _parse_acl(value)
        tags = [tag for tag, _perm, _id in entries]
        if tags.count(0x01) != 1 or tags.count(0x04) != 1 or tags.count(0x20) != 1 or tags.count(0x10) > 1:
            if entries or name == ACL_ACCESS:
                raise OSError(errno.EINVAL, "invalid POSIX ACL", rel)
        if (0x02 in tags or 0x08 in tags) and 0x10 not in tags:
            raise OSError(errno.EINVAL, "invalid POSIX ACL (named entries without a mask)", rel)
        if name == ACL_DEFAULT:
            self._ea_set(node, rel, name, value)
            return
        perms = {tag: perm for tag, perm, _id in entries if tag in (0x01, 0x04, 0x10, 0x20)}
        group = perms.get(0x10, perms[0x04])
        mode = (node.mode & ~0o777) | perms[0x01] << 6 | group << 3 | perms[0x20]
        if mode != node.mode:
            node.mode = mode
            self._sif(rel, "mode", f"0{mode:o}")
        if set(tags) <= {0x01, 0x04, 0x20}:  # equivalent to the mode: no ACL is stored
            if ACL_ACCESS in self._xattrs(node):
                self.removexattr(rel, ACL_ACCESS)
            return
        self._ea_set(node, rel, name, value)

    def removexattr(self, rel: str, name: str) -> None:
        node = self._node(rel)
        if name not in self._xattrs(node):
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA), rel)
        self._emit(rel, "ea_rm", self._p(rel), _q(name, self.layer, rel))
        self._xattrs(node).discard(name)

    # -- running -------------------------------------------------------------------------------
    def script(self) -> list[tuple[str, str]]:
        """Every command, directory times last (the kernel-like touches, then the tar's times)."""
        lines = list(self.lines)
        saved, self.lines = self.lines, lines
        try:
            for node, rel, atime, mtime in self.dir_times.values():
                if not node.gone:
                    self._times(rel, atime, mtime if mtime is not None else self.now_ns)
        finally:
            self.lines = saved
        return lines

    def run(self) -> int:
        """Execute the commands with `debugfs -w`; returns their number; UserspaceError on any failure."""
        lines = self.script()
        if not lines:
            return 0
        path = os.path.join(self.staging, "debugfs.cmds")
        with open(path, "wb") as f:
            for cmd, _rel in lines:
                f.write(cmd.encode("utf-8", "surrogateescape") + b"\n")
        out_path = os.path.join(self.staging, "debugfs.out")
        argv = ["debugfs", "-w", "-f", path, self.image]
        if shutil.which("stdbuf"):  # one ordered stream: each error follows the command it belongs to
            argv = ["stdbuf", "-oL", *argv]
        with open(out_path, "wb") as out:
            r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with open(out_path, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
        check_debugfs_output(text, lines, self.layer, r.returncode)
        return len(lines)


def check_debugfs_output(text: str, lines: list[tuple[str, str]], layer: str, returncode: int) -> None:
    """Any output but the banner, the echoed commands and "Allocated inode" is an error of the last
    echoed command: name the layer and the entry's path."""
    n = -1
    for line in text.splitlines():
        if line.startswith("debugfs: "):
            n += 1
            continue
        if not line.strip() or line.startswith("debugfs 1.") or line.startswith(DEBUGFS_OK):
            continue
        cmd, rel = lines[n] if 0 <= n < len(lines) else ("", "")
        raise UserspaceError(f"{layer}: /{rel}: debugfs {cmd.split(' ', 1)[0] or '(start)'} failed: {line.strip()}")
    if returncode != 0 or n + 1 != len(lines):
        raise UserspaceError(f"{layer}: debugfs exited {returncode} after {n + 1} of {len(lines)} commands")


# -- the scratch image and its changed blocks -----------------------------------------------------
@dataclass
class Scratch:
    """The merged image of the layers built so far, as a sparse file; `digests` per non-zero 4 KiB block."""

    path: str
    vsize: int
    layers: list[str] = field(default_factory=list)  # fingerprints of the committed layers it holds
    digests: dict[int, bytes] = field(default_factory=dict)

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        """(offset, length) of the allocated parts of the file (SEEK_DATA/SEEK_HOLE)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pos = 0
            while pos < self.vsize:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        return
                    raise
                end = min(os.lseek(fd, start, os.SEEK_HOLE), self.vsize)
                yield start, end - start
                pos = end
        finally:
            os.close(fd)

    def changed(self) -> list[tuple[int, int]]:
        """Byte runs (offset, length) whose content differs from the last call's; updates the digests."""
        seen: set[int] = set()
        runs: list[tuple[int, int]] = []
        with open(self.path, "rb", buffering=0) as f:
            for start, length in self.data_ranges():
                first = start // BLOCK
                last = -(-(start + length) // BLOCK)
                for chunk_block in range(first, last, SCAN_CHUNK // BLOCK):
                    n = min(SCAN_CHUNK // BLOCK, last - chunk_block)
                    data = os.pread(f.fileno(), n * BLOCK, chunk_block * BLOCK)
                    view = memoryview(data)
                    for i in range(n):
                        blk = chunk_block + i
                        piece = view[i * BLOCK : (i + 1) * BLOCK]
                        digest = hashlib.blake2b(piece, digest_size=16).digest()
                        old = self.digests.get(blk, ZERO_DIGEST)
                        seen.add(blk)
                        if digest == old:
                            continue
                        if digest == ZERO_DIGEST:
                            self.digests.pop(blk, None)
                        else:
                            self.digests[blk] = digest
                        _add_run(runs, blk)
        for blk in [b for b in self.digests if b not in seen]:  # non-zero before, a hole now
            del self.digests[blk]
            _add_run(runs, blk)
        runs.sort()
        return _merge_runs(runs)


def _add_run(runs: list[tuple[int, int]], blk: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == blk * BLOCK:
        runs[-1] = (runs[-1][0], runs[-1][1] + BLOCK)
    else:
        runs.append((blk * BLOCK, BLOCK))


def _merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in runs:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


def fingerprint(path: str) -> str:
    """Cheap identity of a committed layer file: size plus a digest of its head and tail."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 16))
        f.seek(max(0, size - (1 << 16)))
        h.update(f.read(1 << 16))
    return h.hexdigest()


_SCRATCH: dict[str, Scratch] = {}


def scratch_for(work: str, lowers: list[str], vsize: int) -> Scratch:
    """The scratch image holding exactly `lowers`: the one of the previous layer when it does, else
    a new sparse file with the lowers' mapped extents copied in (holes stay holes)."""
    path = os.path.join(work, "userspace-scratch.img")
    prints = [fingerprint(p) for p in lowers]
    sc = _SCRATCH.get(path)
    if sc is not None and sc.layers == prints and sc.vsize == vsize and os.path.exists(path):
        return sc
    with open(path, "wb") as f:
        f.truncate(vsize)
    sc = Scratch(path, vsize)
    if lowers:
        _materialize(lowers, path)
        sc.changed()  # digests of what is there; nothing of it belongs to the new layer
    sc.layers = prints
    _SCRATCH[path] = sc
    return sc


def _materialize(lowers: list[str], path: str) -> None:
    from ..format import lsmt
    from ..format.fileio import LocalFile
    from ..format.opener import open_layer

    layers = [open_layer(LocalFile(p)) for p in lowers]
    stack = lsmt.Stack(layers)  # owns (and closes) the layers
    try:
        with open(path, "r+b") as out:
            for m in stack.mappings():
                if m.zeroed:
                    continue
                pos, end = m.offset * lsmt.SECTOR, m.end * lsmt.SECTOR
                while pos < end:
                    n = min(SCAN_CHUNK, end - pos)
                    os.pwrite(out.fileno(), stack.pread(n, pos), pos)
                    pos += n
    finally:
        stack.close()


# -- one layer -------------------------------------------------------------------------------------
def apply_userspace(stream: IO[bytes], image: str, staging: str, layer_name: str) -> int:
    """Apply a layer tar onto the ext4 `image` file with debugfs; returns the number of entries."""
    os.makedirs(staging, exist_ok=True)
    fs = Ext4Fs(image, staging, layer_name)
    try:
        n = apply_layer_to(stream, fs, layer_name)
        fs.run()
    finally:
        fs.close()
        shutil.rmtree(staging, ignore_errors=True)
    return n


def wanted(opts: Any) -> bool:
    """`opts.userspace` when set (`--userspace`), else: when not root (no mount, loop or FUSE then)."""
    flag = getattr(opts, "userspace", None)
    return os.geteuid() != 0 if flag is None else bool(flag)


def fill_writable(
    index: int, layer_stream: Any, layer_name: str, lowers: list[str], work: str, opts: Any, data: str, idx: str
) -> Scratch:
    """The rootless middle of `convertor.build_layer`: apply the layer with e2fsprogs to a scratch image of
    `lowers` and write what changed into the new writable layer `data` + `idx`; returns the scratch, whose
    `layers` the caller extends with the `fingerprint` of the committed blob (so the next layer reuses it).

    A file system is made when there are no lowers (layer 0 without a base layer), as there."""
    from ..format import lsmt
    from .convertor import ConvertError

    vsize = opts.vsize_gb << 30
    d = os.path.dirname(data)
    sc = scratch_for(work, lowers, vsize)
    if not lowers:
        try:
            run(mkfs_command(sc.path, opts.fstype), f"layer {index}: mkfs.{opts.fstype}")
        except HostError as e:
            raise ConvertError(f"layer {index}: {e}") from e
    try:
        n = apply_userspace(layer_stream, sc.path, os.path.join(d, "staging"), layer_name)
    except UserspaceError as e:
        _SCRATCH.pop(sc.path, None)  # half applied: never reuse it
        raise ConvertError(str(e)) from e
    except BaseException:
        _SCRATCH.pop(sc.path, None)
        raise
    log.info("layer %d (%s): %d entries applied in user space", index, layer_name, n)
    rw = lsmt.create_rw(data, idx, vsize)
    try:
        with open(sc.path, "rb", buffering=0) as f:
            for off, length in sc.changed():
                pos = off
                while pos < off + length:
                    n_bytes = min(SCAN_CHUNK, off + length - pos)
                    rw.pwrite(os.pread(f.fileno(), n_bytes, pos), pos)
                    pos += n_bytes
        rw.fsync()
    finally:
        rw.close()
    return sc
