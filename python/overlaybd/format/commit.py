"""Library pipelines that write layer files: commit, merge, ZFile compress/extract/verify.

Why a library: the tools (`overlaybd-commit`, `-merge`, `-zfile`) and the image convertor
run the same pipelines; the tools only parse arguments and turn FormatError into one line
and exit code 1, the convertor calls these functions directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from . import lsmt, tarwrap, zfile
from .errors import FormatError
from .fileio import LocalFile, RandomAccessFile
from .output import LayerOutput, OutputOptions, read_chunks

MAX_USER_TAG = 256  # bytes of the header's user tag field


def commit_layer(
    data: str | os.PathLike[str],
    index: str | os.PathLike[str] | None,
    out: str,
    options: OutputOptions = OutputOptions(),
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    user_tag: bytes = b"",
    turbo_oci: bool = False,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Commit a writable layer (`data` + `index`) or a sealed one (`index` None) into `out`.

    As upstream: the uuid is NULL unless given, the parent uuid defaults to the source's, a
    ZFile output has its header overwritten at the end. A TurboOCI (warp) layer's remote
    mappings point into the original layer tar and are copied verbatim, so that tar is not
    needed here. `progress` is told the size of every piece of the (uncompressed) layer written.
    """
    if len(user_tag) > MAX_USER_TAG:
        raise FormatError(out, "user_tag", f"{len(user_tag)} bytes, at most {MAX_USER_TAG} fit the header")
    if options.threads is not None and options.threads < 1:
        raise FormatError(out, "threads", f"must be >= 1, got {options.threads}")
    source: lsmt.ReadOnlyLayer | lsmt.WritableLayer
    if index is None:
        if turbo_oci:
            raise FormatError(os.fspath(data), "source", "a sealed TurboOCI layer cannot be committed")
        f = LocalFile(data)
        try:
            source = lsmt.open_ro(f)  # the layer owns (and closes) the file from here
        except BaseException:
            f.close()
            raise
    elif turbo_oci:
        source = lsmt.open_warp_rw(data, index, readonly=True)
    else:
        source = lsmt.open_rw(data, index, readonly=True)
    try:
        with LayerOutput(out, options, overwrite_header=True) as output:
            sink: LayerOutput | _Reporting = output if progress is None else _Reporting(output, progress)
            if turbo_oci:
                assert isinstance(source, lsmt.WarpWritableLayer)
                lsmt.commit_warp(source, sink, uuid=uuid, parent_uuid=parent_uuid)
            else:
                lsmt.commit(source, sink, uuid=uuid, parent_uuid=parent_uuid, user_tag=user_tag)
    finally:
        source.close()


class _Reporting:
    """A layer output that reports the size of each write (progress of long commits)."""

    def __init__(self, output: LayerOutput, report: Callable[[int], None]) -> None:
        self.output, self.report = output, report

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self.output.write(data)
        self.report(len(data))
        return n


def merge_layers(
    layers: Sequence[lsmt.ReadOnlyLayer],
    out: str,
    options: OutputOptions = OutputOptions(zfile=True),
) -> None:
    """Flatten read-only `layers` (bottom..top) into one committed layer at `out` (upstream
    `merge_files_ro`: uuid NULL, parent uuid of the bottom layer; ZFile header not overwritten)."""
    with LayerOutput(out, options) as sink:
        lsmt.merge(layers, sink)


def compress_file(src: RandomAccessFile, out: str, options: OutputOptions = OutputOptions(zfile=True)) -> None:
    """Compress any byte source into a ZFile at `out` (block CRCs on, header not overwritten)."""
    if not options.zfile:
        raise FormatError(out, "output options", "compress_file writes a ZFile: zfile must be set")
    if isinstance(src, LocalFile) and not options.tar:
        _compress_local(src, out, options)
        return
    with LayerOutput(out, options) as sink:
        for piece in read_chunks(src):  # the ZFile builder copies what it is given
            sink.write(piece)


def _compress_local(src: LocalFile, out: str, options: OutputOptions) -> None:
    """A local file to a bare ZFile: the compression threads pread their input and pwrite their output
    themselves (`zfile.compress`), so nothing per batch runs on this thread and the build scales with cores."""
    from .atomic import AtomicOutput
    from .output import OutputExists

    if os.path.lexists(out) and not options.replace:
        raise OutputExists(out, "output", "file exists")
    atomic = AtomicOutput(out)
    try:
        zfile.compress(
            src,
            atomic,
            algorithm=options.algorithm,
            block_size=options.block_size,
            verify=True,
            threads=options.threads,
        )
    except ValueError as e:  # bad algorithm or block size
        atomic.abort()
        raise FormatError(out, "output options", str(e)) from None
    except BaseException:
        atomic.abort()
        raise
    atomic.commit()


def open_zfile_payload(f: RandomAccessFile) -> RandomAccessFile:
    """The ZFile inside `f` (unwrapping a tar wrapper), or FormatError naming `f`."""
    payload = tarwrap.open_tar(f) or f
    if not zfile.is_zfile(payload):
        raise FormatError(f.name, "magic", "not a ZFile")
    return payload


def decompress_file(src: RandomAccessFile, out: str, *, replace: bool = False) -> None:
    """Write the original bytes of the (possibly tar-wrapped) ZFile `src` to `out`.

    `src` stays the caller's to close (the reader over it holds nothing else)."""
    zf = zfile.open_zfile(open_zfile_payload(src))
    with LayerOutput(out, OutputOptions(replace=replace)) as sink:
        for piece in read_chunks(zf):
            sink.write(piece)


def verify_zfile(src: RandomAccessFile) -> None:
    """Check every block CRC of the (possibly tar-wrapped) ZFile `src`; BadChecksum on damage."""
    zfile.verify_blocks(open_zfile_payload(src))
