"""overlaybd-tcmu: serve overlaybd devices through TCMU, or through FUSE files where TCMU is missing.

Why its own package: the daemon picks a frontend and runs it; `tcmu/` and `fuse/` are siblings
that know only the image contract (`image.frontend`), not each other. TCMU mode: see
`tcmu.frontend`; FUSE mode: see `fuse.control`. SIGTERM/SIGINT stop it; both frontends then
release every device they made (FUSE: loop devices detached, FUSE files unmounted).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import resource
import select
import signal
import sys
import threading
from typing import Any

from overlaybd.fuse.control import DEFAULT_RUN_DIR, DEFAULT_SOCKET, FuseFrontend
from overlaybd.host import sd_notify
from overlaybd.image.frontend import ImageOpener, default_opener
from overlaybd.tcmu import configfs
from overlaybd.tcmu.frontend import TcmuFrontend

log = logging.getLogger("overlaybd-tcmu")


def setup_logging(service: Any, to_stderr: bool = True) -> None:
    """Log to logConfig.logPath (rotated by size) and stderr (journald); level from logConfig.logLevel."""
    level = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING}.get(service.log_config.log_level, logging.ERROR)
    handlers: list[logging.Handler] = []
    if to_stderr:
        handlers.append(logging.StreamHandler())
    path = service.log_config.log_path
    if path:
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            lc = service.log_config
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    path, maxBytes=lc.log_size_mb << 20, backupCount=max(lc.log_rotate_num, 0)
                )
            )
        except OSError as e:
            print(f"overlaybd-tcmu: cannot log to {path}: {e}")
    logging.basicConfig(
        level=level, handlers=handlers, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def main(
    config_path: str,
    *,
    default_path: bool,
    frontend: str = "auto",
    fuse_socket: str | None = None,
    fuse_run_dir: str | None = None,
) -> int:
    """Load overlaybd.json (built-in defaults when the default path is missing), set up logging, run.

    Exit code 2 for a broken or missing explicitly named config, with one line naming file and field.
    """
    from overlaybd.config.schema import ConfigError
    from overlaybd.config.service import default_service_config, load_service_config

    missing = not os.path.exists(config_path)
    try:
        service = default_service_config() if missing and default_path else load_service_config(config_path)
    except ConfigError as e:
        print(f"overlaybd-tcmu: {e}", file=sys.stderr)
        return 2
    setup_logging(service)
    if missing:
        log.warning("%s missing: using defaults", config_path)
    return run(service, frontend=frontend, fuse_socket=fuse_socket, fuse_run_dir=fuse_run_dir)


def choose_frontend(requested: str) -> tuple[str, str]:
    """("tcmu"|"fuse", why)."""
    if requested in ("tcmu", "fuse"):
        return requested, "requested"
    ok, why = configfs.tcmu_available()
    return ("tcmu" if ok else "fuse"), why


def run(
    service: Any,
    *,
    frontend: str = "auto",
    fuse_socket: str | None = None,
    fuse_run_dir: str | None = None,
    opener: ImageOpener | None = None,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or `stop`); returns the exit code."""
    opener = opener or default_opener(service)
    stop = stop or threading.Event()
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()
        os.write(stop_w, b"x")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=lambda: (stop.wait(), os.write(stop_w, b"x")), daemon=True).start()

    try:  # one fd per layer file per device, as upstream raises it
        resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
    except (ValueError, OSError):
        pass
    kind, why = choose_frontend(frontend)
    log.info("frontend: %s (%s)", kind, why)
    if kind == "fuse":
        fe = FuseFrontend(opener, socket_path=fuse_socket or DEFAULT_SOCKET, run_dir=fuse_run_dir or DEFAULT_RUN_DIR)
        try:
            fe.serve()
            log.info("fuse: ready")
            sd_notify.ready("serving images through FUSE + loop")
            if ready:
                ready.set()
            select.select([stop_r], [], [])
            sd_notify.stopping()
        finally:
            fe.shutdown()  # detaches every loop device and unmounts every FUSE file it made
        log.info("stopped")
        return 0
    # No retries of its own: the registry client already retries each read until readDeadlineSec, so a
    # container gets EIO within that one deadline (not another 30 s on top of it).
    tf = TcmuFrontend(opener, read_retry_seconds=0.0)
    try:
        tf.start()
    except OSError as e:
        log.error("tcmu: %s", e)
        return 1
    log.info("tcmu: ready, serving %d recovered device(s)", len(tf.devices))
    sd_notify.ready(f"serving images through TCMU ({len(tf.devices)} recovered device(s))")
    if ready:
        ready.set()
    while True:
        r, _, _ = select.select([tf.fileno(), stop_r], [], [])
        if stop_r in r:
            break
        tf.handle_events()
    sd_notify.stopping()
    tf.shutdown()
    log.info("stopped")
    return 0
