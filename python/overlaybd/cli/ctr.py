"""`ctr` of the overlaybd snapshotter directory: `ctr rpull` built in, every other command run by the system's ctr.

Upstream ships a ctr with its plugins (`rpull`, `obdconv`, `record-trace`) in
/opt/overlaybd/snapshotter/, and Flatcar's documentation runs
`/opt/overlaybd/snapshotter/ctr rpull -u USER:PASS REPO:TAG`. Here `rpull` is ours (same flags as the
`rpull` tool) and any other command line is handed unchanged to the first `ctr` on PATH that is not
this program, so `ctr images ls` or `ctr run` behave exactly as the host's containerd client.
"""

from __future__ import annotations

import argparse
import os
import sys

from overlaybd import __version__

from .rpull import add_rpull_arguments, default_address, default_namespace, run_rpull

TOOL = "ctr"
#: ctr's global options that take a value (so the command is found after them)
VALUE_OPTIONS = {"-a", "--address", "-n", "--namespace", "--timeout", "--connect-timeout"}
HELP = f"""usage: ctr [global options] rpull [-u USER[:PASS]] [--plain-http] [--snapshotter SN] REF
       ctr [global options] COMMAND ...   (run by the system's ctr)

overlaybd's ctr {__version__}: `rpull` pulls an overlaybd image lazily (layers stay in the registry);
every other command is handed to the first `ctr` on PATH that is not this program.
global options understood by rpull: -a/--address SOCK, -n/--namespace NS (also CONTAINERD_ADDRESS,
CONTAINERD_NAMESPACE); registry credentials: -u, else overlaybd.json's credentialConfig."""


def split_globals(argv: list[str]) -> tuple[dict[str, str], int]:
    """ctr's global options before the command, and the index of the command (len(argv) if none)."""
    found: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            return found, i
        name, eq, value = arg.partition("=")
        if name in VALUE_OPTIONS:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            found[name.lstrip("-")[0]] = value  # keyed by the short name: a, n, t, c
        i += 1
    return found, i


def _is_self(path: str) -> bool:
    """Whether `path` is this program (the bundle's multi-call executable or our console script)."""
    real = os.path.realpath(path)
    mine = {os.path.realpath(sys.executable)}
    if os.sep in sys.argv[0]:
        mine.add(os.path.realpath(sys.argv[0]))
    return real in mine or os.path.basename(real) == "overlaybd"


def system_ctr() -> str | None:
    """The first executable `ctr` on PATH (the default path when PATH is unset) that is not this program."""
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        cand = os.path.join(d or ".", "ctr")
        if os.path.isfile(cand) and os.access(cand, os.X_OK) and not _is_self(cand):
            return cand
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["--version"], ["-v"]):
        print(f"ctr (overlaybd rpull) {__version__}")
        return 0
    if argv in ([], ["-h"], ["--help"], ["help"]):
        print(HELP)
        return 0
    options, at = split_globals(argv)
    if at < len(argv) and argv[at] == "rpull":
        ap = argparse.ArgumentParser(prog="ctr rpull", description="Pull an overlaybd image lazily.")
        add_rpull_arguments(ap)
        args = ap.parse_args(argv[at + 1 :])
        address = options.get("a") or default_address()
        namespace = options.get("n") or default_namespace()
        return run_rpull("ctr rpull", args, address, namespace)
    ctr = system_ctr()
    if ctr is None:
        command = argv[at] if at < len(argv) else " ".join(argv)
        print(
            f"ctr: {command!r}: no system ctr found on PATH to run it (only `rpull` is built into this ctr)",
            file=sys.stderr,
        )
        return 1
    sys.stdout.flush()
    try:
        os.execv(ctr, [ctr, *argv])
    except OSError as e:
        print(f"ctr: {ctr}: {e.strerror}", file=sys.stderr)
        return 1
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
