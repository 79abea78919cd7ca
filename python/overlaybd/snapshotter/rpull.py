"""rpull: register an overlaybd image in containerd without downloading its layers.

Why it exists: `ctr pull` cannot pass the image reference to the snapshotter, so layers would be
downloaded and unpacked. rpull does what containerd's pull does, minus the layer data: it stores
the manifest and config in containerd's content store (under a lease, with the GC reference
labels containerd's own pull sets), asks containerd's snapshot service to Prepare every layer
with the overlaybd labels plus `containerd.io/snapshot/image-ref` — which the overlaybd
snapshotter answers with AlreadyExists after creating a lazy layer — and finally creates the
image record. `ctr run --snapshotter=overlaybd IMAGE` then finds the image unpacked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from . import containerd_api_pb2 as api
from . import labels as L
from . import snapshots_pb2 as spb
from . import wkt_pb2

log = logging.getLogger(__name__)

SERVICE_CONTENT = "/containerd.services.content.v1.Content/"
SERVICE_IMAGES = "/containerd.services.images.v1.Images/"
SERVICE_LEASES = "/containerd.services.leases.v1.Leases/"
SERVICE_SNAPSHOTS = "/containerd.services.snapshots.v1.Snapshots/"
WRITE_CHUNK = 1 << 20
ANNOTATION_PREFIX = "containerd.io/snapshot/"


class RpullError(RuntimeError):
    """rpull failed; the message says which step and which layer/blob."""


@dataclass
class Layer:
    digest: str
    size: int
    diff_id: str
    chain_id: str
    annotations: dict[str, str]


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI ChainID: chain[0] = diff[0]; chain[i] = sha256(chain[i-1] + " " + diff[i])."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


class Containerd:
    """A minimal client of containerd's gRPC API (only the calls rpull needs)."""

    def __init__(self, address: str, namespace: str = "default") -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.namespace = namespace
        self.lease = ""

    def close(self) -> None:
        self.channel.close()

    def _md(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self.lease:
            md.append(("containerd-lease", self.lease))
        return md

    def _unary(self, path: str, req: Any, resp_type: Any, timeout: float = 300) -> Any:
        fn = self.channel.unary_unary(
            path, request_serializer=type(req).SerializeToString, response_deserializer=resp_type.FromString
        )
        return fn(req, metadata=self._md(), timeout=timeout)

    # leases
    def create_lease(self, expire: timedelta) -> str:
        until = (datetime.now(UTC) + expire).strftime("%Y-%m-%dT%H:%M:%SZ")
        lid = f"rpull-{secrets.token_hex(6)}"
        req = api.CreateLeaseRequest(id=lid, labels={"containerd.io/gc.expire": until})
        self._unary(SERVICE_LEASES + "Create", req, api.CreateLeaseResponse)
        self.lease = lid
        return lid

    def delete_lease(self) -> None:
        if self.lease:
            lid, self.lease = self.lease, ""
            self._unary(SERVICE_LEASES + "Delete", api.DeleteLeaseRequest(id=lid), wkt_pb2.Empty)

    # content
    def content_exists(self, digest: str) -> bool:
        try:
            self._unary(SERVICE_CONTENT + "Info", api.InfoRequest(digest=digest), api.InfoResponse)
            return True
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise

    def write_content(self, data: bytes, digest: str, labels: dict[str, str]) -> None:
        """Content.Write stream: WRITE chunks then COMMIT with the expected digest and labels."""
        if self.content_exists(digest):
            self.update_content_labels(digest, labels)
            return
        ref = f"rpull-{digest}"

        def requests() -> Iterator[api.WriteContentRequest]:
            yield api.WriteContentRequest(action=api.STAT, ref=ref)
            for off in range(0, len(data), WRITE_CHUNK):
                yield api.WriteContentRequest(
                    action=api.WRITE, ref=ref, total=len(data), offset=off, data=data[off : off + WRITE_CHUNK]
                )
            yield api.WriteContentRequest(
                action=api.COMMIT, ref=ref, total=len(data), offset=len(data), expected=digest, labels=labels
            )

        fn = self.channel.stream_stream(
            SERVICE_CONTENT + "Write",
            request_serializer=api.WriteContentRequest.SerializeToString,
            response_deserializer=api.WriteContentResponse.FromString,
        )
        try:
            for _ in fn(requests(), metadata=self._md(), timeout=300):
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise

    def update_content_labels(self, digest: str, labels: dict[str, str]) -> None:
        mask = wkt_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self._unary(
            SERVICE_CONTENT + "Update",
            api.UpdateRequest(info=api.ContentInfo(digest=digest, labels=labels), update_mask=mask),
            api.UpdateResponse,
        )

    # images
    def put_image(self, name: str, target: api.Descriptor) -> None:
        img = api.Image(name=name, target=target)
        try:
            self._unary(SERVICE_IMAGES + "Create", api.CreateImageRequest(image=img), api.CreateImageResponse)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            self._unary(
                SERVICE_IMAGES + "Update",
                api.UpdateImageRequest(image=img, update_mask=wkt_pb2.FieldMask(paths=["target"])),
                api.UpdateImageResponse,
            )

    # snapshots (containerd's service, which forwards to the proxy snapshotter)
    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        try:
            self._unary(
                SERVICE_SNAPSHOTS + "Stat",
                spb.StatSnapshotRequest(snapshotter=snapshotter, key=key),
                spb.StatSnapshotResponse,
            )
            return True
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise

    def prepare(self, snapshotter: str, key: str, parent: str, labels: dict[str, str]) -> None:
        self._unary(
            SERVICE_SNAPSHOTS + "Prepare",
            spb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=labels),
            spb.PrepareSnapshotResponse,
        )

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        self._unary(
            SERVICE_SNAPSHOTS + "Remove", spb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key), wkt_pb2.Empty
        )


