"""Trace prefetch of the image service (spec §8, upstream `src/prefetch.cpp`).

Why: a container's start-up reads a small, predictable set of layer extents. Recording them
once (`recordTracePath` naming an empty file, or `ctr record-trace`) and replaying them in the
background at the next attach pulls those ranges from the registry into the block cache
before the container asks for them.

Three modes, chosen from the config by `plan_prefetch`:

- record: every read the stack issues to a lower's layer file (the LSMT file after tar/ZFile
  unwrapping, so offsets are `moffset`-based file offsets, not disk offsets) is kept as
  TraceRecord('R', layer_index, count, offset). Unlike upstream, the header/index reads made while
  the image opens are not recorded (every open makes them anyway, so replaying them gains
  nothing). `<trace>.lock` exists while recording; removing
  it, or closing the image, dumps the trace atomically and then creates `<trace>.ok`.
  Only record mode wraps the layer files (`RecordingFile`); other modes cost nothing per read.
- replay: a trace file (magic 0xC2EF1820) is read, checked and replayed by
  `prefetchConfig.concurrency` threads reading each record's range in <= 1 MiB pieces.
  Nothing of this blocks `open_image`; a bad trace is a logged warning, never a failed image.
- priority list (upstream `DynamicPrefetcher`): a text file (<= 64 KiB) of absolute paths, a
  trailing `/` or `*` meaning the whole directory; the files are located in the image's ext4
  file system (`ext4map`) and their data read through the image in the background.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..format.atomic import atomic_write_bytes
from ..format.errors import FormatError
from ..format.fileio import RandomAccessFile
from ..format.trace import HEADER, MAX_TRACE_SIZE, RECORD, TraceRecord, is_trace, read_trace, write_trace

log = logging.getLogger(__name__)

#: upstream reads each trace record in pieces of at most this size
MAX_PIECE = 1 << 20
#: default of overlaybd.json prefetchConfig.concurrency
DEFAULT_CONCURRENCY = 16
#: how often the recorder looks for the removal of `<trace>.lock` (seconds)
LOCK_POLL_SECONDS = 1.0
#: the recorder stops keeping records beyond what a trace file may hold (read_trace's limit)
MAX_RECORDS = (MAX_TRACE_SIZE - HEADER.size) // RECORD.size
#: upstream's limit for a priority list file
MAX_LIST_SIZE = 64 * 1024


@dataclass(frozen=True)
class PrefetchPlan:
    """What to do for one image: `mode` is "record", "replay" or "list"; `path` the trace file."""

    mode: str
    path: str


def plan_prefetch(cfg: Any, name: str = "<config>") -> PrefetchPlan | None:
    """Decide the prefetch mode from a DeviceConfig, as upstream does (None: no prefetch).

    `recordTracePath`: missing file -> nothing; empty -> record; trace magic -> replay; other
    content -> priority list. `accelerationLayer`: `<dir>/trace` of the last lower, if it exists
    and is non-empty, is replayed (or taken as a priority list without the magic).
    """
    if cfg.record_trace_path:
        path = cfg.record_trace_path
        field = "recordTracePath"
    elif cfg.acceleration_layer and cfg.lowers:
        accel_dir = cfg.lowers[-1].dir
        if not accel_dir:
            log.warning("%s: accelerationLayer: the acceleration layer (last lower) has no dir; no trace replay", name)
            return None
        path = os.path.join(accel_dir, "trace")
        field = "accelerationLayer"
    else:
        return None
    try:
        size = os.stat(path).st_size
        if size == 0:
            if field == "recordTracePath":
                return PrefetchPlan("record", path)
            return None  # an empty acceleration trace: nothing to replay
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        if field == "recordTracePath":
            log.warning("%s: recordTracePath: %s does not exist; no trace recorded or replayed", name, path)
        return None
    except OSError as e:
        log.warning("%s: %s: cannot read %s: %s; no trace prefetch", name, field, path, e.strerror)
        return None
    return PrefetchPlan("replay" if is_trace(head) else "list", path)


# --------------------------------------------------------------------------- record


class RecordingFile:
    """A layer file that appends every successful read to its recorder's list (`sink`).

    Only built in record mode. The recorder sets `sink` on start and clears it on stop, so the
    cost per read is one extra call, one attribute test and a list append.
    """

    __slots__ = ("inner", "name", "layer_index", "sink", "_read")

    def __init__(self, inner: RandomAccessFile, layer_index: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.layer_index = layer_index
        self._read = inner.pread_into
        #: the recorder's live record list while recording, else None
        self.sink: list[tuple[int, int, int]] | None = None

    def size(self) -> int:
        return self.inner.size()

    def pread_into(self, buf: memoryview, offset: int) -> int:
        n = self._read(buf, offset)
        sink = self.sink  # one load: stop() may clear it concurrently
        if sink is not None and n:
            sink.append((self.layer_index, n, offset))
        return n

    def pread(self, size: int, offset: int) -> bytes:
        buf = bytearray(size)
        n = self.pread_into(memoryview(buf), offset)
        return bytes(buf[:n])

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, attr: str) -> Any:
        # anything else a reader may probe (e.g. `fd`) comes from the wrapped file
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def __repr__(self) -> str:
        return f"RecordingFile({self.inner!r}, layer={self.layer_index})"


class TraceRecorder:
    """Record mode: collects the reads of the wrapped layer files and dumps them as a trace.

    Life cycle: `wrap()` each layer file while the image opens, `start()` once it is open (the
    open-time header/index reads are not recorded: replaying them would gain nothing, as they
    are made again by every open), `stop()` on lock removal or close.
    """

    def __init__(self, trace_path: str, image_name: str = "<image>") -> None:
        self.path = trace_path
        self.lock_path = trace_path + ".lock"
        self.ok_path = trace_path + ".ok"
        self.image_name = image_name
        self.files: list[RecordingFile] = []
        self._records: list[tuple[int, int, int]] = []
        self._state_lock = threading.Lock()
        self._stopped = threading.Event()
        self._done = False
        self._watcher: threading.Thread | None = None
        self._started = False
        self.dumped = False

    def wrap(self, f: RandomAccessFile, layer_index: int) -> RecordingFile:
        rf = RecordingFile(f, layer_index)
        self.files.append(rf)
        return rf

    def _set_sink(self, sink: list[tuple[int, int, int]] | None) -> None:
        for rf in self.files:
            rf.sink = sink

    def start(self, poll_seconds: float | None = None) -> bool:
        """Create `<trace>.lock` and begin recording; False (logged) if the lock cannot be created."""
        try:
            atomic_write_bytes(self.lock_path, b"")
        except OSError as e:
            log.warning("%s: recordTracePath: cannot create %s: %s; not recording", self.image_name, self.lock_path, e)
            return False
        self._started = True
        self._set_sink(self._records)
        interval = LOCK_POLL_SECONDS if poll_seconds is None else poll_seconds
        self._watcher = threading.Thread(target=self._watch_lock, args=(interval,), name="obd-trace-lock", daemon=True)
        self._watcher.start()
        log.info(
            "%s: recording a prefetch trace into %s (remove %s to stop)", self.image_name, self.path, self.lock_path
        )
        return True

    def _watch_lock(self, interval: float) -> None:
        while not self._stopped.wait(interval):
            if len(self._records) >= MAX_RECORDS:
                log.warning(
                    "%s: recordTracePath: %d records reached; trace recording stops", self.image_name, MAX_RECORDS
                )
                self.stop()
                return
            if not os.path.exists(self.lock_path):
                self.stop()
                return

    def stop(self) -> bool:
        """Stop recording and dump the trace (once); returns whether a trace was written."""
        with self._state_lock:
            if self._done or not self._started:
                return self.dumped
            self._done = True
            self._set_sink(None)
            self._stopped.set()
            records = [TraceRecord("R", layer, count, offset) for layer, count, offset in self._records[:MAX_RECORDS]]
            self._records = []
            try:
                write_trace(self.path, records)
                atomic_write_bytes(self.ok_path, b"")
            except OSError as e:
                log.warning("%s: recordTracePath: cannot write the trace %s: %s", self.image_name, self.path, e)
            else:
                self.dumped = True
                log.info("%s: prefetch trace of %d records written to %s", self.image_name, len(records), self.path)
            try:
                os.unlink(self.lock_path)  # recording is over, whoever ended it
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("%s: cannot remove %s: %s", self.image_name, self.lock_path, e)
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join()
        return self.dumped

    close = stop


# --------------------------------------------------------------------------- replay


def trace_pieces(
    records: Sequence[TraceRecord], sizes: Sequence[int], source: str = "<trace>"
) -> Iterator[tuple[int, int, int]]:
    """(layer_index, offset, count) reads for `records`: <= MAX_PIECE each, clamped to the file sizes.

    Exact repeats of a record are read once. Records that cannot be replayed (unknown layer, negative
    offset, past the end) are skipped with one warning naming the trace file and the record.
    """
    seen: set[tuple[int, int, int]] = set()
    warned = False
    for i, r in enumerate(records):
        if r.op != "R":
            continue
        key = (r.layer_index, r.offset, r.count)
        if key in seen:
            continue
        seen.add(key)
        problem = ""
        if r.layer_index >= len(sizes):
            problem = f"layer_index {r.layer_index} but the image has {len(sizes)} lowers"
            field = "layer_index"
        elif r.offset < 0:
            problem, field = f"negative offset {r.offset}", "offset"
        if problem:
            if not warned:
                log.warning("%s: trace record %d %s: %s; such records are skipped", source, i, field, problem)
                warned = True
            continue
        end = min(r.offset + r.count, sizes[r.layer_index])
        pos = r.offset
        while pos < end:
            n = min(MAX_PIECE, end - pos)
            yield r.layer_index, pos, n
            pos += n


class BackgroundReader:
    """Reads a plan of (source, offset, count) pieces with `concurrency` background threads.

    A loader thread builds the plan (`_plan`: reading and checking a trace, resolving paths...),
    so nothing of it delays the open, then it and `concurrency - 1` more workers pull pieces from a
    shared iterator. Errors of single reads are counted and logged once; close() stops the workers
    between pieces and waits for them (the sources must stay open until then).
    """

    kind = "prefetch"

    def __init__(
        self, path: str, sources: Sequence[Any], concurrency: int = DEFAULT_CONCURRENCY, image_name: str = "<image>"
    ) -> None:
        self.path = path
        self.files = list(sources)
        self.concurrency = max(1, int(concurrency))
        self.image_name = image_name
        self.pieces_read = 0
        self.bytes_read = 0
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pieces: Iterator[tuple[int, int, int]] = iter(())
        self._thread: threading.Thread | None = None

    def _plan(self) -> Iterator[tuple[int, int, int]] | None:
        """(source index, offset, count) pieces to read, or None (after logging why) to read nothing."""
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="obd-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            pieces = self._plan()
        except Exception as e:  # a bad plan must never take the image down
            log.warning("%s: %s %s not replayed: %s", self.image_name, self.kind, self.path, e)
            return
        if pieces is None:
            return
        self._pieces = pieces
        workers = [
            threading.Thread(target=self._work, name=f"obd-prefetch-{i}", daemon=True)
            for i in range(1, self.concurrency)
        ]
        for w in workers:
            w.start()
        self._work()
        for w in workers:
            w.join()
        log.info(
            "%s: %s %s replayed: %d pieces, %d bytes, %d errors",
            self.image_name,
            self.kind,
            self.path,
            self.pieces_read,
            self.bytes_read,
            self.errors,
        )

    def _next(self) -> tuple[int, int, int] | None:
        with self._lock:
            try:
                return next(self._pieces, None)
            except Exception as e:  # a lazily resolved plan failing half-way: keep what was read
                log.warning("%s: %s %s: %s; prefetch stops", self.image_name, self.kind, self.path, e)
                self._pieces = iter(())
                return None

    def _work(self) -> None:
        buf = memoryview(bytearray(MAX_PIECE))
        while not self._stop.is_set():
            piece = self._next()
            if piece is None:
                return
            src, offset, count = piece
            try:
                n = self.files[src].pread_into(buf[:count], offset)
            except Exception as e:  # prefetch is best effort; the real read will report the problem
                with self._lock:
                    self.errors += 1
                    first = self.errors == 1
                if first:
                    log.warning(
                        "%s: prefetch read of source %d [%d, +%d) failed: %s", self.image_name, src, offset, count, e
                    )
                continue
            with self._lock:
                self.pieces_read += 1
                self.bytes_read += n

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the replay to finish; True if it has."""
        t = self._thread
        if t is None:
            return True
        t.join(timeout)
        return not t.is_alive()

    def close(self) -> None:
        """Stop after the pieces being read now and wait for the threads (before the files close)."""
        self._stop.set()
        self.wait()


