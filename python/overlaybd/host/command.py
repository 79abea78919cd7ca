"""Run a host command and turn a failure into one clear line naming what was being done."""

from __future__ import annotations

import subprocess


class HostError(RuntimeError):
    """A host command failed; the message names the object (file, device, mount point) and its words."""


def stderr_words(r: subprocess.CompletedProcess[str]) -> str:
    """The command's stderr folded to one line, or its exit code when it said nothing."""
    return "; ".join(ln.strip() for ln in (r.stderr or "").splitlines() if ln.strip()) or f"exit code {r.returncode}"


def run(cmd: list[str], what: str, *, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cmd`; raise HostError("what: cmd: stderr") when it fails, cannot start or times out."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise HostError(f"{what}: {cmd[0]} not found") from e
    except subprocess.TimeoutExpired as e:
        raise HostError(f"{what}: {' '.join(cmd)}: no answer in {timeout:g} s") from e
    if r.returncode != 0:
        raise HostError(f"{what}: {' '.join(cmd)}: {stderr_words(r)}")
    return r
