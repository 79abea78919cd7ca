"""record-trace (upstream `ctr record-trace`): record a container's layer reads, publish them as an acceleration layer.

Why: the reads a container makes while it starts are predictable. Recorded once, shipped in the image
as its top "acceleration layer" (a small tar holding the file `trace`, manifest annotation
`containerd.io/snapshot/overlaybd/acceleration-layer=yes`), they are replayed in the background
each time the image's device attaches, so those ranges are in the local cache before the
container asks for them (spec format.md §8).

Flow of `record_trace()`:
1. `ctr run` the (rpulled) image with the snapshotter labels record-trace=yes and
   record-trace-path=<file>: the snapshotter empties the file and (re)attaches the image's top
   layer device with `recordTracePath`, so the image service records every layer read;
2. the command runs (bounded by a timeout), the container and its rootfs are removed;
3. `<trace>.lock` is removed: the image service dumps the trace and creates `<trace>.ok`;
4. the image is copied to an OCI layout (skopeo), the acceleration layer appended to its
   manifest and config, and the result pushed under the new reference (skopeo).

The acceleration layer's blob is an uncompressed tar with the one member `trace` (its diff_id is
its digest) carrying the overlaybd blob-digest/blob-size annotations, so rpull treats it like the
other layers; the snapshotter fetches it while preparing it (it must be local) and writes
`trace` into the layer's dir. Layers are never read from it: the image service drops it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..format.atomic import atomic_write_bytes
from ..format.errors import FormatError
from ..format.trace import read_trace
from . import labels as L

#: the member of the acceleration layer's tar (and the file in the layer's dir) holding the trace
TRACE_MEMBER = "trace"
#: an acceleration layer is fetched whole into memory; traces are a few hundred KiB in practice
MAX_ACCEL_BLOB = 64 << 20
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
#: how long the image service may take to dump the trace after the lock file is removed
DUMP_TIMEOUT = 30.0


class RecordTraceError(RuntimeError):
    """record-trace failed; the message names the step and the file, container or image concerned."""


# --------------------------------------------------------------------------- the acceleration layer


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


def fetch_acceleration_trace(image_ref: str, digest: str, insecure_hosts: set[str]) -> bytes:
    """Fetch an acceleration layer's blob from the image's registry and return its trace."""
    from ..registry.client import RegistryClient
    from ..registry.reference import parse_reference

    ref = parse_reference(image_ref)
    scheme = "http" if ref.registry in insecure_hosts else "https"
    client = RegistryClient(retry_budget=10.0)
    try:
        blob = client.get_blob(ref, digest, scheme=scheme, limit=MAX_ACCEL_BLOB)
    finally:
        client.close()
    return read_acceleration_trace(blob, f"{ref.registry}/{ref.repository}@{digest}")


def append_acceleration_layer(layout: Path, src_name: str, dst_name: str, trace: bytes) -> str:
    """Add the acceleration layer on top of image `src_name` of an OCI layout, as image `dst_name`.

    Returns the new manifest's digest. The new config gets the layer's diff_id (and a history entry).
    """
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    ann = "org.opencontainers.image.ref.name"
    src = [m for m in index.get("manifests", []) if (m.get("annotations") or {}).get(ann) == src_name]
    if not src:
        raise RecordTraceError(f"{index_path}: no image named {src_name!r}")
    manifest = json.loads(_blob(layout, src[0]["digest"]))
    layers = manifest.get("layers") or []
    if any(L.is_acceleration_layer(ly.get("annotations") or {}) for ly in layers):
        raise RecordTraceError(f"{index_path}: image {src_name!r} already has an acceleration layer")
    config = json.loads(_blob(layout, manifest["config"]["digest"]))

    blob = build_acceleration_layer(trace)
    digest = _put_blob(layout, blob)
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []}).setdefault("diff_ids", []).append(digest)
    if "history" in config:
        config["history"].append({"created_by": "overlaybd-record-trace", "comment": "overlaybd acceleration layer"})
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    manifest["config"] = {**manifest["config"], "digest": _put_blob(layout, config_bytes), "size": len(config_bytes)}
    layers.append(
        {
            "mediaType": MT_LAYER_TAR,
            "digest": digest,
            "size": len(blob),
            "annotations": {L.ACCELERATION_LAYER: "yes", L.BLOB_DIGEST: digest, L.BLOB_SIZE: str(len(blob))},
        }
    )
    manifest["layers"] = layers
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    mdigest = _put_blob(layout, manifest_bytes)
    entry = {
        **src[0],
        "digest": mdigest,
        "size": len(manifest_bytes),
        "annotations": {**(src[0].get("annotations") or {}), ann: dst_name},
    }
    index["manifests"] = [m for m in index["manifests"] if (m.get("annotations") or {}).get(ann) != dst_name]
    index["manifests"].append(entry)
    atomic_write_bytes(str(index_path), json.dumps(index).encode())
    return mdigest


def _blob(layout: Path, digest: str) -> bytes:
    algo, _, hexd = digest.partition(":")
    return (layout / "blobs" / algo / hexd).read_bytes()


def _put_blob(layout: Path, data: bytes) -> str:
    hexd = hashlib.sha256(data).hexdigest()
    d = layout / "blobs" / "sha256"
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(str(d / hexd), data)
    return "sha256:" + hexd


# --------------------------------------------------------------------------- recording


@dataclass
class RecordResult:
    trace_path: str
    records: int
    output: str
    timed_out: bool
    manifest_digest: str = ""


def _run(cmd: list[str], what: str, timeout: float = 600) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RecordTraceError(f"{what}: {e}") from e
    if r.returncode != 0:
        raise RecordTraceError(f"{what}: {' '.join(cmd[:3])}... exited {r.returncode}: {r.stderr.strip()}")
    return r


def run_recording_container(
    ctr: list[str],
    image: str,
    command: list[str],
    trace_path: str,
    *,
    snapshotter: str = "overlaybd",
    timeout: float = 60.0,
) -> tuple[str, bool]:
    """`ctr run --rm` the image with the record-trace labels; SIGKILL it after `timeout` seconds.

    Returns (output, timed_out). The container and its rootfs snapshot are gone on return.
    """
    cid = "record-trace-" + secrets.token_hex(4)
    cmd = [
        *ctr,
        "run",
        "--rm",
        "--snapshotter",
        snapshotter,
        "--snapshotter-label",
        f"{L.RECORD_TRACE}=yes",
        "--snapshotter-label",
        f"{L.RECORD_TRACE_PATH}={trace_path}",
        image,
        cid,
        *command,
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        subprocess.run([*ctr, "task", "kill", "-s", "SIGKILL", cid], capture_output=True, timeout=60)
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
    finally:
        # whatever happened to `ctr run`, leave no task or container (and so no rootfs) behind
        subprocess.run([*ctr, "task", "delete", "--force", cid], capture_output=True, timeout=60)
        subprocess.run([*ctr, "container", "rm", cid], capture_output=True, timeout=60)
    if p.returncode != 0 and not timed_out:
        raise RecordTraceError(f"container {cid} of {image}: ctr run exited {p.returncode}: {err.strip()}")
    return out, timed_out


def collect_garbage(ctr: list[str]) -> None:
    """Run containerd's GC now (deleting a lease with --sync does): containerd removes the backend snapshots of
    deleted containers only in GC, and until then they count as users of the image's device."""
    r = _run([*ctr, "leases", "create"], "create a lease", timeout=60)
    _run([*ctr, "leases", "delete", "--sync", r.stdout.split()[0]], "containerd garbage collection", timeout=120)


