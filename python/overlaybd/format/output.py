"""Layer output files: optionally ZFile-compressed and tar-wrapped, visible only when complete.

Why here and not in the tools: commit, merge, the ZFile tool and the image convertor all
write a layer the same way (AtomicOutput <- tar wrapper <- ZFile builder), and a crash or
error at any point must leave no file at the target (or the previous one), never a
half-written layer that opens as valid.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from .atomic import AtomicOutput
from .errors import FormatError, Truncated
from .fileio import RandomAccessFile

DEFAULT_BLOCK_SIZE = 4096
CHUNK = 1 << 20


class OutputExists(FormatError):
    """The output path exists and replacing it was not asked for."""


class _Stage(Protocol):
    """A stage of the output chain (ZFile builder, tar wrapper): bytes in, closed at the end."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class OutputOptions:
    """How a layer file is written.

    `threads` is passed to the ZFile builder (None: its default); `replace` allows an existing
    output to be replaced (atomically, at the end).
    """

    zfile: bool = False
    algorithm: str = "lz4"
    block_size: int = DEFAULT_BLOCK_SIZE
    tar: bool = False
    threads: int | None = None
    replace: bool = False


class LayerOutput:
    """A write-only layer output file; `finish()` makes it appear at `path`, `abort()` drops it.

    `overwrite_header` makes the ZFile builder rewrite its header at the end (upstream's commit
    does, its merge and zfile tool do not), so it is a property of the pipeline, not an option.
    Upstream unlinks an existing output first; we replace it atomically at the end.
    """

    def __init__(self, path: str, options: OutputOptions = OutputOptions(), *, overwrite_header: bool = False) -> None:
        if os.path.lexists(path) and not options.replace:
            raise OutputExists(path, "output", "file exists")
        self.path = path
        self.atomic = AtomicOutput(path)
        self._stages: list[_Stage] = []
        sink: _Stage | AtomicOutput = self.atomic
        try:
            if options.tar:
                from .tarwrap import TarWrapWriter

                tar = TarWrapWriter(self.atomic)  # always the first stage over the file
                self._stages.insert(0, tar)
                sink = tar
            if options.zfile:
                from .zfile import ZFileBuilder

                builder = ZFileBuilder(
                    sink,
                    algorithm=options.algorithm,
                    block_size=options.block_size,
                    verify=True,
                    overwrite_header=overwrite_header,
                    threads=options.threads,
                )
                self._stages.insert(0, builder)
                sink = builder
        except ValueError as e:  # bad algorithm or block size
            self.atomic.abort()
            raise FormatError(path, "output options", str(e)) from None
        except BaseException:
            self.atomic.abort()
            raise
        self._sink = sink

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self._sink.write(data)

    def finish(self) -> None:
        for stage in self._stages:
            stage.close()
        self.atomic.commit()

    def abort(self) -> None:
        for stage in self._stages:
            stop = getattr(stage, "abort", None)
            if stop is not None:
                try:
                    stop()
                except Exception:  # already failing; the temp file is removed below regardless
                    pass
        self.atomic.abort()

    def __enter__(self) -> LayerOutput:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.finish()
        else:
            self.abort()


def read_chunks(img: RandomAccessFile, chunk: int = CHUNK) -> Iterator[memoryview]:
    """Yield memoryviews over all of `img` in order, reusing one buffer (no copy per chunk).

    Each view is valid until the next one is taken; a short read is Truncated naming the file.
    """
    size = img.size()
    view = memoryview(bytearray(chunk))
    off = 0
    while off < size:
        want = min(chunk, size - off)
        n = img.pread_into(view[:want], off)
        if n != want:
            raise Truncated(img.name, "data", f"short read at offset {off}: {n} of {want} bytes")
        yield view[:want]
        off += want
