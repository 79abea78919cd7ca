"""`overlaybd-record-trace [--address SOCK] [--plain-http] [--timeout S] IMAGE NEW_REF -- CMD...`

Runs CMD in IMAGE (already pulled with rpull) while the image service records the layer reads,
then pushes IMAGE plus an acceleration layer holding that trace as NEW_REF (upstream `ctr record-trace`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

from overlaybd import __version__


def _snapshotter_trace_dir() -> str:
    """traceDir of the local snapshotter's config.json (its default when the file is missing)."""
    from overlaybd.config.snapshotter import DEFAULT_PATH, config_from_dict, load_config

    return (load_config(DEFAULT_PATH) if os.path.exists(DEFAULT_PATH) else config_from_dict({})).trace_dir


def main(argv: list[str] | None = None) -> int:
    from overlaybd.containerd_client.trace_recorder import RecordTraceError, describe, record_trace

    ap = argparse.ArgumentParser(
        prog="overlaybd-record-trace", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("image", help="the overlaybd image, already pulled with rpull")
    ap.add_argument("new_ref", help="where to push the image with its acceleration layer")
    ap.add_argument("command", nargs="+", help="the command to record (after --)")
    ap.add_argument(
        "-a",
        "--address",
        default=os.environ.get("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"),
        help="containerd gRPC socket",
    )
    ap.add_argument("-n", "--namespace", default=os.environ.get("CONTAINERD_NAMESPACE", "default"))
    ap.add_argument("--snapshotter", default="overlaybd")
    ap.add_argument("--plain-http", action="store_true", help="talk HTTP (not HTTPS) to the registry")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before the container is killed (default 60)")
    ap.add_argument("--work-dir", default="", help="keeps the trace and the OCI layout (default: a temp dir)")
    ap.add_argument(
        "--trace-dir",
        default="",
        help="the snapshotter's traceDir, where the image service writes the trace while recording "
        "(default: from /etc/overlaybd-snapshotter/config.json)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--version", action="version", version=f"overlaybd-record-trace {__version__}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.timeout <= 0:
        ap.error("--timeout must be positive")
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="obd-record-trace-")
    from overlaybd.config.schema import ConfigError

    try:
        trace_dir = args.trace_dir or _snapshotter_trace_dir()
    except ConfigError as e:
        print(f"overlaybd-record-trace: {e}", file=sys.stderr)
        return 1
    try:
        result = record_trace(
            args.image,
            args.new_ref,
            args.command,
            address=args.address,
            work_dir=work_dir,
            trace_dir=trace_dir,
            namespace=args.namespace,
            snapshotter=args.snapshotter,
            plain_http=args.plain_http,
            timeout=args.timeout,
        )
    except RecordTraceError as e:
        print(f"overlaybd-record-trace: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(result.output)
    print(json.dumps({"image": args.new_ref, **describe(result)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
