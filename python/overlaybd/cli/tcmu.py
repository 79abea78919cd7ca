"""overlaybd-tcmu [overlaybd.json]: the device daemon (TCMU, or FUSE files where TCMU is missing)."""

from __future__ import annotations

import argparse
import logging
import os
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

    from overlaybd.config.schema import ConfigError
    from overlaybd.config.service import default_service_config, load_service_config
    from overlaybd.fuse.control import DEFAULT_RUN_DIR, DEFAULT_SOCKET
    from overlaybd.tcmu.daemon import run, setup_logging

    try:
        if os.path.exists(args.config) or args.config != DEFAULT_CONFIG:
            service = load_service_config(args.config)
        else:
            service = default_service_config()
    except ConfigError as e:
        print(f"overlaybd-tcmu: {e}", file=sys.stderr)
        return 2
    setup_logging(service)
    if not os.path.exists(args.config):
        logging.getLogger("overlaybd-tcmu").warning("%s missing: using defaults", args.config)
    return run(
        service,
        frontend=args.frontend,
        fuse_socket=args.fuse_socket or DEFAULT_SOCKET,
        fuse_run_dir=args.fuse_run_dir or DEFAULT_RUN_DIR,
    )


if __name__ == "__main__":
    sys.exit(main())
