"""gRPC front of the snapshotter: containerd.services.snapshots.v1.Snapshots on a unix socket.

Why thin: all semantics live in `service.Snapshotter`; this module only converts protobuf
messages, maps `SnapshotError` to its status code, and batches List replies (100 Infos per
message, like containerd's contrib/snapshotservice).
"""

from __future__ import annotations

import logging
import os
from concurrent import futures
from typing import cast

import grpc

from ..containerd_api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc, wkt_pb2
from .errors import SnapshotError
from .labels import esc
from .mounts import Mount
from .service import Snapshotter
from .store import Snapshot

log = logging.getLogger(__name__)

LIST_BATCH = 100
#: longest status message sent: gRPC clients refuse trailers over 8 KiB (RESOURCE_EXHAUSTED instead of the
#: real code), and a message may echo several client keys
MAX_MESSAGE = 4096


def _mounts(ms: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in ms]


def _ts(ns: int) -> wkt_pb2.Timestamp:
    return wkt_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info(s: Snapshot) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=s.key,
        parent=s.parent,
        kind=cast(snapshots_pb2.Kind, s.kind),
        created_at=_ts(s.created_ns),
        updated_at=_ts(s.updated_ns),
        labels=s.labels,
    )


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):
    """Each method: call the snapshotter, or abort with the error's code and message."""

    def __init__(self, sn: Snapshotter) -> None:
        self.sn = sn

    def _call(self, context: grpc.ServicerContext, name: str, fn, *args):
        try:
            return fn(*args)
        except SnapshotError as e:
            log.debug(
                "%s(%s) -> %s: %s", name, ", ".join(esc(repr(a), 200) for a in args[:2]), e.code.name, esc(e.message)
            )
            msg = e.message if len(e.message) <= MAX_MESSAGE else e.message[: MAX_MESSAGE - 3] + "..."
            context.abort(e.code, msg)

    def Prepare(self, request, context):
        ms = self._call(context, "Prepare", self.sn.prepare, request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(ms))

    def View(self, request, context):
        ms = self._call(context, "View", self.sn.view, request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(ms))

    def Mounts(self, request, context):
        ms = self._call(context, "Mounts", self.sn.mounts, request.key)
        return snapshots_pb2.MountsResponse(mounts=_mounts(ms))

    def Commit(self, request, context):
        self._call(context, "Commit", self.sn.commit, request.name, request.key, dict(request.labels), request.parent)
        return wkt_pb2.Empty()

    def Remove(self, request, context):
        self._call(context, "Remove", self.sn.remove, request.key)
        return wkt_pb2.Empty()

    def Stat(self, request, context):
        s = self._call(context, "Stat", self.sn.stat, request.key)
        return snapshots_pb2.StatSnapshotResponse(info=info(s))

    def Update(self, request, context):
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        s = self._call(context, "Update", self.sn.update, request.info.name, dict(request.info.labels), paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=info(s))

    def List(self, request, context):
        items = self._call(context, "List", self.sn.list, list(request.filters))
        for i in range(0, len(items), LIST_BATCH):
            yield snapshots_pb2.ListSnapshotsResponse(info=[info(s) for s in items[i : i + LIST_BATCH]])

    def Usage(self, request, context):
        size, inodes = self._call(context, "Usage", self.sn.usage, request.key)
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request, context):
        self._call(context, "Cleanup", self.sn.cleanup)
        return wkt_pb2.Empty()


def serve(sn: Snapshotter, address: str, workers: int = 8) -> grpc.Server:
    """Listen on unix:`address` (parent dir created 0700, stale socket removed); returns the started server."""
    os.makedirs(os.path.dirname(address) or ".", mode=0o700, exist_ok=True)
    if os.path.exists(address):
        os.unlink(address)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots"))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(sn), server)
    if server.add_insecure_port(f"unix://{address}") == 0:
        raise OSError(f"{address}: cannot listen")
    server.start()
    log.info("serving containerd.services.snapshots.v1.Snapshots on %s (root %s)", address, sn.root)
    return server
