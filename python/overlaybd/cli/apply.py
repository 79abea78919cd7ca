"""`overlaybd-apply` and `turboOCI-apply`: apply an OCI layer tar onto an image's writable layer (upstream flags).

`overlaybd-apply [--mkfs] [--raw] [--service_config_path P] [--checksum SHA256] TAR CONFIG` applies TAR
(plain, gzip or zstd; a FIFO works) onto the upper layer of CONFIG (config.v1.json), as upstream's
convertor does for every layer before `overlaybd-commit`. Needs root, /dev/fuse and loop devices.
`turboOCI-apply` parses upstream's flags but TurboOCI fs-meta layers (file data left in the original
gzip blob) are not built by this implementation: it says so and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os

from .toolrun import ToolError, load_service, parser, run

TOOL = "overlaybd-apply"
TURBO_TOOL = "turboOCI-apply"


def _existing_file(text: str) -> str:
    """CLI11's ExistingFile check: the path must exist and not be a directory."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"File does not exist: {text}")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"File is actually a directory: {text}")
    return text


def main(argv: list[str] | None = None) -> int:
    p = parser(TOOL, "Apply an OCIv1 tar layer to an overlaybd image (its writable upper layer).")
    p.add_argument("--raw", action="store_true", help="CONFIG is a raw image file, not config.v1.json")
    p.add_argument("--mkfs", action="store_true", help="make an ext4 file system before applying (bottom layer)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--service_config_path", type=_existing_file, help="overlaybd.json (default /etc/overlaybd/...)")
    p.add_argument("--gz_index_path", help="TurboOCI gzip index (not supported)")
    p.add_argument("--checksum", default="", help="sha256 of the uncompressed tar; a mismatch fails")
    p.add_argument("input_path", type=_existing_file, help="OCIv1 tar layer (plain, gzip or zstd; FIFO ok)")
    p.add_argument("image_config_path", type=_existing_file, help="config.v1.json (or raw image with --raw)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run(TOOL, lambda: _apply(args))


def _apply(args: argparse.Namespace) -> int:
    from ..convert.apply import apply_tar
    from ..convert.convertor import ConvertError
    from ..convert.extract import LayerError
    from ..host.progress import Progress

    if args.gz_index_path:
        raise ToolError("--gz_index_path: TurboOCI layers are not supported by this implementation")
    checksum = args.checksum.strip().lower()
    if checksum and len(checksum.removeprefix("sha256:")) != 64:
        raise ToolError(f"--checksum: expected a sha256 (64 hex digits), got {args.checksum!r}")
    service = None if args.raw else load_service(args.service_config_path)
    try:
        apply_tar(
            args.input_path,
            args.image_config_path,
            make_fs=args.mkfs,
            raw=args.raw,
            service=service,
            checksum=checksum,
            progress=Progress(TOOL),
        )
    except (ConvertError, LayerError) as e:
        raise ToolError(str(e)) from e
    print(f"{TOOL} done")
    return 0


def turbo_main(argv: list[str] | None = None) -> int:
    p = parser(TURBO_TOOL, "Apply an OCIv1 tar layer to an 'Overlaybd-TurboOCI v1' image (not supported here).")
    p.add_argument("--mkfs", action="store_true", help="mkfs before apply")
    p.add_argument("--fstype", default="ext4", help="file system type (ext4 or erofs)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--service_config_path", type=_existing_file, help="overlaybd.json")
    p.add_argument("--gz_index_path", default="gzip.meta", help="gzip index to build")
    p.add_argument("--import", dest="import_headers", action="store_true", help="build from exported tar headers")
    p.add_argument("--export", dest="export_headers", action="store_true", help="export tar headers to CONFIG")
    p.add_argument("input_path", type=_existing_file, help="OCIv1 tar(.gz) layer")
    p.add_argument("image_config_path", nargs="?", help="config.v1.json (output file with --export)")
    args = p.parse_args(argv)

    def refuse() -> int:
        if args.fstype not in ("ext4", "erofs"):
            raise ToolError(f"--fstype: {args.fstype!r} is not one of ext4, erofs")
        raise ToolError(
            "TurboOCI layers (fs metadata over the original gzip blob) are not supported by this "
            "implementation; convert to a native overlaybd image with overlaybd-apply/convertor instead"
        )

    return run(TURBO_TOOL, refuse)
