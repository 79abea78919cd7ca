"""Streaming ZFile writer (spec §2.6), byte-identical to upstream for zstd.

Layout written: header (0x13, index fields 0) | blocks (each + 4-byte CRC when
`verify`) | jump table (u32 stored length per block) | trailer (0x16); with
`overwrite_header` the header is finally rewritten as 0x1B carrying the index
fields (needs `out.pwrite`).

Parallel design (docs/performance.md "ZFile building"): the input is cut into
batches of whole blocks (`BATCH_BYTES`); each batch is one task for a thread
pool, which compresses and CRCs its blocks and returns the stored bytes plus
their lengths. The codecs release the GIL while they run, and zstd compresses a
whole batch in one call (`multi_compress_to_buffer`), so the GIL is taken once per
batch instead of once per block. At most `2 * threads` batches are in flight and
results are written strictly in submission order, so memory stays bounded
whatever the input size, and the output (blocks, jump table) is the same bytes
for any thread count.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import sys
import threading
from array import array
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, cast

import lz4.block  # type: ignore[import-untyped]
import zstandard
from crc32c import crc32c as _std_crc32c

from ..atomic import AtomicOutput
from ..crc32c import BLOCK_CRC_SEED, crc32c_raw
from ..errors import Truncated
from ..fileio import LocalFile, RandomAccessFile
from . import header as hdr
from .codec import ACCEL, ZSTD_LEVEL
from .header import HT_SIZE, ZFileHeader
from .reader import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

#: uncompressed bytes per pool task: large enough that per-task overhead (future, queue, GIL hand-offs)
#: is small next to the compression, small enough that 2 x threads of them in flight stay a few MiB
BATCH_BYTES = 512 * 1024

_MASK = 0xFFFFFFFF
#: raw CRC with seed s == standard CRC continuing from s ^ ~0, inverted (see format/crc32c.py)
_STD_SEED = BLOCK_CRC_SEED ^ _MASK
_PACK_CRC = struct.Struct("<I").pack
_lz4_compress = lz4.block.compress

#: (stored bytes of a batch, stored length of each of its blocks)
Batch = tuple["bytes | memoryview", "array[int]"]
#: reusable output buffers of one batch for the C path: (stored bytes, u32 lengths)
OutBufs = tuple[bytearray, bytearray]


class Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


def default_threads() -> int:
    """Usable CPUs: the affinity mask (what taskset/cgroups allow), not os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ---- batch compressors (run in pool threads; pure functions of their input) ------------------------------------
_accel = ACCEL
#: True when LZ4 batches compress in C without the GIL (see docs/performance.md)
ACCELERATED = _accel is not None


