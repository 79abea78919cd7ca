"""overlaybd-dump: stream the whole virtual disk of an image (config.v1.json or one layer file).

  overlaybd-dump CONFIG OUT        write the disk to OUT, sparse (all-zero 64 KiB runs become holes)
  overlaybd-dump CONFIG            write the disk to stdout (refused on a terminal)
  overlaybd-dump --sha256 CONFIG   print only the sha256 hex digest of the disk

CONFIG may also be a single layer file (LSMT, ZFile or tar-wrapped): anything whose
first non-blank byte is not `{` is opened as a layer. OUT appears only when complete.
"""

from __future__ import annotations

import hashlib
import os
import sys

from .toolrun import ToolError, load_service, parser, read_chunks, run

TOOL = "overlaybd-dump"
HOLE_GRAIN = 64 << 10  # zero runs at this granularity are skipped in OUT
_ZERO = bytes(HOLE_GRAIN)


def main(argv: list[str] | None = None) -> int:
    p = parser(TOOL, "Dump the virtual disk of an overlaybd image.")
    p.add_argument("--sha256", action="store_true", help="print only the sha256 of the disk")
    p.add_argument("--service_config_path", help="overlaybd.json (for remote layers)")
    p.add_argument("-f", dest="force", action="store_true", help="replace an existing OUT")
    p.add_argument("config", help="config.v1.json, or a single layer file")
    p.add_argument("out", nargs="?", help="output file (sparse); stdout if omitted")
    args = p.parse_args(argv)
    return run(TOOL, lambda: dump(args))


def _is_json(path: str) -> bool:
    """Whether `path` looks like a config; a FIFO or device is refused here (it would block)."""
    from ..format.fileio import LocalFile

    with LocalFile(path) as f:
        head = f.pread(64, 0).lstrip()
    return head.startswith(b"{")


def open_source(path: str, service_config_path: str | None):
    """An object with name, size(), pread_into(), close(): the image of a config, or one layer."""
    if _is_json(path):
        from ..image import open_image

        service = load_service(service_config_path)
        return open_image(path, service)
    from ..format import opener
    from ..format.fileio import LocalFile

    f = LocalFile(path)
    try:
        layer = opener.open_layer(f)
    except BaseException:
        f.close()
        raise
    return _OwnedLayer(layer, f)


class _OwnedLayer:
    """A layer plus the file beneath it, closed together."""

    def __init__(self, layer, f) -> None:
        self.layer = layer
        self.file = f
        self.name = f.name
        self.pread_into = layer.pread_into
        self.size = layer.size

    def close(self) -> None:
        try:
            self.layer.close()
        finally:
            self.file.close()


def dump(args) -> int:
    if args.sha256 and args.out:
        raise ToolError("--sha256 takes no OUT")
    if not args.sha256 and not args.out and sys.stdout.isatty():
        raise ToolError("refusing to write a disk image to a terminal: give OUT or redirect stdout")
    img = open_source(args.config, args.service_config_path)
    try:
        if args.sha256:
            h = hashlib.sha256()
            for piece in read_chunks(img):
                h.update(piece)
            print(h.hexdigest())
        elif args.out:
            _write_sparse(img, args.out, args.force)
        else:
            out = sys.stdout.buffer
            for piece in read_chunks(img):
                out.write(piece)
            out.flush()
    finally:
        img.close()
    return 0


def _write_sparse(img, path: str, force: bool) -> None:
    from ..format.atomic import AtomicOutput

    if os.path.lexists(path) and not force:
        raise ToolError(f"{path}: output file exists (use -f to replace it)")
    with AtomicOutput(path) as out:
        pos = 0
        for piece in read_chunks(img):
            for lo in range(0, len(piece), HOLE_GRAIN):
                part = piece[lo : lo + HOLE_GRAIN]
                if part.tobytes() != _ZERO[: len(part)]:  # copy + memcmp: ~30x faster than memoryview ==
                    if out.tell() != pos:
                        out.seek(pos)
                    out.write(part)
                pos += len(part)
        out.file.truncate(pos)
