"""The acceleration layer of an overlaybd image: a recorded trace shipped as the image's top layer.

Why: the reads a container makes while it starts are predictable. Recorded once (record-trace), shipped
in the image as a small uncompressed tar holding the file `trace` with the manifest annotation
`containerd.io/snapshot/overlaybd/acceleration-layer=yes`, they are replayed in the background each
time the image's device attaches (spec format.md §8). Its diff_id is its digest, and it carries the
blob-digest/blob-size annotations, so rpull prepares it like the other layers; the snapshotter fetches
it whole while preparing it (`fetch_acceleration_trace`).
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

from ..format.errors import FormatError
from . import annotations as A
from .layout import Layout, LayoutError
from .mediatypes import MT_OCI_LAYER, MT_OCI_MANIFEST

#: the member of the acceleration layer's tar (and the file in the snapshot's layer dir) holding the trace
TRACE_MEMBER = "trace"
#: an acceleration layer is fetched whole into memory; traces are a few hundred KiB in practice
MAX_ACCEL_BLOB = 64 << 20


def build_acceleration_layer(trace: bytes) -> bytes:
    """The acceleration layer blob: an uncompressed tar holding `trace` only; reproducible (fixed metadata)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo(TRACE_MEMBER)
        ti.size, ti.mode, ti.mtime = len(trace), 0o644, 0
        tf.addfile(ti, io.BytesIO(trace))
    return buf.getvalue()


def read_acceleration_trace(blob: bytes, name: str) -> bytes:
    """The `trace` member of an acceleration layer blob (tar, possibly gzip-compressed); FormatError if absent."""
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
            for member in tf:
                if member.name.removeprefix("./") != TRACE_MEMBER:
                    continue
                if not member.isreg():
                    raise FormatError(name, TRACE_MEMBER, "the tar member is not a regular file")
                if member.size > MAX_ACCEL_BLOB:
                    raise FormatError(name, TRACE_MEMBER, f"{member.size} bytes exceeds the limit {MAX_ACCEL_BLOB}")
                f = tf.extractfile(member)
                assert f is not None  # a regular file
                return f.read(member.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise FormatError(name, "tar", f"not a readable tar: {e}") from e
    raise FormatError(name, TRACE_MEMBER, "the acceleration layer has no `trace` member")


def fetch_acceleration_trace(
    image_ref: str, digest: str, insecure_hosts: set[str], *, deadline: float | None = None, service: Any = None
) -> bytes:
    """Fetch an acceleration layer's blob from the image's registry and return its trace.

    `deadline` bounds the whole fetch, retries included (the snapshotter passes overlaybd.json's
    `readDeadlineSec`, so containerd hears of a registry outage within the same deadline as a device read);
    `service`: the overlaybd.json whose credentials to use (None: defaults)."""
    from ..registry.client import RegistryClient
    from ..registry.image_ref import parse_reference

    ref = parse_reference(image_ref)
    scheme = "http" if ref.registry in insecure_hosts else "https"
    client = RegistryClient(service, deadline=deadline)
    try:
        blob = client.get_blob(ref, digest, scheme=scheme, limit=MAX_ACCEL_BLOB)
    finally:
        client.close()
    return read_acceleration_trace(blob, f"{ref.registry}/{ref.repository}@{digest}")


def append_acceleration_layer(layout: Layout, src_name: str, dst_name: str, trace: bytes) -> str:
    """Tag image `src_name` of `layout` plus an acceleration layer holding `trace` as `dst_name`.

    Returns the new manifest's digest. The new config gets the layer's diff_id (and a history entry).
    Raises LayoutError when the source is missing or already has an acceleration layer.
    """
    image = layout.source(src_name)
    manifest, config = dict(image.manifest), dict(image.config)
    layers = list(manifest.get("layers") or [])
    if any(A.is_acceleration_layer(ly.get("annotations") or {}) for ly in layers):
        raise LayoutError(str(layout.path), "layers", f"image {src_name!r} already has an acceleration layer")

    blob = build_acceleration_layer(trace)
    digest, size = layout.put_bytes(blob)
    rootfs = dict(config.get("rootfs") or {"type": "layers"})
    rootfs["diff_ids"] = [*rootfs.get("diff_ids", []), digest]  # uncompressed: diff_id == digest
    config["rootfs"] = rootfs
    if "history" in config:
        entry = {"created_by": "overlaybd-record-trace", "comment": "overlaybd acceleration layer"}
        config["history"] = [*config["history"], entry]
    cdigest, csize = layout.put_bytes(json.dumps(config, separators=(",", ":")).encode())
    manifest["config"] = {**manifest["config"], "digest": cdigest, "size": csize}
    annotations = {A.ACCELERATION_LAYER: "yes", A.BLOB_DIGEST: digest, A.BLOB_SIZE: str(size)}
    layers.append({"mediaType": MT_OCI_LAYER, "digest": digest, "size": size, "annotations": annotations})
    manifest["layers"] = layers
    mdigest, msize = layout.put_bytes(json.dumps(manifest, separators=(",", ":")).encode())
    layout.tag(dst_name, mdigest, msize, manifest.get("mediaType", MT_OCI_MANIFEST))
    return mdigest
