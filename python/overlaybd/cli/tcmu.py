"""overlaybd-tcmu [overlaybd.json]: the device daemon (TCMU, or FUSE files where TCMU is missing)."""

from __future__ import annotations

import argparse
import sys

from overlaybd import __version__

DEFAULT_CONFIG = "/etc/overlaybd/overlaybd.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="overlaybd-tcmu", description=__doc__)
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="service config (overlaybd.json)")
    p.add_argument("--version", action="version", version=f"overlaybd-tcmu {__version__}")
    p.add_argument(
        "--frontend",
        choices=["auto", "tcmu", "fuse"],
        default="auto",
        help="auto: TCMU when target_core_user is available, else FUSE",
    )
    p.add_argument("--fuse-socket", default=None, help="control socket of the FUSE frontend")
    p.add_argument("--fuse-run-dir", default=None, help="where FUSE image files are mounted")
    args = p.parse_args(argv)

    from overlaybd.daemon.main import main as daemon_main

    return daemon_main(
        args.config,
        default_path=args.config == DEFAULT_CONFIG,
        frontend=args.frontend,
        fuse_socket=args.fuse_socket,
        fuse_run_dir=args.fuse_run_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
