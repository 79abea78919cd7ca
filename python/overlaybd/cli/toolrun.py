"""Shared plumbing of the format tools: argument parser with --version, expected-error handling.

Why: every tool must turn a bad input into ONE line on stderr naming the file and the
field, exit code 1, and never a traceback; doing that once here keeps each tool a thin
argument parser over the library.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import uuid as uuidlib
from collections.abc import Callable

from overlaybd import __version__

from ..config.schema import ConfigError
from ..format.errors import FormatError
from ..format.output import CHUNK, OutputExists, read_chunks

__all__ = [
    "CHUNK",
    "ToolError",
    "load_service",
    "parse_block_kib",
    "parse_bool",
    "parse_uuid",
    "parse_vsize",
    "parser",
    "read_chunks",
    "run",
]


class ToolError(Exception):
    """An expected failure of a tool; the message is printed as is."""


def parser(tool: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=tool, description=description)
    p.add_argument("--version", action="version", version=f"{tool} {__version__}")
    return p


def run(tool: str, body: Callable[[], int | None]) -> int:
    """Run `body`, mapping expected errors to `tool: message` on stderr and exit code 1."""
    try:
        return int(body() or 0)
    except OutputExists as e:
        print(f"{tool}: {e.path}: output file exists (use -f to replace it)", file=sys.stderr)
        return 1
    except (ToolError, ConfigError, FormatError) as e:
        print(f"{tool}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # reader went away (e.g. `| head`): not worth a message
        try:
            sys.stdout = open(os.devnull, "w")  # silence the flush at exit
        except OSError:
            pass
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{tool}: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{tool}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # errors of other layers (image open etc.) that carry path/field in str()
        if hasattr(e, "path") and hasattr(e, "field"):
            print(f"{tool}: {e}", file=sys.stderr)
            return 1
        raise


def parse_bool(text: str) -> bool:
    """CLI11-style boolean option values (`--compress=false`)."""
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_uuid(text: str) -> str:
    """A 36-character UUID, case-insensitive; returned upper-case as upstream renders it."""
    if len(text) != 36:
        raise argparse.ArgumentTypeError(f"invalid UUID {text!r}: must be 36 characters like 8-4-4-4-12 hex")
    try:
        return str(uuidlib.UUID(text)).upper()
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid UUID {text!r}") from None


_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_vsize(text: str) -> int:
    """Virtual size: a bare number is GiB (upstream); or a number with B/KiB/MiB/GiB/TiB (bytes).

    Examples: `64` = 64 GiB, `64MiB`, `1073741824B`. Must be a positive multiple of 512.
    """
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use GiB as a number, or e.g. 64MiB, 4096B")
    number, unit = int(m.group(1)), m.group(2).lower()
    if unit == "":
        mult = 1 << 30
    elif unit in _UNITS:
        mult = _UNITS[unit]
    else:
        raise argparse.ArgumentTypeError(f"invalid size unit {m.group(2)!r} in {text!r}: use B, KiB, MiB, GiB or TiB")
    size = number * mult
    if size <= 0 or size % 512:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 512 bytes")
    if size > (2**50 - 1) * 512:
        raise argparse.ArgumentTypeError(f"size {text!r} exceeds the LSMT maximum")
    return size


def parse_block_kib(text: str) -> int:
    """ZFile block size in KiB (`--bs`): 4, 8, 16, 32 or 64; returns bytes."""
    try:
        kb = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --bs {text!r}: a number of KiB") from None
    if kb not in (4, 8, 16, 32, 64):
        raise argparse.ArgumentTypeError(f"invalid --bs {kb}: must be a power of two between 4 and 64 (KiB)")
    return kb * 1024


def parse_threads(text: str) -> int:
    """A thread count (`--threads`, `--compress_threads`): a positive integer."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid thread count {text!r}: a positive integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid thread count {n}: must be >= 1")
    return n


def load_service(path: str | None):
    """overlaybd.json for tools: an explicit path must load; the default path is optional here.

    (Upstream's tools abort when /etc/overlaybd/overlaybd.json is missing even if unused;
    we fall back to the defaults instead.)
    """
    from ..config.service import DEFAULT_PATH, default_service_config, load_service_config

    if path:
        return load_service_config(path)
    if os.path.exists(DEFAULT_PATH):
        return load_service_config(DEFAULT_PATH)
    return default_service_config()
