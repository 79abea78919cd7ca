"""`rpull [-a SOCK] [-n NS] [-u USER[:PASS]] [--snapshotter SN] [--plain-http] REF`: lazy pull of an overlaybd image.

Registry credentials are read as the daemons read them: overlaybd.json's `credentialConfig`
(by default the docker-config-style `/etc/overlaybd/cred.json`); `-u USER:PASS` wins for the
image's registry (`-u USER` asks for the password on a terminal). A plain-http registry needs
`--plain-http` here, and a `mirrorRegistry` entry with `insecure: true` in the snapshotter's config.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys

from overlaybd import __version__


def parse_user(text: str) -> tuple[str, str]:
    """`USER:PASS` (split at the first colon), or `USER` with the password asked for on a terminal."""
    user, sep, password = text.partition(":")
    if not user:
        raise ValueError(f"--user {text!r}: expected USER[:PASSWORD]")
    if not sep:
        if not sys.stdin.isatty():
            raise ValueError(f"--user {user!r}: no password given and stdin is not a terminal (use USER:PASSWORD)")
        password = getpass.getpass(f"Password for {user}: ")
    return user, password


def add_rpull_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags `rpull` and `ctr rpull` share (upstream ctr's rpull plus its registry flags)."""
    ap.add_argument("ref", help="image reference, e.g. registry.example/ns/app:tag")
    ap.add_argument("-u", "--user", help="registry USER[:PASSWORD] (default: credentialConfig of overlaybd.json)")
    ap.add_argument(
        "--snapshotter",
        default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlaybd",
        help="snapshotter name (default overlaybd)",
    )
    ap.add_argument("--plain-http", action="store_true", help="talk HTTP (not HTTPS) to the registry")
    ap.add_argument(
        "--service_config_path", default=None, help="overlaybd.json (default /etc/overlaybd/overlaybd.json)"
    )
    ap.add_argument("-v", "--verbose", action="store_true")


def run_rpull(prog: str, args: argparse.Namespace, address: str, namespace: str) -> int:
    """Run the lazy pull and print one line: the result, or `prog: error`."""
    from overlaybd.config.schema import ConfigError
    from overlaybd.containerd_client.lazy_pull import RpullError, rpull

    from .toolrun import load_service

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        credential = parse_user(args.user) if args.user else None
        service = load_service(args.service_config_path)
        top = rpull(
            args.ref,
            address,
            namespace=namespace,
            snapshotter=args.snapshotter,
            plain_http=args.plain_http,
            service=service,
            credential=credential,
        )
    except (RpullError, ConfigError, ValueError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    print(f"{args.ref}: ready ({top})")
    return 0


def default_address() -> str:
    return os.environ.get("CONTAINERD_ADDRESS") or "/run/containerd/containerd.sock"


def default_namespace() -> str:
    return os.environ.get("CONTAINERD_NAMESPACE") or "default"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="rpull", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-a", "--address", default=default_address(), help="containerd gRPC socket")
    ap.add_argument("-n", "--namespace", default=default_namespace())
    add_rpull_arguments(ap)
    ap.add_argument("--version", action="version", version=f"rpull {__version__}")
    args = ap.parse_args(argv)
    return run_rpull("rpull", args, args.address, args.namespace)


if __name__ == "__main__":
    sys.exit(main())