def _lz4_batch(chunk: bytes | bytearray, bs: int, verify: bool, bufs: OutBufs | None = None) -> Batch:
    """LZ4: the whole batch in one GIL-free C call when the accelerator is built, else one python-lz4
    call per block (no batch API there; each call releases and retakes the GIL, so threads contend)."""
    if _accel is not None:
        nblocks = -(-len(chunk) // bs)
        if bufs is None:
            bufs = out_buffers(len(chunk), bs)
        out, raw_lens = bufs
        stored = _accel.lz4_batch_into(chunk, bs, BLOCK_CRC_SEED if verify else None, out, raw_lens)
        lens = array("I")
        lens.frombytes(memoryview(raw_lens)[: 4 * nblocks])
        if sys.byteorder != "little":
            lens.byteswap()
        return memoryview(out)[:stored], lens
    mv = memoryview(chunk)
    comp = _lz4_compress
    blocks = [comp(mv[o : o + bs], "default", False) for o in range(0, len(mv), bs)]
    return _with_crcs(blocks, verify)


def out_buffers(n: int, bs: int) -> OutBufs:
    """Output buffers big enough for the C LZ4 path over `n` input bytes in `bs`-byte blocks."""
    assert _accel is not None
    blocks = -(-n // bs)
    return bytearray(blocks * (_accel.lz4_bound(bs) + 4)), bytearray(4 * blocks)


_tls = threading.local()
_segment_tables: dict[tuple[int, int], bytes] = {}


def _segments(n: int, bs: int) -> bytes:
    """(offset, length) u64 pairs of the blocks of an n-byte batch, as multi_compress_to_buffer wants them."""
    key = (n, bs)
    table = _segment_tables.get(key)
    if table is None:
        pairs = [v for o in range(0, n, bs) for v in (o, min(bs, n - o))]
        table = struct.pack(f"<{len(pairs)}Q", *pairs)
        if n % BATCH_BYTES == 0:  # only full batches recur; the last one of each file is a one-off
            _segment_tables[key] = table
    return table


def _zstd_batch(chunk: bytes | bytearray, bs: int, verify: bool, bufs: OutBufs | None = None) -> Batch:
    """zstd: every block of the batch in one GIL-free call, each block its own frame (same bytes as
    ZstdCompressor.compress per block, which upstream's vectors pin)."""
    cctx = getattr(_tls, "zstd", None)
    if cctx is None:
        cctx = _tls.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    multi = getattr(cctx, "multi_compress_to_buffer", None)
    try:
        if multi is None:
            raise NotImplementedError
        res = multi(zstandard.BufferWithSegments(chunk, _segments(len(chunk), bs)), threads=1)
    except NotImplementedError:  # the cffi backend lacks it: block by block
        mv = memoryview(chunk)
        blocks: list[bytes] = [cctx.compress(mv[o : o + bs]) for o in range(0, len(mv), bs)]
    else:
        # BufferSegments are buffers over the one output allocation (no copy); the stubs lack __buffer__
        blocks = cast("list[bytes]", [res[i] for i in range(len(res))])
    return _with_crcs(blocks, verify)


def _with_crcs(blocks: list[bytes], verify: bool) -> Batch:
    """Join the compressed blocks of a batch, each followed by its raw CRC32C when `verify`."""
    if not verify:
        return b"".join(blocks), array("I", map(len, blocks))
    crc, seed, pack = _std_crc32c, _STD_SEED, _PACK_CRC
    parts: list[bytes] = []
    add = parts.append
    for b in blocks:
        add(b)
        add(pack(crc(b, seed) ^ _MASK))
    return b"".join(parts), array("I", [len(b) + 4 for b in blocks])


_BATCHERS: dict[int, Callable[[bytes | bytearray, int, bool, OutBufs | None], Batch]] = {
    hdr.ALGO_LZ4: _lz4_batch,
    hdr.ALGO_ZSTD: _zstd_batch,
}


class ZFileBuilder:
    """Compress a byte stream into a ZFile written sequentially to `out`.

    Call write() any number of times, then close() to write the jump table and trailer
    (and rewrite the header when `overwrite_header`). `threads` compression threads
    (None: usable CPUs; 1: everything inline in the caller's thread); the output does not
    depend on it. Use as a context manager: on an exception the pool is shut down and
    nothing more is written.
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
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self._out = out
        self._opts = ZFileHeader(
            flags=hdr.FLAGS_HEADER, block_size=block_size, algo=hdr.ALGORITHMS[algorithm], verify=int(verify)
        )
        self.block_size = block_size
        self.verify = verify
        self.overwrite_header = overwrite_header
        self._batcher = _BATCHERS[self._opts.algo]
        self.batch_bytes = max(1, BATCH_BYTES // block_size) * block_size
        self.threads = default_threads() if threads is None else threads
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zfile-compress") if self.threads > 1 else None
        # (result, input buffer, output buffers) per batch in flight, oldest first
        self._inflight: deque[tuple[Future[Batch | None], bytes | bytearray, OutBufs | None]] = deque()
        # batch-sized buffers recycled once their batch is written: fresh ~0.5 MiB allocations per batch
        # cost a page fault per 4 KiB, as much CPU as LZ4 itself (only the caller's thread touches these)
        self._free_in: list[bytearray] = []
        self._free_out: list[OutBufs] = []
        self._use_out_bufs = _accel is not None and self._opts.algo == hdr.ALGO_LZ4
        self._window = 2 * self.threads
        self._pending = bytearray()
        self._lens = array("I")
        self._raw_size = 0
        self._stored = 0
        self._closed = False
        out.write(self._opts.pack())
        # pool tasks write their own output (in batch order of offsets, not of time) when `out` is a file
        # they can pwrite into; the caller's thread then only cuts the input into batches
        self._direct = _direct_output(out) if self._pool is not None else None
        self._cond = threading.Condition()
        self._seq = 0  # batches submitted
        self._committed = 0  # batches whose output offset and lengths are assigned
        self._fail_seq = sys.maxsize  # the first batch that failed: its successors can never commit
        if self._direct is not None:
            self._data_start = self._direct.tell()
            self._direct.flush()
            self._fd = self._direct.fileno()

    # ---- input ------------------------------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append uncompressed bytes (copied; the caller may reuse its buffer on return)."""
        if self._closed:
            raise ValueError("ZFileBuilder is closed")
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        batch = self.batch_bytes
        self._raw_size += n
        pos = 0
        if self._pending:
            take = min(n, batch - len(self._pending))
            self._pending += mv[:take]
            pos = take
            if len(self._pending) == batch:
                self._submit(self._copy(self._pending))
                self._pending.clear()
        while n - pos >= batch:
            self._submit(self._copy(mv[pos : pos + batch]))
            pos += batch
        if pos < n:
            self._pending += mv[pos:]
        return n

    def _copy(self, data: bytes | bytearray | memoryview) -> bytearray:
        if len(data) == self.batch_bytes:
            buf = self.take_buffer()
            buf[:] = data
            return buf
        return bytearray(data)

    def take_buffer(self) -> bytearray:
        """A `batch_bytes` buffer to fill and pass to write_batch() (recycled from written batches)."""
        return self._free_in.pop() if self._free_in else bytearray(self.batch_bytes)

    def write_batch(self, chunk: bytearray) -> None:
        """Append `chunk` without copying it: the builder takes ownership (the caller must not touch it
        again). Only when nothing is pending and `chunk` is exactly `batch_bytes` long, or is the last
        piece of input; `compress()` reads its source straight into such buffers."""
        if self._closed:
            raise ValueError("ZFileBuilder is closed")
        if self._pending or (len(chunk) != self.batch_bytes and len(chunk) % self.block_size):
            self.write(chunk)
            return
        self._raw_size += len(chunk)
        if chunk:
            self._submit(chunk)

    def _submit(self, chunk: bytes | bytearray) -> None:
        bufs: OutBufs | None = None
        if self._use_out_bufs:
            bufs = self._free_out.pop() if self._free_out else out_buffers(self.batch_bytes, self.block_size)
        if self._pool is None:
            self._emit(self._batcher(chunk, self.block_size, self.verify, bufs), chunk, bufs)
            return
        inflight = self._inflight
        while len(inflight) >= self._window:
            self._emit_oldest()
        fut: Future[Batch | None]
        if self._direct is not None:
            fut = self._pool.submit(self._direct_task, self._seq, chunk, bufs)
            self._seq += 1
        else:
            fut = self._pool.submit(self._batcher, chunk, self.block_size, self.verify, bufs)
        inflight.append((fut, chunk, bufs))

    def _direct_task(self, seq: int, chunk: bytes | bytearray, bufs: OutBufs | None) -> Batch | None:
        """Pool task when the tasks write the output: compress, take the next offset in batch order
        and extend the jump table (under the lock), then pwrite the batch there."""
        cond = self._cond
        try:
            data, lens = self._batcher(chunk, self.block_size, self.verify, bufs)
            with cond:
                while self._committed != seq and self._fail_seq > seq:
                    cond.wait()
                if self._committed != seq:
                    raise RuntimeError("ZFileBuilder aborted (an earlier batch failed)")
                off = self._data_start + self._stored
                self._stored += len(data)
                self._lens.extend(lens)
                self._committed = seq + 1
                cond.notify_all()
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], off + done)
        except BaseException:
            with cond:
                self._fail_seq = min(self._fail_seq, seq)
                cond.notify_all()
            raise
        return None

    def _emit_oldest(self) -> None:
        fut, chunk, bufs = self._inflight.popleft()
        result = fut.result()
        if result is None:  # the task wrote it: only recycle the buffers
            self._recycle(chunk, bufs)
        else:
            self._emit(result, chunk, bufs)

    def _emit(self, result: Batch, chunk: bytes | bytearray, bufs: OutBufs | None) -> None:
        data, lens = result
        self._out.write(data)
        self._lens.extend(lens)
        self._stored += len(data)
        del data, result  # release the view of the output buffer before it is reused
        self._recycle(chunk, bufs)

    def _recycle(self, chunk: bytes | bytearray, bufs: OutBufs | None) -> None:
        if type(chunk) is bytearray and len(chunk) == self.batch_bytes and len(self._free_in) <= self._window:
            self._free_in.append(chunk)
        if bufs is not None and len(self._free_out) <= self._window:
            self._free_out.append(bufs)

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
                self._emit_oldest()
        finally:
            self._shutdown()
        if self._direct is not None:
            self._direct.seek(self._data_start + self._stored)  # the jump table and trailer follow
        table = self._lens
        if sys.byteorder != "little":
            table = array("I", table)
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
        with self._cond:  # wakes tasks waiting for a batch that will never be committed
            self._fail_seq = -1
            self._cond.notify_all()
        for fut, _, _ in self._inflight:
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


