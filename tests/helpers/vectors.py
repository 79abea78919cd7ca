"""The upstream vectors' expected image digests (shared/vectors/README.md) and how to hash an image."""

from __future__ import annotations

import hashlib
from typing import Any

MIB = 1 << 20

#: sha256 of the whole virtual disk of L0 (rw/L0.*, commit/L0.commit, sealed/L0.sealed, zfile/L0.commit.*)
L0_SHA = "d42a6fb743ce3e3eebdf0ad2560c98de47252c0f4d3a2b561509c34f82728892"
#: L0 + L1 stacked (commit/L0.commit + L1.commit, merge/*, zfile/L0.commit.z_lz4 + zfile/L1.commit.z_lz4.tar)
L01_SHA = "7d136d857b79c2979f663ea122311b599c9df0fa25a468f99d97fe6677c6eafa"
#: ext4/ap.commit (1 GiB)
AP_SHA = "d42283c5d21fa460c9e5ab23c3ff91311f2e12030a5ba02434e006171fed233c"
#: turbooci/toci.commit over its target turbooci/layer.tar (1 GiB)
TOCI_SHA = "691cb80c6a3450794e6d26442e6033d821ea8eb3443a59064c91c48915cc6c04"


def logical_sha256(img: Any) -> str:
    """sha256 of the whole virtual disk of `img` (any RandomAccessFile), streamed in 1 MiB reads."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(MIB))
    off, size = 0, img.size()
    while off < size:
        n = img.pread_into(buf[: min(MIB, size - off)], off)
        assert n > 0, f"short read at {off} of {size}"
        h.update(buf[:n])
        off += n
    return h.hexdigest()
