"""Per-block compression codecs for ZFile (spec §2.4).

Every block is an independent raw LZ4 block (no frame, no size prefix) or a full
zstd frame (level 3, content size present). Both libraries release the GIL, so a
thread pool compresses in parallel; their context objects are not thread-safe, so
each thread keeps its own (thread-local).

Decompression never trusts a size claimed by the data: LZ4 is given a capacity of
`block_size`; a zstd frame's declared content size is checked against
`block_size` before the library allocates anything.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import cast

import lz4.block  # type: ignore[import-untyped]  # no stubs; the casts below give its results types
import zstandard

from .header import ALGO_LZ4, ALGO_ZSTD

ZSTD_LEVEL = 3

Buffer = bytes | bytearray | memoryview

_tls = threading.local()


class DecodeError(Exception):
    """A block did not decompress to the expected length (caller adds file/field context)."""


def _zstd_dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "zstd_d", None)
    if d is None:
        d = _tls.zstd_d = zstandard.ZstdDecompressor()
    return d


#: the raw library call `(data, capacity)` for hot loops that handle errors themselves (pass the capacity
#: positionally: keyword parsing costs ~0.2 us per 4 KiB block)
lz4_block_decompress = lz4.block.decompress


def _lz4_decompress(data: Buffer, capacity: int) -> bytes:
    try:
        return cast(bytes, lz4.block.decompress(data, capacity))
    except lz4.block.LZ4BlockError as e:
        raise DecodeError(f"lz4: {e}") from e


def _zstd_decompress(data: Buffer, capacity: int) -> bytes:
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise DecodeError(f"zstd frame header: {e}") from e
    if declared > capacity:
        raise DecodeError(f"zstd frame claims {declared} bytes, block capacity is {capacity}")
    try:
        if declared < 0:  # unknown size: let zstd bound the output itself
            return _zstd_dctx().decompress(data, max_output_size=capacity)
        return _zstd_dctx().decompress(data)
    except zstandard.ZstdError as e:
        raise DecodeError(f"zstd: {e}") from e


def decompressor(algo: int) -> Callable[[Buffer, int], bytes]:
    """The block decompressor `(data, capacity) -> bytes` for a header `algo` value."""
    if algo == ALGO_LZ4:
        return _lz4_decompress
    if algo == ALGO_ZSTD:
        return _zstd_decompress
    raise ValueError(f"unsupported ZFile algorithm {algo}")


def _load_accelerator() -> ModuleType | None:
    """The C helper (`_zbatch.c`) wired to python-lz4's own LZ4 functions; None when it is not built
    (or OVERLAYBD_ZFILE_PURE_PYTHON is set), and then the callers use the Python paths."""
    if os.environ.get("OVERLAYBD_ZFILE_PURE_PYTHON"):
        return None
    try:
        import ctypes

        from . import _zbatch  # type: ignore[attr-defined,unused-ignore]  # absent unless the C helper was built

        lib = ctypes.CDLL(lz4.block._block.__file__)
        names = ("LZ4_createStream", "LZ4_freeStream", "LZ4_resetStream", "LZ4_compress_fast_continue")
        addrs = [ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in (*names, "LZ4_compressBound")]
        _zbatch.init(*addrs)
        _zbatch.init_read(ctypes.cast(lib.LZ4_decompress_safe, ctypes.c_void_p).value)
    except (ImportError, OSError, AttributeError, ValueError):
        return None
    return cast(ModuleType, _zbatch)


#: the C helper module, or None
ACCEL = _load_accelerator()


def max_compressed_len(block_size: int) -> int:
    """Generous upper bound of one stored block (LZ4/zstd worst-case expansion + CRC)."""
    return block_size + block_size // 255 + 1024