def finish_recording(trace_path: str, timeout: float = DUMP_TIMEOUT) -> int:
    """Remove `<trace>.lock` so the image service dumps the trace; wait for `<trace>.ok`; returns the record count."""
    lock, ok = trace_path + ".lock", trace_path + ".ok"
    if not os.path.exists(ok):
        try:
            os.unlink(lock)
        except FileNotFoundError:
            raise RecordTraceError(
                f"{lock} does not exist: the image service did not record (see its log); was the "
                "image pulled with rpull?"
            ) from None
        end = time.monotonic() + timeout
        while not os.path.exists(ok):
            if time.monotonic() > end:
                raise RecordTraceError(f"{ok} did not appear within {timeout:.0f}s after removing {lock}")
            time.sleep(0.1)
    try:
        records = read_trace(trace_path)
    except FormatError as e:
        raise RecordTraceError(str(e)) from e
    if not records:
        raise RecordTraceError(f"{trace_path}: the trace has no records (the container read nothing from the image)")
    return len(records)


def publish_with_acceleration_layer(
    image: str, new_ref: str, trace: bytes, work_dir: str, *, plain_http: bool = False, skopeo: str = "skopeo"
) -> str:
    """Copy `image` into an OCI layout, append the acceleration layer, push it as `new_ref`; returns its digest."""
    layout = Path(work_dir) / "layout"
    tls = ["--src-tls-verify=false"] if plain_http else []
    _run(
        [skopeo, "copy", "--quiet", "--preserve-digests", *tls, f"docker://{image}", f"oci:{layout}:src"],
        f"copy {image} to {layout}",
    )
    mdigest = append_acceleration_layer(layout, "src", "accel", trace)
    tls = ["--dest-tls-verify=false"] if plain_http else []
    _run(
        [skopeo, "copy", "--quiet", "--preserve-digests", *tls, f"oci:{layout}:accel", f"docker://{new_ref}"],
        f"push {new_ref}",
    )
    return mdigest


def record_trace(
    image: str,
    new_ref: str,
    command: list[str],
    *,
    address: str,
    work_dir: str,
    namespace: str = "default",
    snapshotter: str = "overlaybd",
    plain_http: bool = False,
    timeout: float = 60.0,
    ctr: str = "ctr",
    skopeo: str = "skopeo",
) -> RecordResult:
    """Record `command` running in `image` (already rpulled) and push `image` + acceleration layer as `new_ref`."""
    if not command:
        raise RecordTraceError("no command to run in the container")
    os.makedirs(work_dir, exist_ok=True)
    trace_path = os.path.abspath(os.path.join(work_dir, "trace"))
    ctr_cmd = [ctr, "--address", address, "--namespace", namespace]
    collect_garbage(ctr_cmd)
    output, timed_out = run_recording_container(
        ctr_cmd, image, command, trace_path, snapshotter=snapshotter, timeout=timeout
    )
    records = finish_recording(trace_path)
    with open(trace_path, "rb") as f:
        trace = f.read()
    result = RecordResult(trace_path, records, output, timed_out)
    result.manifest_digest = publish_with_acceleration_layer(
        image, new_ref, trace, work_dir, plain_http=plain_http, skopeo=skopeo
    )
    return result


def describe(result: RecordResult) -> dict[str, Any]:
    return {
        "trace": result.trace_path,
        "records": result.records,
        "timedOut": result.timed_out,
        "manifest": result.manifest_digest,
    }
