"""Reading and writing OCI image layouts (the convertor's and record-trace's images on disk).

Why a layout: it is what skopeo, `ctr image import/export` and registries all speak, so the
convertor and record-trace only transform layouts and leave transport (registry pull/push) to skopeo.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..format.atomic import atomic_write_bytes
from .mediatypes import INDEX_TYPES

NAME_ANNOTATION = "io.containerd.image.name"
REF_ANNOTATION = "org.opencontainers.image.ref.name"


class LayoutError(ValueError):
    """A layout that is missing a file or has a malformed one; names the path and the field."""

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path, self.field = path, field
        super().__init__(f"{path}: {field}: {message}")


@dataclass
class SourceImage:
    """One image of a layout: its manifest and config documents and the manifest's digest."""

    manifest: dict[str, Any]
    config: dict[str, Any]
    manifest_digest: str


class Layout:
    """An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def blob_path(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
            raise LayoutError(str(self.path), "digest", f"unsupported digest {digest!r}")
        return self.path / "blobs" / "sha256" / hexd

    def read_json(self, digest: str, what: str) -> dict[str, Any]:
        p = self.blob_path(digest)
        try:
            data = p.read_bytes()
        except FileNotFoundError as e:
            raise LayoutError(str(p), what, f"blob {digest} missing") from e
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise LayoutError(str(p), what, "content does not match its digest")
        try:
            return json.loads(data)
        except ValueError as e:
            raise LayoutError(str(p), what, f"not JSON: {e}") from e

    def index(self) -> dict[str, Any]:
        p = self.path / "index.json"
        try:
            return json.loads(p.read_text())
        except FileNotFoundError as e:
            raise LayoutError(str(p), "index.json", "not an OCI layout (no index.json)") from e
        except ValueError as e:
            raise LayoutError(str(p), "index.json", f"not JSON: {e}") from e

    def source(self, name: str | None = None, platform: str = "linux/amd64") -> SourceImage:
        """The image manifest (resolving an index to `platform`) named `name`, or the only one."""
        manifests = self.index().get("manifests", [])
        if name:
            manifests = [
                m
                for m in manifests
                if name in (m.get("annotations", {}).get(NAME_ANNOTATION), m.get("annotations", {}).get(REF_ANNOTATION))
            ]
        if len(manifests) != 1:
            raise LayoutError(
                str(self.path / "index.json"),
                "manifests",
                f"expected one image{f' named {name!r}' if name else ''}, found {len(manifests)}",
            )
        desc = manifests[0]
        doc = self.read_json(desc["digest"], "manifest")
        if doc.get("mediaType", desc.get("mediaType")) in INDEX_TYPES or "manifests" in doc:
            os_, arch = platform.split("/", 1)
            for m in doc.get("manifests", []):
                p = m.get("platform", {})
                if p.get("os") == os_ and p.get("architecture") == arch:
                    desc = m
                    doc = self.read_json(m["digest"], "manifest")
                    break
            else:
                raise LayoutError(str(self.path), "manifests", f"no manifest for platform {platform}")
        config = self.read_json(doc["config"]["digest"], "config")
        return SourceImage(doc, config, desc["digest"])

    def open_layer(self, desc: dict[str, Any]) -> IO[bytes]:
        """A stream of the *uncompressed* layer tar (gzip/zstd by media type or magic)."""
        p = self.blob_path(desc["digest"])
        f = open(p, "rb")
        magic = f.read(4)
        f.seek(0)
        if magic[:2] == b"\x1f\x8b":
            return gzip.GzipFile(fileobj=f)  # type: ignore[return-value]
        if magic == b"\x28\xb5\x2f\xfd":
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(f, closefd=True)  # type: ignore[return-value]
        return f

    # -- writing -------------------------------------------------------------------------------
    def init(self) -> None:
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (self.path / "oci-layout").exists():
            atomic_write_bytes(self.path / "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        if not (self.path / "index.json").exists():
            atomic_write_bytes(self.path / "index.json", json.dumps({"schemaVersion": 2, "manifests": []}).encode())

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        p = self.blob_path(digest)
        if not p.exists():
            atomic_write_bytes(p, data)
        return digest, len(data)

    def put_file(self, path: str) -> tuple[str, int]:
        """Move a finished file into the blob store (hashing it without loading it whole)."""
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        size = os.path.getsize(path)
        dst = self.blob_path(digest)
        if not dst.exists():
            try:
                os.replace(path, dst)
            except OSError:
                shutil.copyfile(path, dst)
        return digest, size

    def tag(self, name: str, digest: str, size: int, media_type: str) -> None:
        """Point `name` (and its tag as `ref.name`, what skopeo's `oci:DIR:NAME` looks up) at a manifest."""
        idx = self.index()
        ref = name.rsplit(":", 1)[-1] if ":" in name.rsplit("/", 1)[-1] else name

        def replaced(m: dict[str, Any]) -> bool:
            ann = m.get("annotations") or {}
            return ann.get(NAME_ANNOTATION) == name or (NAME_ANNOTATION not in ann and ann.get(REF_ANNOTATION) == ref)

        keep = [m for m in idx.get("manifests", []) if not replaced(m)]
        keep.append(
            {
                "mediaType": media_type,
                "digest": digest,
                "size": size,
                "annotations": {NAME_ANNOTATION: name, REF_ANNOTATION: ref},
            }
        )
        idx["manifests"] = keep
        atomic_write_bytes(self.path / "index.json", json.dumps(idx, indent=2).encode())
