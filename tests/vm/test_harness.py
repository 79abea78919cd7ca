"""The qemu harness itself: a script runs in the guest kernel, its output and exit code come back."""

from __future__ import annotations

import pytest
from helpers.qemu import KVER, REPO

pytestmark = pytest.mark.vm


def test_script_output_and_exit_code(guest):
    (guest.scratch / "from-host.txt").write_text("shared\n")
    r = guest.run(
        "uname -r; cat from-host.txt; echo made-in-guest > from-guest.txt; "
        f"test -w {REPO} && echo host-root-writable; exit 3\n",
        timeout=300,
    )
    assert r.rc == 3
    lines = r.output.splitlines()
    assert lines[0] == KVER and lines[1] == "shared" and "host-root-writable" not in lines
    assert (guest.scratch / "from-guest.txt").read_text() == "made-in-guest\n"
    assert "VM: done" in r.console
