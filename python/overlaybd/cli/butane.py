"""overlaybd-butane: render the Butane config that enables the flatcar-overlaybd sysext."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from overlaybd import __version__
    from overlaybd.butane import VARIABLES, ButaneError, ButaneVarError, holds_secrets, parse_vars, render, translate
    from overlaybd.butane.ignition import load_yaml

    var_help = "\n".join(f"  {name}: {v.help} (default: {v.default!r})" for name, v in VARIABLES.items())
    ap = argparse.ArgumentParser(
        prog="overlaybd-butane",
        description=__doc__,
        epilog="variables (--var KEY=VALUE):\n" + var_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"overlaybd-butane {__version__}")
    ap.add_argument("--var", action="append", default=[], metavar="KEY=VALUE", help="set a template variable")
    ap.add_argument("--ignition", action="store_true", help="print the translated Ignition JSON instead of Butane")
    ap.add_argument("-o", "--output", help="write here (atomically) instead of stdout")
    args = ap.parse_args(argv)
    try:
        values = parse_vars(args.var)
        text = render(values)
        # Never hand out something that does not parse or breaks the schema.
        ign = translate(load_yaml(text, "rendered butane"), "rendered butane")
    except (ButaneVarError, ButaneError) as e:
        print(f"overlaybd-butane: error: {e}", file=sys.stderr)
        return 2
    out = json.dumps(ign, indent=2) + "\n" if args.ignition else text
    if args.output:
        from overlaybd.format.atomic import atomic_write_bytes

        # The config carries registry passwords when registry_auth is set: keep it private then.
        atomic_write_bytes(args.output, out.encode(), mode=0o600 if holds_secrets(values) else 0o644)
    else:
        sys.stdout.write(out)
    return 0
