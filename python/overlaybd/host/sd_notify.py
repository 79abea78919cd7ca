"""Tell systemd a daemon is ready (sd_notify(3) protocol, no libsystemd).

Why: with Type=simple a unit is "active" as soon as the process exists, seconds before overlaybd-tcmu
can attach devices or the snapshotter's socket accepts connections; containerd (ordered after the
snapshotter) and `systemd-sysext refresh` followed by `ctr run` then race the daemon. With
Type=notify systemd waits for READY=1, which each daemon sends only once it serves requests.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1") to $NOTIFY_SOCKET; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # vsock addresses are not used for services on the host
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    """READY=1 plus a human-readable STATUS= line shown by `systemctl status`."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    """STOPPING=1: shutdown has begun (systemd shows "deactivating" instead of a failed process)."""
    return notify("STOPPING=1")
