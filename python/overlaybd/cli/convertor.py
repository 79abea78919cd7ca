"""`convertor`: upstream's standalone image convertor, registry to registry (flags of accelerated-container-image).

`convertor -r REPO -i TAG -o NEW_TAG` pulls REPO:TAG, converts every layer to an overlaybd layer and
pushes REPO:NEW_TAG (Docker v2 manifest; `--oci` for OCI). `-u USER:PASS` logs in to the registry,
`--plain` talks plain HTTP. Registry transport is skopeo's; conversion is `overlaybd-convert`'s
(root, /dev/fuse and loop devices). `--mkfs=false` stacks the layers on the shipped empty ext4 base
layer (`baselayers/ext4_64`) and pushes it as the first layer, as upstream does. Not supported, and
refused with a message: `--db-str/--db-type` (MySQL deduplication), `--fastoci/--turboOCI`,
`--referrer`, `--root-ca`, `--client-cert`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

from .toolrun import ToolError, parse_bool, parser, run

TOOL = "convertor"
#: where upstream's convertor looks for the base layer, then where this bundle ships it
BASE_LAYER_PATHS = ("/opt/overlaybd/baselayers/ext4_64", "/usr/local/overlaybd/baselayers/ext4_64")


def _flag_bool(text: str) -> bool:
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: use true or false") from None


def build_parser() -> argparse.ArgumentParser:
    p = parser(TOOL, "Convert an OCI image in a registry into an overlaybd image (userspace convertor).")
    p.add_argument("-r", "--repository", required=True, help="repository of the image, e.g. registry/ns/app")
    p.add_argument("-u", "--username", help="USER[:PASSWORD] for the registry")
    p.add_argument("--plain", action="store_true", help="plain HTTP to the registry")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("-i", "--input-tag", default="", help="tag to convert from")
    p.add_argument("-g", "--input-digest", default="", help="digest to convert from (instead of -i)")
    p.add_argument("-o", "--output-tag", default="", help="tag to push the overlaybd image as")
    p.add_argument("-d", "--dir", default="tmp_conv", help="directory for temporary data (default tmp_conv)")
    p.add_argument("--oci", action="store_true", help="OCI manifest and media types (default Docker v2)")
    p.add_argument("--fstype", default="ext4", help="file system of the image (ext4)")
    p.add_argument(
        "--mkfs", type=_flag_bool, nargs="?", const=True, default=True, help="mkfs the bottom layer (default true)"
    )
    p.add_argument("--vsize", type=int, default=64, help="virtual block device size, GB (default 64)")
    p.add_argument("--overlaybd", default="", help="tag of the overlaybd image (same as -o)")
    p.add_argument("--fastoci", default="", help="TurboOCI tag, old name (not supported)")
    p.add_argument("--turboOCI", default="", help="TurboOCI tag (not supported)")
    p.add_argument("--db-str", default="", help="deduplication database (not supported)")
    p.add_argument("--db-type", default="", help="deduplication database type (not supported)")
    p.add_argument("--concurrency-limit", type=int, default=4, help="manifests built at once (one here)")
    p.add_argument("--disable-sparse", action="store_true", help="append-only writable layers (no effect here)")
    p.add_argument("--referrer", action="store_true", help="push with subject (not supported)")
    p.add_argument("--cert-dir", action="append", default=[], help="directory of *.crt/*.cert/*.key")
    p.add_argument("--root-ca", action="append", default=[], help="root CA (not supported: use --cert-dir)")
    p.add_argument("--client-cert", action="append", default=[], help="CERT:KEY (not supported: use --cert-dir)")
    p.add_argument("--insecure", action="store_true", help="do not verify the registry's certificate")
    p.add_argument("--reserve", action="store_true", help="keep the temporary data")
    p.add_argument("--no-upload", action="store_true", help="convert, do not push")
    p.add_argument("--dump-manifest", action="store_true", help="print the converted manifest")
    p.add_argument("--algorithm", choices=("lz4", "zstd"), default="lz4", help="ZFile compression (ours)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run(TOOL, lambda: convert(args))


def check(args: argparse.Namespace) -> tuple[str, str]:
    """Upstream's argument rules, and the refusals of what is not supported; returns (source, target) refs."""
    if not args.input_tag and not args.input_digest:
        raise ToolError("one of input-tag [-i] or input-digest [-g] is required")
    if args.fastoci or args.turboOCI:
        raise ToolError("--fastoci/--turboOCI: TurboOCI images are not supported by this convertor; use -o/--overlaybd")
    if args.db_str or args.db_type:
        raise ToolError("--db-str/--db-type: conversion deduplication through a database is not supported")
    if args.referrer:
        raise ToolError("--referrer: pushing converted images as referrers is not supported")
    if args.root_ca or args.client_cert:
        raise ToolError("--root-ca/--client-cert: not supported; put the certificates into a --cert-dir")
    if len(args.cert_dir) > 1:
        raise ToolError("--cert-dir: one directory is supported")
    if args.fstype != "ext4":
        raise ToolError(f"--fstype {args.fstype!r}: only ext4 is supported")
    out_tag = args.overlaybd or args.output_tag
    if not out_tag:
        raise ToolError("output-tag is required, you can specify it by [-o|--overlaybd]")
    if args.vsize < 1:
        raise ToolError(f"--vsize {args.vsize}: must be at least 1 (GB)")
    src = f"{args.repository}:{args.input_tag}" if args.input_tag else f"{args.repository}@{args.input_digest}"
    return src, f"{args.repository}:{out_tag}"


