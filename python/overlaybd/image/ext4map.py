"""Where a file's data lives on an ext4 block device: just enough of ext4 to map paths to extents.

Why: a priority list (spec §8, upstream `DynamicPrefetcher`) names files inside the image, but
prefetching works on disk ranges. Upstream resolves them with a userspace ext4 and fiemap; this
reads the superblock, group descriptors, inodes, extent trees and directory blocks through the
image's own `pread`, read-only, without mounting anything.

Supported: extent-mapped files and directories (what mkfs.ext4 makes by default), 32/64-bit group
descriptors, any block size. Block-mapped (ext2/3 style) and inline-data inodes yield no extents.
Everything read is bounds-checked: a damaged file system gives a FormatError naming the field.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

from ..format.errors import BadMagic, FormatError

SECTOR = 512
EXT4_MAGIC = 0xEF53
EXTENT_MAGIC = 0xF30A
ROOT_INO = 2
S_IFMT, S_IFDIR, S_IFREG = 0xF000, 0x4000, 0x8000
EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
INCOMPAT_64BIT = 0x80
MAX_EXTENT_DEPTH = 5
UNINIT_LEN = 32768
#: a directory walk stops after this many entries (a priority list is a hint, not a backup)
MAX_WALK_ENTRIES = 200_000

Read = Callable[[int, int], bytes]


class Ext4:
    """Read-only view of an ext4 file system on a device read by `read(size, offset) -> bytes`."""

    def __init__(self, read: Read, name: str = "<image>", device_size: int | None = None) -> None:
        self._read = read
        self.name = name
        self.device_size = device_size
        sb = self._get(1024, 1024, "superblock")
        (magic,) = struct.unpack_from("<H", sb, 56)
        if magic != EXT4_MAGIC:
            raise BadMagic(name, "ext4 superblock.s_magic", f"expected 0x{EXT4_MAGIC:04X}, found 0x{magic:04X}")
        self.inodes_count, blocks_lo = struct.unpack_from("<II", sb, 0)
        (self.first_data_block, log_block) = struct.unpack_from("<II", sb, 20)
        if log_block > 6:
            raise FormatError(name, "ext4 superblock.s_log_block_size", f"{log_block} (block size over 64 KiB)")
        self.block_size = 1024 << log_block
        (self.inodes_per_group,) = struct.unpack_from("<I", sb, 40)
        (rev,) = struct.unpack_from("<I", sb, 76)
        self.inode_size = struct.unpack_from("<H", sb, 88)[0] if rev >= 1 else 128
        (incompat,) = struct.unpack_from("<I", sb, 96)
        self.desc_size = 32
        if incompat & INCOMPAT_64BIT:
            self.desc_size = struct.unpack_from("<H", sb, 254)[0] or 32
        if not self.inodes_per_group or self.inode_size < 128 or self.inode_size > self.block_size:
            raise FormatError(
                name,
                "ext4 superblock.s_inodes_per_group/s_inode_size",
                f"{self.inodes_per_group}/{self.inode_size} are not usable",
            )
        if self.desc_size < 32 or self.desc_size > 1024:
            raise FormatError(name, "ext4 superblock.s_desc_size", f"{self.desc_size} is not usable")
        self.gdt_offset = (self.first_data_block + 1) * self.block_size

    def _get(self, size: int, offset: int, what: str) -> bytes:
        if offset < 0 or (self.device_size is not None and offset + size > self.device_size):
            raise FormatError(self.name, f"ext4 {what}", f"[{offset}, +{size}) lies outside the device")
        # the device reads whole sectors: widen to 512-byte bounds, then cut out the wanted bytes
        a = offset // SECTOR * SECTOR
        b = -(-(offset + size) // SECTOR) * SECTOR
        data = self._read(b - a, a)
        if len(data) != b - a:
            raise FormatError(self.name, f"ext4 {what}", f"short read at {a}: {len(data)} of {b - a} bytes")
        return data if a == offset and b - a == size else data[offset - a : offset - a + size]

    def inode_offset(self, ino: int) -> int:
        """Device byte offset of inode `ino` (via its group descriptor)."""
        if not 1 <= ino <= self.inodes_count:
            raise FormatError(self.name, "ext4 inode number", f"{ino} outside [1, {self.inodes_count}]")
        group, idx = divmod(ino - 1, self.inodes_per_group)
        gd = self._get(self.desc_size, self.gdt_offset + group * self.desc_size, f"group descriptor {group}")
        table = struct.unpack_from("<I", gd, 8)[0]
        if self.desc_size >= 64:
            table |= struct.unpack_from("<I", gd, 0x28)[0] << 32
        return table * self.block_size + idx * self.inode_size

    def inode(self, ino: int) -> bytes:
        return self._get(self.inode_size, self.inode_offset(ino), f"inode {ino}")

    @staticmethod
    def mode(inode: bytes) -> int:
        return struct.unpack_from("<H", inode, 0)[0] & S_IFMT

    @staticmethod
    def file_size(inode: bytes) -> int:
        lo, hi = struct.unpack_from("<I", inode, 4)[0], struct.unpack_from("<I", inode, 108)[0]
        return lo | hi << 32

    def extents(self, ino: int, inode: bytes | None = None) -> list[tuple[int, int, int]]:
        """(logical block, physical block, blocks) of initialised extents, in logical order."""
        inode = inode if inode is not None else self.inode(ino)
        (flags,) = struct.unpack_from("<I", inode, 32)
        if flags & INLINE_DATA_FL or not flags & EXTENTS_FL:
            return []
        out: list[tuple[int, int, int]] = []
        self._walk_extents(ino, inode[40:100], MAX_EXTENT_DEPTH, out)
        out.sort()
        return out

    def _walk_extents(self, ino: int, node: bytes, depth_left: int, out: list[tuple[int, int, int]]) -> None:
        magic, entries, max_entries, depth = struct.unpack_from("<HHHH", node, 0)
        where = f"inode {ino} extent header"
        if magic != EXTENT_MAGIC:
            raise BadMagic(self.name, f"ext4 {where}", f"expected 0x{EXTENT_MAGIC:04X}, found 0x{magic:04X}")
        if entries > max_entries or 12 + 12 * entries > len(node) or depth > depth_left:
            raise FormatError(self.name, f"ext4 {where}", f"entries {entries}/{max_entries}, depth {depth}")
        for i in range(entries):
            base = 12 + 12 * i
            if depth == 0:
                lblk, length, start_hi, start_lo = struct.unpack_from("<IHHI", node, base)
                if length > UNINIT_LEN:
                    continue  # preallocated, reads as zeros: nothing to fetch
                out.append((lblk, start_lo | start_hi << 32, length))
            else:
                _lblk, leaf_lo, leaf_hi = struct.unpack_from("<IIH", node, base)
                child = self._get(self.block_size, (leaf_lo | leaf_hi << 32) * self.block_size, f"{where} child")
                self._walk_extents(ino, child, depth - 1, out)

    def data_ranges(self, ino: int) -> list[tuple[int, int]]:
        """Device byte ranges (offset, length) holding inode `ino`'s data, clamped to its size."""
        inode = self.inode(ino)
        size = self.file_size(inode)
        bs = self.block_size
        out = []
        for lblk, pblk, n in self.extents(ino, inode):
            length = min(n * bs, size - lblk * bs)
            if length > 0:
                out.append((pblk * bs, (length + bs - 1) // bs * bs))
        return out

    def entries(self, ino: int) -> Iterator[tuple[str, int, int]]:
        """(name, inode, file type) of directory `ino`, without `.` and `..`."""
        bs = self.block_size
        for off, length in self.data_ranges(ino):
            for pos in range(off, off + length, bs):
                block = self._get(bs, pos, f"directory {ino} block")
                i = 0
                while i + 8 <= bs:
                    child, rec_len, name_len, ftype = struct.unpack_from("<IHBB", block, i)
                    if rec_len < 8 or i + rec_len > bs or 8 + name_len > rec_len:
                        raise FormatError(
                            self.name,
                            f"ext4 directory {ino} entry rec_len",
                            f"{rec_len} at byte {i} of block {pos // bs}",
                        )
                    if child:
                        name = block[i + 8 : i + 8 + name_len].decode("utf-8", "surrogateescape")
                        if name not in (".", ".."):
                            yield name, child, ftype
                    i += rec_len

    def lookup(self, path: str) -> int | None:
        """Inode of absolute `path` (no symlinks followed), None if a component does not exist."""
        ino = ROOT_INO
        for part in (p for p in path.split("/") if p):
            if self.mode(self.inode(ino)) != S_IFDIR:
                return None
            ino = next((child for name, child, _ in self.entries(ino) if name == part), 0)
            if not ino:
                return None
        return ino

    def walk(self, ino: int, limit: int = MAX_WALK_ENTRIES) -> Iterator[int]:
        """Every regular file and directory under directory `ino`, depth first (at most `limit`)."""
        stack = [ino]
        seen = {ino}
        count = 0
        while stack:
            d = stack.pop()
            for _name, child, _ftype in self.entries(d):
                if child in seen:
                    continue
                seen.add(child)
                mode = self.mode(self.inode(child))
                if mode not in (S_IFREG, S_IFDIR):
                    continue
                count += 1
                if count > limit:
                    return
                yield child
                if mode == S_IFDIR:
                    stack.append(child)