class TraceReplayer(BackgroundReader):
    """Replay mode: reads a trace's ranges from the layer files (index = the record's layer_index)."""

    kind = "prefetch trace"

    def __init__(
        self,
        trace_path: str,
        files: Sequence[RandomAccessFile],
        concurrency: int = DEFAULT_CONCURRENCY,
        image_name: str = "<image>",
    ) -> None:
        super().__init__(trace_path, files, concurrency, image_name)
        self.records = 0

    def _plan(self) -> Iterator[tuple[int, int, int]] | None:
        try:
            records = read_trace(self.path)
        except FormatError as e:
            log.warning("%s: prefetch trace not replayed: %s", self.image_name, e)
            return None
        self.records = len(records)
        sizes = [f.size() for f in self.files]
        return trace_pieces(records, sizes, self.path)


def parse_priority_list(data: bytes, path: str) -> list[tuple[str, bool]]:
    """(absolute path, walk the directory?) per line of a priority list; relative lines are skipped."""
    if len(data) > MAX_LIST_SIZE:
        raise FormatError(path, "priority list size", f"{len(data)} bytes exceeds the limit {MAX_LIST_SIZE}")
    out = []
    skipped = 0
    for raw in data.decode("utf-8", "surrogateescape").splitlines():
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("/"):
            skipped += 1
            continue
        walk = line.endswith(("/", "*"))
        out.append((line.rstrip("*").rstrip("/") or "/", walk))
    if skipped:
        log.warning("%s: priority list: %d lines are not absolute paths; skipped", path, skipped)
    return out


