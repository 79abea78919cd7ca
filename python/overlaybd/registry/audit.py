"""The audit log (`enableAudit`/`auditPath`), in upstream's line format (spec §4.5).

`YYYY/MM/DD HH:MM:SS.uuuuuu|AUDIT|th=<hex>|<event>[pathname=..][offset=..][size=..][latency=..]`
Rotated at 10 MiB keeping 3 old files, like upstream. Tools that parse upstream's
audit log keep working. The file is world-readable (0644), so URL credentials are
redacted from every field, whoever the caller is.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime
from typing import Any

from .image_ref import redact_url

ROTATE_BYTES = 10 << 20
ROTATE_KEEP = 3


class AuditLog:
    def __init__(self, path: str, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled and bool(path)
        self._lock = threading.Lock()

    def event(self, event: str, **fields: Any) -> None:
        """Append one line; fields are rendered `[key=value]` in the given order. Never raises."""
        if not self.enabled:
            return
        now = time.time()
        stamp = datetime.fromtimestamp(now).strftime("%Y/%m/%d %H:%M:%S") + f".{int(now * 1e6) % 1000000:06d}"
        tail = "".join(f"[{k}={redact_url(v) if isinstance(v, str) else v}]" for k, v in fields.items())
        line = f"{stamp}|AUDIT|th={threading.get_ident():x}|{event}{tail}\n".encode()
        with self._lock:
            try:
                self._rotate_if_needed()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            except OSError:
                pass  # auditing must never break I/O

    def _rotate_if_needed(self) -> None:
        try:
            if os.stat(self.path).st_size < ROTATE_BYTES:
                return
        except FileNotFoundError:
            return
        for i in range(ROTATE_KEEP - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")


_DISABLED = AuditLog("", False)
_logs: dict[str, AuditLog] = {}
_logs_lock = threading.Lock()


def audit_for(service: Any) -> AuditLog:
    """One AuditLog per path per process (so the rotation lock is shared)."""
    if service is None or not getattr(service, "enable_audit", False) or not service.audit_path:
        return _DISABLED
    with _logs_lock:
        log = _logs.get(service.audit_path)
        if log is None:
            log = _logs[service.audit_path] = AuditLog(service.audit_path)
        return log
