"""A minimal client of containerd's gRPC API: leases, content, images and snapshots (only the calls rpull needs).

Why hand-rolled paths: the stubs in `containerd_api/` transcribe only the messages rpull sends, so calls go
through `channel.unary_unary` with containerd's service paths. The namespace travels as gRPC metadata
`containerd-namespace`, the lease as `containerd-lease`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from ..containerd_api import content_images_leases_pb2 as api
from ..containerd_api import snapshots_pb2 as spb
from ..containerd_api import wkt_pb2

SERVICE_CONTENT = "/containerd.services.content.v1.Content/"
SERVICE_IMAGES = "/containerd.services.images.v1.Images/"
SERVICE_LEASES = "/containerd.services.leases.v1.Leases/"
SERVICE_SNAPSHOTS = "/containerd.services.snapshots.v1.Snapshots/"
WRITE_CHUNK = 1 << 20


class Containerd:
    """A minimal client of containerd's gRPC API (only the calls rpull needs)."""

    def __init__(self, address: str, namespace: str = "default") -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.namespace = namespace
        self.lease = ""

    def close(self) -> None:
        self.channel.close()

    def _md(self) -> tuple[tuple[str, str], ...]:
        md = [("containerd-namespace", self.namespace)]
        if self.lease:
            md.append(("containerd-lease", self.lease))
        return tuple(md)

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
