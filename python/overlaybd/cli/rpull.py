"""`rpull [--address SOCK] [-n NS] [--snapshotter overlaybd] [--plain-http] REF`: lazy pull of an overlaybd image."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from overlaybd import __version__


def main(argv: list[str] | None = None) -> int:
    from overlaybd.containerd_client.lazy_pull import RpullError, rpull

    ap = argparse.ArgumentParser(prog="rpull", description=__doc__)
    ap.add_argument("ref", help="image reference, e.g. registry.example/ns/app:tag")
    ap.add_argument(
        "-a",
        "--address",
        default=os.environ.get("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"),
        help="containerd gRPC socket",
    )
    ap.add_argument("-n", "--namespace", default=os.environ.get("CONTAINERD_NAMESPACE", "default"))
    ap.add_argument("--snapshotter", default="overlaybd")
    ap.add_argument("--plain-http", action="store_true", help="talk HTTP (not HTTPS) to the registry")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--version", action="version", version=f"rpull {__version__}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        top = rpull(
            args.ref, args.address, namespace=args.namespace, snapshotter=args.snapshotter, plain_http=args.plain_http
        )
    except RpullError as e:
        print(f"rpull: {e}", file=sys.stderr)
        return 1
    print(f"{args.ref}: ready ({top})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
