"""One executable, many tools (busybox style), so the frozen bundle carries one runtime.

Called as `overlaybd-create ...` through a symlink, or as `overlaybd <tool> ...`.
"""

from __future__ import annotations

import importlib
import os
import sys

from . import ALL_TOOLS


def resolve(name: str):
    """Return the main() of tool `name`."""
    mod, func = ALL_TOOLS[name].split(":")
    return getattr(importlib.import_module(mod), func)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    name = os.path.basename(argv[0])
    if name not in ALL_TOOLS:
        if len(argv) < 2 or argv[1] in ("-h", "--help"):
            print("usage: overlaybd TOOL [ARGS...]\ntools:\n  " + "\n  ".join(sorted(ALL_TOOLS)))
            return 0 if len(argv) >= 2 else 2
        if argv[1] == "--version":
            from overlaybd import __version__

            print(f"overlaybd {__version__}")
            return 0
        name = argv[1]
        argv = argv[1:]
        if name not in ALL_TOOLS:
            print(f"overlaybd: unknown tool {name!r}", file=sys.stderr)
            return 2
    sys.argv = [name] + argv[1:]
    rc = resolve(name)(argv[1:])
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
