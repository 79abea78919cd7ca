"""Shared helpers for the registry tests: service configs and image hashing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from overlaybd.config.image_config import device_config_from_dict
from overlaybd.config.service import service_config_from_dict


def make_service(
    tmp: Path,
    *,
    cred: dict | None = None,
    refill: int = 262144,
    audit: bool = False,
    download: dict | None = None,
    extra: dict | None = None,
) -> Any:
    doc: dict[str, Any] = {
        "cacheConfig": {"cacheType": "file", "cacheDir": str(tmp / "cache"), "cacheSizeGB": 1, "refillSize": refill},
        "credentialConfig": {"mode": "file", "path": str(tmp / "cred.json")},
        "enableAudit": audit,
        "auditPath": str(tmp / "audit.log"),
        "download": download or {"enable": False},
    }
    doc.update(extra or {})
    (tmp / "cred.json").write_text(json.dumps(cred or {"auths": {}}))
    return service_config_from_dict(doc, str(tmp / "overlaybd.json"))


def device(repo_blob_url: str, layers: list[dict], dirs: list[str] | None = None) -> Any:
    lowers = [{"digest": x["digest"], "size": x["size"]} for x in layers]
    for lo, d in zip(lowers, dirs or [], strict=False):
        lo["dir"] = d
    return device_config_from_dict({"repoBlobUrl": repo_blob_url, "lowers": lowers})


def sha256_of(f: Any, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    mv = memoryview(buf)
    off = 0
    size = f.size()
    while off < size:
        n = f.pread_into(mv[: min(chunk, size - off)], off)
        assert n > 0
        h.update(mv[:n])
        off += n
    return h.hexdigest()