def compress(src: RandomAccessFile, out: Writable, chunk: int | None = None, **options: object) -> None:
    """Compress all of `src` into a ZFile on `out`; `options` as for ZFileBuilder (incl. `threads`).

    When `src` is a LocalFile and `out` an AtomicOutput or a regular file object with a descriptor
    (fileno(), flush(), seek(), tell(); not opened for appending), the compression threads read their own input
    and write their own output (`_ParallelFds`): nothing per batch runs on the caller's thread. Otherwise
    `src` is read in batch-sized pieces, each into a buffer handed to the builder without a copy (`chunk`
    is accepted for compatibility and ignored).
    """
    target = _direct_output(out) if isinstance(src, LocalFile) else None
    base = target.tell() if target is not None else 0
    builder = ZFileBuilder(out, **options)  # type: ignore[arg-type]
    with builder:
        size = src.size()
        if target is not None:
            assert isinstance(src, LocalFile)
            target.flush()  # the header, before the workers pwrite after it
            _ParallelFds(builder, src, size, target.fileno(), base + HT_SIZE).run()
            target.seek(base + HT_SIZE + builder._stored)  # the jump table and trailer follow
            return
        step = builder.batch_bytes
        pos = 0
        while pos < size:
            want = min(step, size - pos)
            buf = builder.take_buffer() if want == step else bytearray(want)
            n = src.pread_into(memoryview(buf), pos)
            if n == 0:
                raise Truncated(src.name, "data", f"short read at offset {pos} of {size}")
            if n != want:
                del buf[n:]
            builder.write_batch(buf)
            pos += n


