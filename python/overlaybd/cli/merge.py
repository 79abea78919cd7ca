"""overlaybd-merge: flatten every lower of a config.v1.json into one committed layer.

Upstream semantics: uuid null, parent uuid of the bottom layer, tags = layer index from
the top; output a ZFile (lz4, block CRCs, header not overwritten) unless
`--compress=false`; `-t` tar-wraps it. The config's `resultFile` gets `success` or
`failed:<reason>` as when a device is opened.

Trace recording: when the config's `recordTracePath` names an existing empty file, the
reads merge makes into the layer files are recorded and dumped as a trace (plus
`<trace>.ok`) at the end, as the image service does when a recording device closes. This
is how upstream's test traces are made. As in the service, the reads made while opening
the layers (headers, indexes) are not recorded.
"""

from __future__ import annotations

import argparse

from .toolrun import ToolError, load_service, parse_bool, parse_threads, parser, run

TOOL = "overlaybd-merge"


def main(argv: list[str] | None = None) -> int:
    p = parser(TOOL, "Merge (flatten) the layers of an overlaybd image into one layer.")
    p.add_argument(
        "--compress",
        type=parse_bool,
        nargs="?",
        const=True,
        default=True,
        help="ZFile-compress the output (default true; --compress=false for a plain layer)",
    )
    p.add_argument("-t", dest="tar", action="store_true", help="tar-wrap the output")
    p.add_argument("-f", dest="force", action="store_true", help="replace an existing output (ours)")
    p.add_argument("--service_config_path", help="overlaybd.json (default /etc/overlaybd/overlaybd.json if present)")
    p.add_argument(
        "--compress_threads",
        "--threads",
        dest="threads",
        type=parse_threads,
        default=None,
        help="ZFile compression threads (default: usable CPUs, affinity)",
    )
    p.add_argument("--upload", help="push the result to a registry (not supported)")
    p.add_argument("--verbose", action="store_true", help="ignored")
    p.add_argument("config", help="config.v1.json of the image")
    p.add_argument("out", help="output layer file")
    args = p.parse_args(argv)
    return run(TOOL, lambda: merge(args))


def merge(args: argparse.Namespace) -> int:
    """Open the config's lowers as the image service does, then run the library merge."""
    from ..config.image_config import load_device_config
    from ..format.commit import merge_layers
    from ..format.output import OutputOptions
    from ..image import close_all, open_lowers, write_result_file
    from ..image.prefetch import TraceRecorder, plan_prefetch

    if args.upload:
        raise ToolError("--upload: not supported; push the output file instead")
    service = load_service(args.service_config_path)
    cfg = load_device_config(args.config)
    if cfg.writable:
        raise ToolError(f"{args.config}: upper: merging a writable layer is not supported; commit it first")
    if not cfg.lowers:
        raise ToolError(f"{args.config}: lowers: nothing to merge")
    plan = plan_prefetch(cfg, args.config)
    recorder = TraceRecorder(plan.path, args.config) if plan is not None and plan.mode == "record" else None
    owned: list = []
    try:
        try:
            layers = open_lowers(cfg, service, None, owned, recorder=recorder)
        except Exception as e:
            write_result_file(cfg.result_file, f"failed:{getattr(e, 'message', e)}")
            raise
        write_result_file(cfg.result_file, "success")
        if recorder is not None and not recorder.start():
            recorder = None  # logged by start(); the merge itself goes on
        try:
            options = OutputOptions(zfile=args.compress, tar=args.tar, replace=args.force, threads=args.threads)
            merge_layers(layers, args.out, options)
        finally:
            if recorder is not None:
                recorder.stop()  # dumps the trace and `.ok`, even when the merge failed (as a device close)
    finally:
        close_all(list(reversed(owned)))
    return 0
