"""overlaybd-zfile: compress a file into a ZFile, extract one (-x), or check its block CRCs (--verify).

Forms (upstream):
  overlaybd-zfile [--algorithm lz4|zstd] [--bs KB] [-t] [-f] SRC DST   compress SRC
                  [--threads N]                                       (N compression threads; default usable CPUs)
  overlaybd-zfile [opts] DST                                            compress stdin
  overlaybd-zfile -x [-t] [-f] SRC DST                                  decompress (not from stdin)
  overlaybd-zfile --verify [SRC]                                        check every block CRC (stdin if no SRC)
Compression always writes block CRCs and never overwrites the header (as upstream).
Inputs are unwrapped from a tar wrapper when they have one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import IO

from .toolrun import CHUNK, ToolError, parse_block_kib, parse_threads, parser, run

TOOL = "overlaybd-zfile"


def main(argv: list[str] | None = None) -> int:
    p = parser(TOOL, "Create, extract or verify ZFile compressed files.")
    p.add_argument("-x", dest="extract", action="store_true", help="extract (decompress) SRC into DST")
    p.add_argument("--verify", action="store_true", help="verify the block checksums of SRC")
    p.add_argument("-t", dest="tar", action="store_true", help="tar-wrap the compressed output")
    p.add_argument("-f", dest="force", action="store_true", help="replace an existing DST")
    p.add_argument("--algorithm", choices=("lz4", "zstd"), default="lz4", help="compression algorithm")
    p.add_argument("--bs", type=parse_block_kib, default=4096, help="block size in KiB: 4, 8, 16, 32 or 64")
    p.add_argument(
        "--threads", type=parse_threads, default=None, help="compression threads (default: usable CPUs, affinity)"
    )
    p.add_argument("--verbose", action="store_true", help="ignored")
    p.add_argument("src", nargs="?", help="source file")
    p.add_argument("dst", nargs="?", help="target file")
    args = p.parse_args(argv)
    return run(TOOL, lambda: zfile_tool(args))


def _stdin_copy() -> IO[bytes]:
    """Spool stdin to an anonymous temp file so it can be read positionally."""
    tmp = tempfile.TemporaryFile(prefix="overlaybd-zfile-stdin.")
    src = sys.stdin.buffer
    while True:
        chunk = src.read(CHUNK)
        if not chunk:
            break
        tmp.write(chunk)
    tmp.flush()
    return tmp


def _open_source(path: str | None):
    """(RandomAccessFile, [things to close]); path None means stdin."""
    from ..format.fileio import LocalFile

    if path is None or path == "-":
        tmp = _stdin_copy()
        f = LocalFile(f"/proc/self/fd/{tmp.fileno()}")
        f.name = "<stdin>"
        return f, [f, tmp]
    f = LocalFile(path)
    return f, [f]


def zfile_tool(args: argparse.Namespace) -> int:
    """Pick the form from the arguments; the work is the library's (format.commit)."""
    from ..format.commit import compress_file, decompress_file, verify_zfile
    from ..format.output import OutputOptions

    if args.verify:
        if args.dst is not None:
            raise ToolError("--verify takes a single SRC")
        f, closers = _open_source(args.src)
        try:
            verify_zfile(f)
        finally:
            for c in closers:
                c.close()
        print(f"{f.name} is a valid zfile blob.")
        return 0
    if args.src is None:
        raise ToolError("missing SRC/DST")
    if args.dst is None:
        if args.extract:
            raise ToolError("decompression cannot read from stdin: give SRC and DST")
        src_path, dst = None, args.src
    else:
        src_path, dst = args.src, args.dst
    f, closers = _open_source(src_path)
    try:
        if args.extract:
            decompress_file(f, dst, replace=args.force)
        else:
            options = OutputOptions(
                zfile=True,
                algorithm=args.algorithm,
                block_size=args.bs,
                tar=args.tar,
                replace=args.force,
                threads=args.threads,
            )
            compress_file(f, dst, options)
    finally:
        for c in closers:
            c.close()
    return 0