def base_layer() -> str:
    """The empty ext4 base layer for `--mkfs=false`: upstream's path, then this bundle's."""
    here = os.path.join(os.path.dirname(os.path.realpath(sys.executable)), "baselayers", "ext4_64")
    for p in (*BASE_LAYER_PATHS, here):
        if os.path.isfile(p):
            return p
    raise ToolError(f"--mkfs=false: base layer not found ({', '.join(BASE_LAYER_PATHS)}); use --mkfs")


def convert(args: argparse.Namespace) -> int:
    from ..convert.convertor import ConvertError, Options, convert_layout
    from ..convert.extract import LayerError
    from ..host.progress import Progress
    from ..oci.layout import Layout, LayoutError
    from ..oci.skopeo import SkopeoError, pull_to_layout, push_from_layout
    from .rpull import parse_user

    src, dst = check(args)
    user = None
    if args.username:
        try:
            user = ":".join(parse_user(args.username))
        except ValueError as e:
            raise ToolError(f"-u: {e}") from e
    base = None if args.mkfs else base_layer()
    opts = Options(
        vsize_gb=64 if base else args.vsize,  # the base layer is a 64 GB disk (upstream: vsize 64 then)
        fstype=args.fstype,
        algorithm=args.algorithm,
        oci=args.oci,
        base_layer=base,
    )
    created = not os.path.exists(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="convertor-", dir=args.dir)
    cert_dir = args.cert_dir[0] if args.cert_dir else None

    transport = {"insecure": args.plain or args.insecure, "creds": user, "cert_dir": cert_dir}
    try:
        logging.info("converting %s to %s", src, dst)
        pull_to_layout(f"docker://{src}", f"{work}/src", "src", work, **transport)
        out = Layout(f"{work}/dst")
        digest = convert_layout(
            Layout(f"{work}/src"), out, "dst", src_name="src", opts=opts, work_dir=work, progress=Progress(TOOL)
        )
        if args.dump_manifest:
            print(json.dumps(out.read_json(digest, "manifest"), indent=2))
        if not args.no_upload:
            push_from_layout(f"{work}/dst", "dst", f"docker://{dst}", work, **transport)
    except (ConvertError, LayoutError, LayerError, SkopeoError) as e:
        raise ToolError(str(e)) from e
    finally:
        if not args.reserve:
            shutil.rmtree(work, ignore_errors=True)
            if created:
                try:
                    os.rmdir(args.dir)
                except OSError:
                    pass
    print(f"{dst}: {digest}" if not args.no_upload else digest)
    return 0
