"""Tiny OCI images for the containerd tests, built from the host's /bin/busybox (busybox-static).

Why: the tests must not reach the internet; a 1 MiB static busybox plus a few files is a
complete, runnable image. `write_layout` writes an OCI image layout that `ctr image import`
and `skopeo copy oci:` accept.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "cat", "echo", "ls", "sleep", "mkdir", "rm", "touch", "test", "true", "wc", "grep", "mount", "df")
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def _add(
    tf: tarfile.TarFile,
    name: str,
    data: bytes | None = None,
    *,
    mode: int = 0o644,
    link: str = "",
    kind: bytes = tarfile.REGTYPE,
) -> None:
    ti = tarfile.TarInfo(name)
    ti.mode, ti.mtime, ti.type = mode, 0, kind
    if kind == tarfile.SYMTYPE:
        ti.linkname = link
        tf.addfile(ti)
    elif kind == tarfile.DIRTYPE:
        tf.addfile(ti)
    else:
        ti.size = len(data or b"")
        tf.addfile(ti, io.BytesIO(data or b""))


def busybox_layer(
    os_release: str = 'ID=obdtest\nNAME="overlaybd test"\n', extra: dict[str, bytes] | None = None
) -> bytes:
    """Uncompressed tar: /bin/busybox + applet symlinks + /etc/os-release + empty /tmp /proc /sys /dev."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "data"):
            _add(tf, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        _add(tf, "bin/busybox", Path(BUSYBOX).read_bytes(), mode=0o755)
        for a in APPLETS:
            _add(tf, f"bin/{a}", link="busybox", kind=tarfile.SYMTYPE)
        _add(tf, "etc/os-release", os_release.encode())
        for name, data in (extra or {}).items():
            _add(tf, name, data)
    return buf.getvalue()


def files_layer(files: dict[str, bytes], whiteouts: tuple[str, ...] = ()) -> bytes:
    """A layer adding `files` (parents must exist below) and whiteout entries for `whiteouts`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            _add(tf, name, data)
        for name in whiteouts:
            d, b = os.path.split(name)
            _add(tf, os.path.join(d, ".wh." + b), b"")
    return buf.getvalue()


def _blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest[7:]).write_bytes(data)
    return digest, len(data)


def write_layout(out: Path, name: str, layers: list[bytes], cmd: tuple[str, ...] = ("/bin/sh",)) -> str:
    """OCI layout at `out` with gzip layers; returns the manifest digest."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    descs, diff_ids = [], []
    for raw in layers:
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        gz = gzip.compress(raw, mtime=0)
        d, n = _blob(blobs, gz)
        descs.append({"mediaType": MT_LAYER_GZ, "digest": d, "size": n})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cd, cn = _blob(blobs, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cd, "size": cn},
        "layers": descs,
    }
    md, mn = _blob(blobs, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": md,
                "size": mn,
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                },
            }
        ],
    }
    (out / "index.json").write_text(json.dumps(index))
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return md


def write_layout_tar(tar_path: Path, work: Path, name: str, layers: list[bytes]) -> str:
    digest = write_layout(work, name, layers)
    with tarfile.open(tar_path, "w") as tf:
        for p in sorted(work.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(work)), recursive=False)
    return digest
