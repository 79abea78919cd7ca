"""overlaybd-create: make an empty writable layer (data + index file).

Upstream flags. The size argument is GiB when it is a bare number (upstream's only
form) and bytes when it carries a unit: `64MiB`, `512KiB`, `1073741824B`, `2GiB`.
`--uuid` (ours) fixes the layer UUID instead of a random one, for reproducible tests.

`--mkfs` makes an ext4 file system on the new image, as upstream does: a raw image is
formatted directly; an LSMT (append, sparse or TurboOCI warp) layer is served through the FUSE
single-file frontend, loop-attached and formatted with the snapshotter's mkfs options, so
the file system lands in the layer exactly as it would on an attached device. A failed
mkfs removes the half-made data and index files.
"""

from __future__ import annotations

import os
import tempfile
import uuid as uuidlib
from typing import Any

from .toolrun import ToolError, parse_uuid, parse_vsize, parser, run

TOOL = "overlaybd-create"


def main(argv: list[str] | None = None) -> int:
    p = parser(TOOL, "Create an empty overlaybd writable layer (append-only, sparse or raw).")
    p.add_argument("-u", dest="parent_uuid", type=parse_uuid, help="parent UUID")
    p.add_argument("--uuid", type=parse_uuid, help="layer UUID (default: random)")
    p.add_argument("-s", dest="sparse", action="store_true", help="sparse-file layer instead of append-only")
    p.add_argument("--turboOCI", "--fastoci", dest="turbo_oci", action="store_true", help="TurboOCI warp layer")
    p.add_argument("--raw", action="store_true", help="plain raw image: data truncated to vsize, index empty")
    p.add_argument("--mkfs", action="store_true", help="make an ext4 file system on the new image")
    p.add_argument("--verbose", action="store_true", help="ignored (upstream debug logging)")
    p.add_argument("data", help="data file to create")
    p.add_argument("index", help="index file to create")
    p.add_argument("vsize", type=parse_vsize, help="virtual size: GiB as a bare number, or with unit B/KiB/MiB/GiB/TiB")
    args = p.parse_args(argv)
    return run(TOOL, lambda: create(args))


def create(args) -> int:
    for path in (args.data, args.index):
        if os.path.lexists(path):
            raise ToolError(f"{path}: file exists")
    if args.raw:
        _create_raw(args)
        return 0
    from ..format import lsmt

    layer_uuid = args.uuid or str(uuidlib.uuid4()).upper()
    layer: lsmt.WritableLayer
    if args.turbo_oci:
        # Upstream's warp layer: index file with an LSMT header, data file a plain sparse
        # fs-meta file of vsize bytes (upstream passes -s too; it is implied here).
        layer = lsmt.create_warp_rw(args.data, args.index, args.vsize, uuid=layer_uuid, parent_uuid=args.parent_uuid)
    else:
        layer = lsmt.create_rw(
            args.data, args.index, args.vsize, uuid=layer_uuid, parent_uuid=args.parent_uuid, sparse=args.sparse
        )
    if not args.mkfs:
        layer.close()
        return 0
    try:
        mkfs_layer(layer, args.data)
    except BaseException:
        _remove(args.data, args.index)
        raise
    return 0


def _create_raw(args) -> None:
    from ..format.lsmt.writable import create_layer_files

    try:
        # raw image: data truncated to vsize (sparse), index empty
        create_layer_files([(args.data, None, args.vsize), (args.index, None, None)])
        if args.mkfs:
            run_mkfs(args.data, args.data)
    except BaseException:
        _remove(args.data, args.index)
        raise


def _remove(*paths: str) -> None:
    """Remove the files this run created (both were checked not to exist before)."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def run_mkfs(target: str, name: str) -> None:
    """mkfs.ext4 with the snapshotter's options on `target`; a failure is one line naming `name`."""
    from ..host.mkfs import MkfsError, mkfs

    try:
        mkfs(target)
    except MkfsError as e:
        raise ToolError(f"{name}: mkfs.ext4 failed: {e}") from e


def mkfs_layer(layer: Any, name: str) -> None:
    """Format an open writable LSMT layer through FUSE + a loop device (`fuse.FileDevice`); always closes it.

    The layer is fsynced only after a successful mkfs, and an fsync failure is an error (unlike a
    device's close, nobody would see a log line).
    """
    from ..format import lsmt
    from ..fuse.file_device import FileDevice

    try:
        stack = lsmt.Stack([], upper=layer)
    except BaseException:
        layer.close()
        raise
    try:
        run_dir = tempfile.mkdtemp(prefix="obd-create-")
        try:
            dev = FileDevice(stack, os.path.join(run_dir, "layer.img"), read_only=False, threads=2)
            try:
                device = dev.start()
            except (OSError, RuntimeError) as e:
                raise ToolError(f"{name}: mkfs through a loop device: {e}") from e
            try:
                run_mkfs(device, name)
            finally:
                dev.stop()
        finally:
            os.rmdir(run_dir)
        stack.fsync()
    finally:
        stack.close()
