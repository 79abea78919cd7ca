"""`overlaybd-convert SRC DST`: convert an OCI image into an overlaybd image.

SRC/DST are skopeo-style: `oci:DIR[:NAME]` (an OCI layout) or `docker://HOST/REPO:TAG` (a registry,
moved with skopeo). As root layers are built on a FUSE + loop mount; otherwise (or with --userspace)
with e2fsprogs on a scratch image. Manifests are Docker v2 for a registry destination (as upstream's
convertor) and OCI for an `oci:` layout destination (an OCI layout can only index OCI manifests for skopeo);
--oci / --docker choose explicitly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

from overlaybd import __version__


def _layout_arg(text: str) -> tuple[str, str | None]:
    body = text[len("oci:") :]
    path, _, name = body.partition(":")
    return path, name or None


def main(argv: list[str] | None = None) -> int:
    from overlaybd.convert.convertor import ConvertError, Options, convert_layout
    from overlaybd.convert.extract import LayerError
    from overlaybd.host.progress import Progress
    from overlaybd.oci.layout import Layout, LayoutError
    from overlaybd.oci.skopeo import SkopeoError, pull_to_layout, push_from_layout

    ap = argparse.ArgumentParser(prog="overlaybd-convert", description=__doc__)
    ap.add_argument("src", help="oci:DIR[:NAME] or docker://REF")
    ap.add_argument("dst", help="oci:DIR:NAME or docker://REF")
    ap.add_argument("--fstype", default="ext4", help="filesystem inside the image (ext4)")
    ap.add_argument("--vsize", type=int, default=64, help="virtual size in GB (default 64)")
    ap.add_argument("--algorithm", choices=("lz4", "zstd"), default="lz4", help="ZFile compression")
    ap.add_argument("--bs", type=int, default=4, choices=(4, 8, 16, 32, 64), help="ZFile block size (KiB)")
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--oci", action="store_true", help="OCI manifest and media types (default for oci: destinations)")
    kind.add_argument(
        "--docker", action="store_true", help="Docker v2 manifest and media types (default for docker:// destinations)"
    )
    ap.add_argument("--insecure", action="store_true", help="plain HTTP / no TLS verification for registries")
    ap.add_argument("--work-dir", default=None, help="scratch directory")
    ap.add_argument(
        "--userspace",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build layers with e2fsprogs on a scratch image: no root, FUSE, loop or mount (default: when not root)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--version", action="version", version=f"overlaybd-convert {__version__}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    opts = Options(
        vsize_gb=args.vsize,
        fstype=args.fstype,
        algorithm=args.algorithm,
        block_kib=args.bs,
        oci=args.oci or (args.dst.startswith("oci:") and not args.docker),
        userspace=args.userspace,
    )
    try:
        if args.work_dir:
            os.makedirs(args.work_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="obdconv-io-", dir=args.work_dir) as tmp:
            if args.src.startswith("oci:"):
                src_path, src_name = _layout_arg(args.src)
            elif args.src.startswith("docker://"):
                src_path, src_name = f"{tmp}/src", "src"
                pull_to_layout(args.src, src_path, src_name, tmp, insecure=args.insecure)
            else:
                ap.error(f"src: expected oci:DIR[:NAME] or docker://REF, got {args.src!r}")
            if args.dst.startswith("oci:"):
                dst_path, dst_name = _layout_arg(args.dst)
                dst_name = dst_name or "latest"
            elif args.dst.startswith("docker://"):
                dst_path, dst_name = f"{tmp}/dst", "dst"
            else:
                ap.error(f"dst: expected oci:DIR:NAME or docker://REF, got {args.dst!r}")
            digest = convert_layout(
                Layout(src_path),
                Layout(dst_path),
                dst_name,
                src_name=src_name,
                opts=opts,
                work_dir=args.work_dir,
                progress=Progress("overlaybd-convert"),
            )
            if args.dst.startswith("docker://"):
                push_from_layout(dst_path, dst_name, args.dst, tmp, insecure=args.insecure)
    except (ConvertError, LayoutError, LayerError, SkopeoError, OSError) as e:
        print(f"overlaybd-convert: {e}", file=sys.stderr)
        return 1
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
