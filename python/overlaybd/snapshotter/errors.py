"""Snapshot errors carrying the gRPC code containerd maps them to (errgrpc.ToNative).

Why: containerd reacts to the *code*, not the text (AlreadyExists from Prepare means
"remote snapshot ready", Unimplemented from Cleanup is tolerated by GC, ...), so every
failure the service can raise names its code here once.
"""

from __future__ import annotations

import grpc


class SnapshotError(Exception):
    """A failed snapshot operation; `code` is what the gRPC client sees."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(SnapshotError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SnapshotError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SnapshotError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(SnapshotError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unimplemented(SnapshotError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(SnapshotError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(SnapshotError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Internal(SnapshotError):
    code = grpc.StatusCode.INTERNAL