class _FileLike(Protocol):
    def fileno(self) -> int: ...
    def flush(self) -> object: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def tell(self) -> int: ...


def _direct_output(out: Writable) -> _FileLike | None:
    """The file object under `out` when the workers may `pwrite` into its descriptor (a regular file
    not opened for appending; an AtomicOutput's temp file), else None."""
    f = out.file if isinstance(out, AtomicOutput) else out
    if not all(callable(getattr(f, m, None)) for m in ("fileno", "flush", "seek", "tell")):
        return None
    try:
        fd = f.fileno()  # type: ignore[attr-defined]
        if not isinstance(fd, int) or not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:  # pwrite would append whatever the offset
            return None
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return cast(_FileLike, f)


class _ParallelFds:
    """Build the blocks of a ZFile with `builder.threads` workers (the caller's thread is one of them).
    Each worker loops: take a free buffer set and the next batch index, `preadv` that batch of `src`,
    compress it (GIL-free), and park the result; under a lock, whoever parks the lowest uncommitted
    batch commits it and every parked batch that follows (output offset, jump table, in batch order:
    a few microseconds), then `pwrite`s them and frees their buffers. No worker waits for another to
    finish compressing. Memory: 2 x threads buffer sets (input and output). The builder's counters
    (`_lens`, `_stored`, `_raw_size`) end as if write() had been used."""

    def __init__(self, builder: ZFileBuilder, src: LocalFile, size: int, out_fd: int, data_start: int) -> None:
        self.b = builder
        self.src = src
        self.size = size
        self.fd = out_fd
        self.start = data_start
        self.nbatches = -(-size // builder.batch_bytes)
        self.workers = max(1, min(builder.threads, self.nbatches))
        self.cond = threading.Condition()
        self.free: list[tuple[bytearray, OutBufs | None]] = []
        self.nsets = 0  # buffer sets made so far (lazily, at most 2 x workers)
        self.next_index = 0
        self.parked: dict[int, tuple[bytes | memoryview, array[int], tuple[bytearray, OutBufs | None]]] = {}
        self.committed = 0  # batches whose offset and lengths are assigned
        self.error: BaseException | None = None

    def run(self) -> None:
        workers = [
            threading.Thread(target=self._work, name=f"zfile-compress-{i}", daemon=True) for i in range(1, self.workers)
        ]
        for t in workers:
            t.start()
        try:
            self._work()
        finally:
            for t in workers:
                t.join()
        if self.error is not None:
            raise self.error
        self.b._raw_size += self.size

    def _take(self) -> tuple[int, tuple[bytearray, OutBufs | None]] | None:
        """(batch index, buffer set) for the next batch, or None when there is none or on error."""
        b = self.b
        with self.cond:
            while not self.free and self.nsets >= 2 * self.workers and self.error is None:
                self.cond.wait()
            if self.error is not None or self.next_index >= self.nbatches:
                return None
            i = self.next_index
            self.next_index += 1
            if self.free:
                return i, self.free.pop()
            self.nsets += 1
        return i, (bytearray(b.batch_bytes), out_buffers(b.batch_bytes, b.block_size) if b._use_out_bufs else None)

    def _work(self) -> None:
        b = self.b
        bs, verify, batcher, step = b.block_size, b.verify, b._batcher, b.batch_bytes
        cond = self.cond
        try:
            while True:
                got = self._take()
                if got is None:
                    return
                i, bufset = got
                pos = i * step
                want = min(step, self.size - pos)
                buf = bufset[0] if want == step else bytearray(want)
                if self.src.pread_into(memoryview(buf), pos) != want:
                    raise Truncated(self.src.name, "data", f"short read in {want} bytes at offset {pos}")
                data, lens = batcher(buf, bs, verify, bufset[1])
                writes = []
                with cond:
                    if self.error is not None:
                        return
                    self.parked[i] = (data, lens, bufset)
                    del data
                    while self.committed in self.parked:
                        d, n, s = self.parked.pop(self.committed)
                        writes.append((d, self.start + b._stored, s))
                        b._stored += len(d)
                        b._lens.extend(n)
                        self.committed += 1
                for d, off, _ in writes:
                    view = memoryview(d)
                    done = 0
                    while done < len(view):
                        done += os.pwrite(self.fd, view[done:], off + done)
                    del view
                if writes:
                    sets = [s for _, _, s in writes]
                    writes.clear()  # no views of the output buffers survive their reuse
                    with cond:
                        self.free.extend(sets)
                        cond.notify_all()
        except BaseException as e:
            with cond:
                if self.error is None:
                    self.error = e
                cond.notify_all()
