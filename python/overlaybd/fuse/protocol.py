"""The FUSE kernel wire protocol (linux/fuse.h, ABI 7.x), only what a single-file filesystem needs.

Why our own: talking to /dev/fuse directly needs no libfuse3.so (Flatcar does not ship one the
frozen bundle could rely on), no ctypes callbacks per request, and lets worker threads read the
device concurrently (each read(2) returns exactly one request).
"""

from __future__ import annotations

import struct

KERNEL_MAJOR = 7
OUR_MINOR = 31  # everything we use (MAX_PAGES, FALLOCATE, BIG_WRITES) exists by 7.28

# opcodes
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
FLUSH = 25
INIT = 26
OPENDIR = 27
ACCESS = 34
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43

# opcodes the kernel sends without expecting a reply
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# FUSE_INIT flags
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
MAX_PAGES = 1 << 22

# fuse_open_out.open_flags
FOPEN_KEEP_CACHE = 1 << 1

# fuse_setattr_in.valid
FATTR_SIZE = 1 << 3

# fallocate(2) modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

ROOT_ID = 1

# struct layouts (little endian, the only byte order we run on)
IN_HEADER = struct.Struct("<IIQQIIII")  # len opcode unique nodeid uid gid pid padding   (40)
OUT_HEADER = struct.Struct("<IiQ")  # len error unique                                     (16)
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (prefix; newer kernels send more)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # ... max_pages map_alignment flags2 unused     (64)
# ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev blksize flags (88)
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy, then ATTR             (16+88)
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding                                   (16)
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding   (40)
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding (40)
WRITE_OUT = struct.Struct("<II")  # size padding
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
SETATTR_IN = struct.Struct("<II")  # valid padding (prefix)
OPEN_IN = struct.Struct("<II")  # flags open_flags

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and INIT_OUT.size == 64
assert ATTR.size == 88 and READ_IN.size == 40 and STATFS_OUT.size == 80 and FALLOCATE_IN.size == 32


def out_header(unique: int, error: int = 0, payload_len: int = 0) -> bytes:
    """Reply header; `error` is a negative errno or 0."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, error, unique)


def attr_out(size: int, mode: int, *, valid_s: int = 1, mtime: int = 0) -> bytes:
    """fuse_attr_out for the one regular file we serve (inode 1)."""
    attr = ATTR.pack(ROOT_ID, size, (size + 511) // 512, mtime, mtime, mtime, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)
    return ATTR_OUT.pack(valid_s, 0, 0) + attr
