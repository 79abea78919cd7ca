"""overlaybd-create: make an empty writable layer (data + index file).

Upstream flags. The size argument is GiB when it is a bare number (upstream's only
form) and bytes when it carries a unit: `64MiB`, `512KiB`, `1073741824B`, `2GiB`.
`--uuid` (ours) fixes the layer UUID instead of a random one, for reproducible tests.
"""

from __future__ import annotations

import os
import subprocess
import uuid as uuidlib

from .toolrun import ToolError, parse_uuid, parse_vsize, parser, run

TOOL = "overlaybd-create"


def main(argv: list[str] | None = None) -> int:
    p = parser(TOOL, "Create an empty overlaybd writable layer (append-only, sparse or raw).")
    p.add_argument("-u", dest="parent_uuid", type=parse_uuid, help="parent UUID")
    p.add_argument("--uuid", type=parse_uuid, help="layer UUID (default: random)")
    p.add_argument("-s", dest="sparse", action="store_true", help="sparse-file layer instead of append-only")
    p.add_argument("--turboOCI", "--fastoci", dest="turbo_oci", action="store_true", help="TurboOCI warp layer")
    p.add_argument("--raw", action="store_true", help="plain raw image: data truncated to vsize, index empty")
    p.add_argument("--mkfs", action="store_true", help="make an ext4 file system (only with --raw here)")
    p.add_argument("--verbose", action="store_true", help="ignored (upstream debug logging)")
    p.add_argument("data", help="data file to create")
    p.add_argument("index", help="index file to create")
    p.add_argument("vsize", type=parse_vsize, help="virtual size: GiB as a bare number, or with unit B/KiB/MiB/GiB/TiB")
    args = p.parse_args(argv)
    return run(TOOL, lambda: create(args))


def create(args) -> int:
    if args.mkfs and not args.raw:
        raise ToolError("--mkfs: only supported with --raw (attach the layer and run mkfs on the device instead)")
    for path in (args.data, args.index):
        if os.path.lexists(path):
            raise ToolError(f"{path}: file exists")
    if args.raw:
        _create_raw(args)
        return 0
    from ..format import lsmt

    layer_uuid = args.uuid or str(uuidlib.uuid4()).upper()
    if args.turbo_oci:
        # Upstream's warp layer: index file with an LSMT header, data file a plain sparse
        # fs-meta file of vsize bytes (upstream passes -s too; it is implied here).
        lsmt.create_warp_rw(args.data, args.index, args.vsize, uuid=layer_uuid, parent_uuid=args.parent_uuid).close()
        return 0
    layer = lsmt.create_rw(
        args.data, args.index, args.vsize, uuid=layer_uuid, parent_uuid=args.parent_uuid, sparse=args.sparse
    )
    layer.close()
    return 0


def _create_raw(args) -> None:
    fd = os.open(args.data, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, args.vsize)
    finally:
        os.close(fd)
    os.close(os.open(args.index, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    if args.mkfs:
        features = "^has_journal,sparse_super,flex_bg"  # the snapshotter's mkfs options
        cmd = ["mkfs.ext4", "-q", "-F", "-O", features, "-G", "1", "-E", "discard", args.data]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise ToolError(f"{args.data}: mkfs.ext4 failed: {r.stderr.strip() or r.returncode}")