def _layers(manifest: dict[str, Any], config: dict[str, Any]) -> list[Layer]:
    descs = manifest.get("layers", [])
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(descs) != len(diff_ids):
        raise RpullError(f"image config lists {len(diff_ids)} diff_ids but the manifest has {len(descs)} layers")
    chains = chain_ids(diff_ids)
    out = []
    for i, d in enumerate(descs):
        ann = {k: v for k, v in (d.get("annotations") or {}).items() if k.startswith(ANNOTATION_PREFIX)}
        if L.BLOB_DIGEST not in ann or L.BLOB_SIZE not in ann:
            raise RpullError(
                f"layer {i} ({d.get('digest')}) is not an overlaybd layer (no {L.BLOB_DIGEST} "
                "annotation); pull it with `ctr pull` instead"
            )
        out.append(Layer(d["digest"], int(d.get("size", 0)), diff_ids[i], chains[i], ann))
    return out


def rpull(
    ref: str,
    address: str,
    *,
    namespace: str = "default",
    snapshotter: str = "overlaybd",
    plain_http: bool = False,
    registry: Any = None,
) -> str:
    """Make `ref` runnable with `--snapshotter=snapshotter` without fetching layers; returns the top chainID."""
    from ..registry.client import RegistryClient, RegistryError
    from ..registry.reference import ReferenceError, parse_reference

    try:
        r = parse_reference(ref)
    except ReferenceError as e:
        raise RpullError(str(e)) from e
    scheme = "http" if plain_http else "https"
    client = registry or RegistryClient()
    try:
        m = client.get_manifest(r, scheme=scheme)
        config_body = client.get_blob(r, m.config["digest"], scheme=scheme)
    except (RegistryError, OSError) as e:
        raise RpullError(f"{ref}: cannot fetch manifest/config: {e}") from e
    config = json.loads(config_body)
    layers = _layers(m.doc, config)
    top = layers[-1].chain_id if layers else ""

    cd = Containerd(address, namespace)
    try:
        cd.create_lease(timedelta(hours=1))
        source = {f"containerd.io/distribution.source.{r.registry}": r.repository}
        cd.write_content(
            config_body,
            m.config["digest"],
            {**source, f"containerd.io/gc.ref.snapshot.{snapshotter}": top} if top else source,
        )
        mlabels = {**source, "containerd.io/gc.ref.content.config": m.config["digest"]}
        cd.write_content(m.body, m.digest, mlabels)
        parent = ""
        for i, ly in enumerate(layers):
            if not cd.snapshot_exists(snapshotter, ly.chain_id):
                _prepare_remote(cd, snapshotter, ref, ly, parent, i)
            parent = ly.chain_id
        cd.put_image(str(ref), api.Descriptor(media_type=m.media_type, digest=m.digest, size=len(m.body)))
    except grpc.RpcError as e:
        raise RpullError(f"{ref}: containerd at {address}: {e.code().name}: {e.details()}") from e
    finally:
        try:
            cd.delete_lease()
        except grpc.RpcError as e:
            log.warning("delete lease: %s", e.details())
        cd.close()
    return top


def _prepare_remote(cd: Containerd, snapshotter: str, ref: str, ly: Layer, parent: str, index: int) -> None:
    labels = {
        **ly.annotations,
        L.TARGET_SNAPSHOT_REF: ly.chain_id,
        L.TARGET_IMAGE_REF: ref,
        "containerd.io/snapshot/diff-id": ly.diff_id,
    }
    if parent:
        labels["containerd.io/snapshot/parent-chain-id"] = parent
    key = f"extract-{time.time_ns()}-{secrets.token_hex(3)} {ly.chain_id}"
    try:
        cd.prepare(snapshotter, key, parent, labels)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.ALREADY_EXISTS:
            log.info("layer %d %s: remote snapshot %s ready", index, ly.digest, ly.chain_id)
            return
        raise RpullError(f"layer {index} ({ly.digest}): Prepare: {e.code().name}: {e.details()}") from e
    cd.remove_snapshot(snapshotter, key)  # the snapshotter made a plain (downloadable) snapshot instead
    raise RpullError(
        f"layer {index} ({ly.digest}): snapshotter {snapshotter!r} did not take the layer as a "
        "remote overlaybd layer (is it the overlaybd snapshotter?)"
    )
