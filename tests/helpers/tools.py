"""Helpers of the CLI tests: run the installed console tools (from .venv/bin) as real subprocesses."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run_tool(tool: str, *args: object, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    exe = BIN / tool
    if not exe.exists():
        pytest.fail(f"{exe} missing: run `.venv/bin/pip install -q --no-deps -e python`")
    r = subprocess.run([str(exe), *map(str, args)], input=input, capture_output=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"{tool} {args} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
    return r


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
