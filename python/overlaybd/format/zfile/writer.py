"""Streaming ZFile writer (spec §2.6), byte-identical to upstream for zstd.

Layout written: header (0x13, index fields 0) | blocks (each + 4-byte CRC when
`verify`) | jump table (u32 stored length per block) | trailer (0x16); with
`overwrite_header` the header is finally rewritten as 0x1B carrying the index
fields (needs `out.pwrite`).

Compression runs in a thread pool (lz4 and zstd release the GIL). Input is cut
into batches of whole blocks (~256 KiB, so per-task overhead stays small next to
the compression work); at most `2 * threads` batches are in flight, and results
are written strictly in submission order, so memory stays bounded whatever the
input size and the output is deterministic.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from ..crc32c import BLOCK_CRC_SEED, crc32c_raw
from ..errors import Truncated
from ..fileio import RandomAccessFile
from . import header as hdr
from .codec import compressor
from .header import HT_SIZE, ZFileHeader
from .reader import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

BATCH_BYTES = 256 * 1024


class Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class ZFileBuilder:
    """Compress a byte stream into a ZFile written sequentially to `out`.

    Call write() any number of times, then close() to write the jump table and trailer
    (and rewrite the header when `overwrite_header`). Use as a context manager: on an
    exception the pool is shut down and nothing more is written.
    """

    def __init__(
        self,
        out: Writable,
        *,
        algorithm: str = "lz4",
        block_size: int = 4096,
        verify: bool = True,
        overwrite_header: bool = False,
        threads: int | None = None,
    ) -> None:
        if algorithm not in hdr.ALGORITHMS:
            raise ValueError(f"algorithm must be one of {sorted(hdr.ALGORITHMS)}, not {algorithm!r}")
        if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two in {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")
        if overwrite_header and not hasattr(out, "pwrite"):
            raise ValueError("overwrite_header needs an output with pwrite(data, offset)")
        self._out = out
        self._opts = ZFileHeader(
            flags=hdr.FLAGS_HEADER, block_size=block_size, algo=hdr.ALGORITHMS[algorithm], verify=int(verify)
        )
        self.block_size = block_size
        self.verify = verify
        self.overwrite_header = overwrite_header
        self._compress = compressor(self._opts.algo)
        self._batch = max(1, BATCH_BYTES // block_size) * block_size
        self.threads = default_threads() if threads is None else max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zfile-compress") if self.threads > 1 else None
        self._inflight: deque[Future[tuple[bytes, list[int]]]] = deque()
        self._window = 2 * self.threads
        self._pending = bytearray()
        self._lens = array("I")
        self._raw_size = 0
        self._stored = 0
        self._closed = False
        out.write(self._opts.pack())

    # ---- input ------------------------------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append uncompressed bytes (copied; the caller may reuse its buffer on return)."""
        if self._closed:
            raise ValueError("ZFileBuilder is closed")
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        self._raw_size += n
        pos = 0
        if self._pending:
            take = min(n, self._batch - len(self._pending))
            self._pending += mv[:take]
            pos = take
            if len(self._pending) == self._batch:
                self._submit(bytes(self._pending))
                self._pending.clear()
        while n - pos >= self._batch:
            self._submit(bytes(mv[pos : pos + self._batch]))
            pos += self._batch
        if pos < n:
            self._pending += mv[pos:]
        return n

    def _submit(self, chunk: bytes) -> None:
        if self._pool is None:
            self._emit(self._compress_batch(chunk))
            return
        while len(self._inflight) >= self._window:
            self._emit(self._inflight.popleft().result())
        self._inflight.append(self._pool.submit(self._compress_batch, chunk))

    def _compress_batch(self, chunk: bytes) -> tuple[bytes, list[int]]:
        """Compress whole blocks of `chunk` (runs in a worker); returns stored bytes and per-block lengths."""
        bs = self.block_size
        mv = memoryview(chunk)
        parts: list[bytes] = []
        lens: list[int] = []
        for off in range(0, len(mv), bs):
            c = self._compress(mv[off : off + bs])
            parts.append(c)
            if self.verify:
                parts.append(crc32c_raw(c, BLOCK_CRC_SEED).to_bytes(4, "little"))
                lens.append(len(c) + 4)
            else:
                lens.append(len(c))
        return b"".join(parts), lens

    def _emit(self, result: tuple[bytes, list[int]]) -> None:
        data, lens = result
        self._out.write(data)
        self._lens.extend(lens)
        self._stored += len(data)

    # ---- finish -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush the last blocks, write jump table + trailer, rewrite the header if asked. Idempotent."""
        if self._closed:
            return
        try:
            if self._pending:
                self._submit(bytes(self._pending))
                self._pending.clear()
            while self._inflight:
                self._emit(self._inflight.popleft().result())
        finally:
            self._shutdown()
        table = array("I", self._lens)
        if sys.byteorder != "little":
            table.byteswap()
        table_bytes = table.tobytes()
        info = ZFileHeader(
            flags=hdr.FLAGS_TRAILER,
            index_offset=HT_SIZE + self._stored,
            index_size=len(self._lens),
            original_file_size=self._raw_size,
            index_crc=crc32c_raw(table_bytes),
            block_size=self.block_size,
            algo=self._opts.algo,
            verify=self._opts.verify,
        )
        self._out.write(table_bytes)
        self._out.write(info.pack())
        if self.overwrite_header:
            self._out.pwrite(info.with_flags(hdr.FLAGS_HEADER_OVERWRITE).pack(), 0)  # type: ignore[attr-defined]
        self.trailer = info

    def abort(self) -> None:
        """Stop without finishing the file (pending work is discarded)."""
        self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        for fut in self._inflight:
            fut.cancel()
        self._inflight.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    @property
    def bytes_in(self) -> int:
        """Uncompressed bytes accepted so far."""
        return self._raw_size

    def __enter__(self) -> "ZFileBuilder":
        return self

    def __exit__(self, et: type[BaseException] | None, *rest: object) -> None:
        if et is None:
            self.close()
        else:
            self.abort()


def compress(src: RandomAccessFile, out: Writable, chunk: int = 1 << 20, **options: object) -> None:
    """Compress all of `src` into a ZFile on `out`; `options` as for ZFileBuilder."""
    builder = ZFileBuilder(out, **options)  # type: ignore[arg-type]
    with builder:
        buf = memoryview(bytearray(chunk))
        size = src.size()
        pos = 0
        while pos < size:
            n = src.pread_into(buf[: min(chunk, size - pos)], pos)
            if n == 0:
                raise Truncated(src.name, "data", f"short read at offset {pos} of {size}")
            builder.write(buf[:n])
            pos += n
