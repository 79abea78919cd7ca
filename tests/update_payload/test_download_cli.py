"""overlaybd-download-sysext: file and http sources, atomic output, one-line errors, nothing left behind."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.payload import Keys, flip, no_stray_files
from overlaybd.cli import TOOLS
from overlaybd.cli.download_sysext import main
from overlaybd.update_payload import write_payload

TOOL = "overlaybd-download-sysext"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # base class signature
        pass


@pytest.fixture()
def served(tmp_path: Path, image: Path, keys: Keys) -> Iterator[tuple[str, Path]]:
    """A local http server over a dir holding flatcar-overlaybd.gz (like a release server's version dir)."""
    root = tmp_path / "srv" / "4593.2.5"
    root.mkdir(parents=True)
    write_payload(image, root / "flatcar-overlaybd.gz", keys.private)
    handler = functools.partial(_Quiet, directory=str(tmp_path / "srv"))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/4593.2.5", root
    finally:
        srv.shutdown()
        srv.server_close()


def test_registered_tool() -> None:
    assert TOOLS[TOOL] == "overlaybd.cli.download_sysext:main"


def test_download_url(tmp_path: Path, served: tuple[str, Path], image: Path, keys: Keys, capsys) -> None:
    base, _ = served
    out = tmp_path / "ue-rs"
    assert main(["-p", str(keys.public), "-o", str(out), "-u", f"{base}/flatcar-overlaybd.gz"]) == 0
    assert (out / "flatcar-overlaybd.raw").read_bytes() == image.read_bytes()
    assert (out / "flatcar-overlaybd.raw").stat().st_mode & 0o777 == 0o644
    no_stray_files(out, {"flatcar-overlaybd.raw"})
    assert "verified" in capsys.readouterr().out


def test_file_and_name(tmp_path: Path, served: tuple[str, Path], image: Path, keys: Keys) -> None:
    _, root = served
    rc = main(["-p", str(keys.public), "-o", str(tmp_path), "-f", str(root / "flatcar-overlaybd.gz"), "--name", "x"])
    assert rc == 0 and (tmp_path / "x.raw").read_bytes() == image.read_bytes()


def _fails(argv: list[str], capsys, text: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{TOOL}: error: ") and err.count("\n") == 1 and text in err, err


def test_errors_are_one_line_and_leave_nothing(
    tmp_path: Path, served: tuple[str, Path], image: Path, keys: Keys, capsys
) -> None:
    base, root = served
    out = tmp_path / "out"
    out.mkdir()
    old = out / "flatcar-overlaybd.raw"
    old.write_bytes(b"previous image")
    pub = str(keys.public)
    _fails(["-p", pub, "-o", str(out), "-u", f"{base}/flatcar-missing.gz"], capsys, "HTTP 404")
    _fails(["-p", str(keys.other_public), "-o", str(out), "-u", f"{base}/flatcar-overlaybd.gz"], capsys, "another key")
    _fails(["-p", pub, "-o", str(out), "-f", str(image)], capsys, "bad magic")
    _fails(["-p", pub, "-o", str(out), "-u", "file:///etc/passwd"], capsys, "not an http:// or https:// URL")
    _fails(["-p", str(image), "-o", str(out), "-f", str(image)], capsys, "not a PEM file")
    _fails(["-p", pub, "-o", str(out), "-u", "http://127.0.0.1:1/x.gz", "--retries", "0"], capsys, "curl error 7")
    flip(root / "flatcar-overlaybd.gz", (root / "flatcar-overlaybd.gz").stat().st_size - 1000)  # a data blob
    _fails(
        ["-p", pub, "-o", str(out), "-u", f"{base}/flatcar-overlaybd.gz"],
        capsys,
        f"{base}/flatcar-overlaybd.gz: bad signature",
    )
    cut = tmp_path / "cut.gz"
    shutil.copyfile(root / "flatcar-overlaybd.gz", cut)
    with open(cut, "r+b") as f:
        f.truncate(1000)
    _fails(["-p", pub, "-o", str(out), "-f", str(cut)], capsys, "truncated")
    # The previous image is untouched and no temp file is left over.
    assert old.read_bytes() == b"previous image"
    no_stray_files(out, {"flatcar-overlaybd.raw"})


def test_usage_errors(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "overlaybd.cli.download_sysext", "-p", "k", "-o", str(tmp_path), "-u", "u", "-f", "f"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "not allowed with argument" in res.stderr
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "overlaybd.cli.download_sysext",
            "-p",
            "k",
            "-o",
            str(tmp_path),
            "-f",
            "f",
            "--name",
            "../x",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "not a plain file name" in res.stderr
