"""overlaybd-tcmu's command line: --version, and a broken overlaybd.json is a clear error, not a crash."""

from __future__ import annotations

import subprocess
from pathlib import Path

from overlaybd import __version__

EXE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "overlaybd-tcmu"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=60, check=False)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"overlaybd-tcmu {__version__}"


def test_bad_service_config_names_file_and_field(tmp_path):
    cfg = tmp_path / "overlaybd.json"
    cfg.write_text('{"logConfig": {"logLevel": "loud"}}')
    r = run(str(cfg))
    assert r.returncode == 2 and str(cfg) in r.stderr and "logLevel" in r.stderr


def test_missing_explicit_config_is_an_error(tmp_path):
    r = run(str(tmp_path / "nope.json"))
    assert r.returncode == 2 and "nope.json" in r.stderr
