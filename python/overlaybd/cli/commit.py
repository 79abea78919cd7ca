"""overlaybd-commit: writable layer -> committed (read-only) layer, or seal a layer in place.

Forms (upstream):
  overlaybd-commit [opts] DATA INDEX OUT          commit an RW layer
  overlaybd-commit --seal DATA INDEX              seal DATA in place (-> overlaybd.sealed)
  overlaybd-commit --commit_sealed [opts] DATA OUT  commit a sealed layer
`-z` compresses through a ZFile (header overwritten, as upstream), `-t` tar-wraps it.
The output appears only when complete (AtomicOutput); without -f an existing OUT is an error.
"""

from __future__ import annotations

import argparse
import os

from ..host.progress import Progress
from .toolrun import ToolError, parse_block_kib, parse_uuid, parser, run

TOOL = "overlaybd-commit"
#: `-z` of a layer holding at least this much data shows progress on a terminal
PROGRESS_MIN_BYTES = 64 << 20


def main(argv: list[str] | None = None) -> int:
    p = parser(TOOL, "Commit an overlaybd writable layer into a read-only layer.")
    p.add_argument("-m", dest="message", default="", help="commit message (user tag, <= 256 bytes)")
    p.add_argument("--uuid", type=parse_uuid, help="UUID of the committed layer (default: null)")
    p.add_argument("-p", "--parent-uuid", dest="parent_uuid", type=parse_uuid, help="parent UUID (default: source's)")
    p.add_argument("-z", dest="compress", action="store_true", help="compress the output as a ZFile")
    p.add_argument("--algorithm", choices=("lz4", "zstd"), default="lz4", help="ZFile algorithm (with -z)")
    p.add_argument("--bs", type=parse_block_kib, default=4096, help="ZFile block size in KiB: 4..64 (with -z)")
    p.add_argument("-t", dest="tar", action="store_true", help="tar-wrap the output (with -z)")
    p.add_argument("-f", dest="force", action="store_true", help="replace an existing output")
    p.add_argument("--turboOCI", "--fastoci", dest="turbo_oci", action="store_true", help="commit a TurboOCI layer")
    p.add_argument("--seal", action="store_true", help="seal DATA in place (DATA INDEX)")
    p.add_argument("--commit_sealed", action="store_true", help="commit a sealed layer (DATA OUT)")
    p.add_argument("--compress_threads", type=int, default=None, help="ZFile compression threads")
    p.add_argument("--upload", help="push the blob to a registry URL while writing (not supported)")
    for opt in ("--upload_bs", "--cred_file_path", "--tls_key_path", "--tls_cert_path"):
        p.add_argument(opt, help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help="ignored")
    p.add_argument("files", nargs="+", metavar="FILE", help="DATA [INDEX] [OUT]")
    args = p.parse_args(argv)
    return run(TOOL, lambda: commit(args))


def commit(args: argparse.Namespace) -> int:
    """Check the tool's own argument rules, then run the library pipeline."""
    from ..format import lsmt
    from ..format.commit import MAX_USER_TAG, commit_layer
    from ..format.output import OutputOptions

    if args.upload:
        raise ToolError("--upload: pushing while committing is not supported; push the output file instead")
    if args.compress_threads is not None and args.compress_threads < 1:
        raise ToolError(f"--compress_threads: must be >= 1, got {args.compress_threads}")
    tag = args.message.encode()
    if len(tag) > MAX_USER_TAG:
        raise ToolError(f"-m: commit message is {len(tag)} bytes, at most {MAX_USER_TAG} fit the header")
    files = args.files
    if args.seal:
        if len(files) != 2:
            raise ToolError("--seal takes DATA INDEX")
        lsmt.seal(files[0], files[1])
        return 0
    if args.commit_sealed:
        if len(files) != 2:
            raise ToolError("--commit_sealed takes DATA OUT")
        data, index, out = files[0], None, files[1]
    else:
        if len(files) != 3:
            raise ToolError("expected DATA INDEX OUT")
        data, index, out = files
    options = OutputOptions(
        zfile=args.compress,
        algorithm=args.algorithm,
        block_size=args.bs,
        tar=args.tar and args.compress,  # upstream: -t only wraps a compressed output
        threads=args.compress_threads,
        replace=args.force,
    )
    used = _used_bytes(data) if args.compress else 0
    with Progress(TOOL, enabled=None if used >= PROGRESS_MIN_BYTES else False) as progress:
        progress.stage(f"commit {os.path.basename(data)}", used)
        commit_layer(
            data,
            index,
            out,
            options,
            uuid=args.uuid,
            parent_uuid=args.parent_uuid,
            user_tag=tag,
            turbo_oci=args.turbo_oci,
            progress=progress.advance if progress.enabled else None,
        )
    return 0


def _used_bytes(path: str) -> int:
    """Bytes `path` really holds (a sparse layer's size is its virtual size): the progress total of a commit."""
    try:
        st = os.stat(path)
    except OSError:
        return 0  # commit_layer reports the missing file
    return min(st.st_size, st.st_blocks * 512)
