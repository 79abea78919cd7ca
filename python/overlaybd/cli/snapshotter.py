"""`overlaybd-snapshotter [config.json]`: the containerd proxy snapshotter daemon."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from overlaybd import __version__

LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}


class EscapeControl(logging.Filter):
    """Every log line is one line: control characters in the formatted message (keys, labels and paths come
    from clients) are escaped, so a key with a newline cannot forge a log entry."""

    def filter(self, record: logging.LogRecord) -> bool:
        from overlaybd.snapshotter.labels import esc

        msg = record.getMessage()
        safe = esc(msg, limit=max(len(msg), 1))
        if safe != msg:
            record.msg, record.args = safe, None
        return True


def main(argv: list[str] | None = None) -> int:
    from overlaybd.config.schema import ConfigError
    from overlaybd.config.snapshotter import DEFAULT_PATH, load_config
    from overlaybd.host import sd_notify

    ap = argparse.ArgumentParser(prog="overlaybd-snapshotter", description=__doc__)
    ap.add_argument("config", nargs="?", default=DEFAULT_PATH, help=f"config.json (default {DEFAULT_PATH})")
    ap.add_argument(
        "--fuse-socket",
        default=os.environ.get("OVERLAYBD_FUSE_SOCKET", "/run/overlaybd/fuse.sock"),
        help="control socket of the overlaybd daemon's FUSE frontend (hosts without TCMU)",
    )
    ap.add_argument("--version", action="version", version=f"overlaybd-snapshotter {__version__}")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"overlaybd-snapshotter: {e}", file=sys.stderr)
        return 2
    fmt = "%(asctime)s %(levelname)s %(name)s" + (" %(funcName)s" if cfg.log_report_caller else "") + ": %(message)s"
    logging.basicConfig(level=LEVELS.get(cfg.verbose, logging.INFO), format=fmt)
    for handler in logging.getLogger().handlers:
        handler.addFilter(EscapeControl())

    from overlaybd.snapshotter.device_backend import default_backend
    from overlaybd.snapshotter.server import serve
    from overlaybd.snapshotter.service import Snapshotter

    try:
        sn = Snapshotter(cfg, default_backend(cfg.tenant, args.fuse_socket))
        fixed = sn.reconcile()
        logging.getLogger("overlaybd.snapshotter").info("reconciled on start: %s", fixed)
        server = serve(sn, cfg.address)
    except OSError as e:
        print(f"overlaybd-snapshotter: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if fixed.get("devices_deferred"):  # overlaybd-tcmu not up yet: finish reconcile when it appears
        threading.Thread(target=sn.watch_frontend, args=(stop.is_set,), name="frontend-watch", daemon=True).start()
    sd_notify.ready(f"serving {cfg.address}")  # the socket accepts connections now (Type=notify)
    stop.wait()
    sd_notify.stopping()
    server.stop(grace=5).wait()
    sn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
