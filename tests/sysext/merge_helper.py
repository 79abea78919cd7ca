"""Runs INSIDE `unshare -m` (a private mount namespace): merge the extensions under ROOT with the real
systemd-sysext, exercise the merged /usr, unmerge, and print one JSON report on stdout.

On this host /run is not a mount and systemd-sysext needs a shared "/" for --root merges to be visible,
so: make everything private (nothing leaks to the host), then shared, then a tmpfs on /run
(test-environment.md section 2, "Lighter path A"). Leaving the namespace drops every mount; loop devices
are auto-cleared by systemd-sysext on unmount.

usage: merge_helper.py ROOT [--force] [--exercise]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BUNDLE = "usr/local/overlaybd"


def sh(cmd: list[str], **kw) -> dict:
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, **kw)
    return {"cmd": cmd, "rc": res.returncode, "stdout": res.stdout, "stderr": res.stderr}


def exercise(root: Path, report: dict) -> None:
    """Run every frozen tool from the merged /usr with an empty environment; verify units; run tmpfiles."""
    bindir = root / BUNDLE / "bin"
    report["bin"] = sorted(p.name for p in bindir.iterdir())
    report["tools"] = {name: sh(["env", "-i", str(bindir / name), "--version"]) for name in report["bin"]}
    units = ["overlaybd-tcmu.service", "overlaybd-snapshotter.service", "multi-user.target"]
    report["verify"] = {
        u: sh(["systemd-analyze", "verify", f"--root={root}", f"/usr/lib/systemd/system/{u}"]) for u in units[:2]
    }
    report["cat_config"] = sh(["systemd-analyze", "cat-config", f"--root={root}", "systemd/system/multi-user.target.d"])


def main(argv: list[str]) -> int:
    root = Path(argv[0]).resolve()
    force = "--force" in argv
    report: dict = {}
    for cmd in (
        ["mount", "--make-rprivate", "/"],
        ["mount", "--make-rshared", "/"],
        ["mount", "-t", "tmpfs", "tmpfs", "/run"],
    ):
        r = sh(cmd)
        if r["rc"] != 0:
            print(json.dumps({"setup_failed": r}))
            return 1
    merge = ["systemd-sysext", f"--root={root}", "merge"] + (["--force"] if force else [])
    report["merge"] = sh(merge, env=dict(os.environ, SYSTEMD_LOG_LEVEL="debug"))
    report["merged"] = (root / BUNDLE).is_dir()
    report["mounts"] = [line for line in Path("/proc/self/mounts").read_text().splitlines() if str(root) in line]
    if report["merged"] and "--exercise" in argv:
        exercise(root, report)
    report["unmerge"] = sh(["systemd-sysext", f"--root={root}", "unmerge"])
    report["after_unmerge"] = (root / BUNDLE).exists()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
