"""A one-line progress report for long work (conversion, apply, commit), shown only on a terminal.

Why here: convert/, format/ and cli/ all report progress, and host/ is the bottom package every
one of them may import. Why only on a terminal: a log file or a pipe (CI, systemd, tests) must not
fill up with carriage-return redraws, so a `Progress` whose stream is not a tty does nothing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO

#: redraw at most this often (seconds)
INTERVAL = 0.25


def human_bytes(n: float) -> str:
    """`1.5 MiB` style, for the progress line."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable; keeps type checkers content


def on_terminal(stream: IO[str]) -> bool:
    """Whether progress should be drawn on `stream`: a tty, and TERM is not `dumb`."""
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


class Progress:
    """`label: stage  done / total  rate` redrawn in place on stderr; silent when not on a terminal.

    `stage()` names the current stage (e.g. `layer 2 of 5`), `step()` a step of it (`commit`), and both
    restart the byte count;
    `advance(n)` adds bytes; `close()` ends the line. Usable as a context manager.
    """

    def __init__(
        self, label: str, *, stream: IO[str] | None = None, enabled: bool | None = None, interval: float = INTERVAL
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = on_terminal(self.stream) if enabled is None else enabled
        self.interval = interval
        self.text = self.prefix = ""
        self.total: int | None = None
        self.done = 0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._width = 0

    def stage(self, text: str, total: int | None = None) -> None:
        """Start a new stage (e.g. `layer 2 of 5`): its name, and its size in bytes when known."""
        self.prefix = text
        self._restart(text, total)

    def step(self, name: str, total: int | None = None) -> None:
        """Start a step of the current stage (`layer 2 of 5: commit`); restarts the byte count."""
        self._restart(f"{self.prefix}: {name}" if self.prefix else name, total)

    def _restart(self, text: str, total: int | None) -> None:
        self.text, self.total, self.done = text, total, 0
        self.started = time.monotonic()
        self._draw(force=True)

    def advance(self, n: int) -> None:
        """`n` more bytes of the current step are done."""
        self.done += n
        self._draw()

    def line(self) -> str:
        """The progress line as it is drawn now."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        parts = [f"{self.label}:"]
        if self.text:
            parts.append(self.text)
        amount = human_bytes(self.done)
        if self.total:
            amount += f" / {human_bytes(self.total)} ({100 * min(self.done, self.total) // self.total}%)"
        parts.append(amount)
        parts.append(f"{human_bytes(self.done / elapsed)}/s")
        return "  ".join(parts)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        text = self.line()
        pad = max(0, self._width - len(text))
        self._width = len(text)
        try:
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False  # the terminal went away: keep working silently

    def close(self) -> None:
        """Draw the final state and end the line (nothing when silent)."""
        if self.enabled and self._width:
            self._draw(force=True)
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CountingReader:
    """A binary stream that reports every byte read to a `Progress` (wraps a layer tar stream)."""

    def __init__(self, raw: IO[bytes], progress: Progress) -> None:
        self.raw = raw
        self.progress = progress

    def read(self, n: int | None = -1, /) -> bytes:
        data = self.raw.read(-1 if n is None else n)
        self.progress.advance(len(data))
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.raw.close()