class PriorityListReplayer(BackgroundReader):
    """Priority-list mode (upstream `DynamicPrefetcher`): reads the named files' data through the image.

    The list is resolved against the ext4 file system of the merged image (`ext4map`), in list order;
    lines ending in `/` or `*` take every file under that directory. Pieces are disk ranges read with
    the image's own read path, so they pull the layer data into the cache like a container's read.
    """

    kind = "priority list"

    def __init__(
        self, list_path: str, image: Any, concurrency: int = DEFAULT_CONCURRENCY, image_name: str = "<image>"
    ) -> None:
        super().__init__(list_path, [image], concurrency, image_name)
        self.missing: list[str] = []

    def _plan(self) -> Iterator[tuple[int, int, int]] | None:
        from .ext4map import Ext4

        with open(self.path, "rb") as f:
            data = f.read(MAX_LIST_SIZE + 1)
        entries = parse_priority_list(data, self.path)
        image = self.files[0]
        vsize = image.size()
        try:
            fs = Ext4(image.pread, self.image_name, vsize)
        except FormatError as e:
            log.warning(
                "%s: priority list %s not replayed: only ext4 images are supported: %s", self.image_name, self.path, e
            )
            return None
        return self._pieces_of(fs, entries, vsize)

    def _pieces_of(self, fs: Any, entries: list[tuple[str, bool]], vsize: int) -> Iterator[tuple[int, int, int]]:
        from .ext4map import S_IFDIR

        seen: set[int] = set()
        for path, walk in entries:
            ino = fs.lookup(path)
            if ino is None:
                self.missing.append(path)
                continue
            inodes = [ino]
            if walk and fs.mode(fs.inode(ino)) == S_IFDIR:
                inodes.extend(fs.walk(ino))
            for i in inodes:
                if i in seen:
                    continue
                seen.add(i)
                for off, length in fs.data_ranges(i):
                    end = min(off + length, vsize)
                    for pos in range(off, end, MAX_PIECE):
                        yield 0, pos, min(MAX_PIECE, end - pos)
