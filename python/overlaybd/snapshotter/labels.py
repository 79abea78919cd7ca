"""Snapshot label keys (upstream pkg/label) and the checks applied to incoming labels.

Why: the labels are the protocol between containerd's unpacker, `rpull`, the convertor and
this snapshotter; a malformed one must be rejected with InvalidArgument at Prepare time, not
discovered later as a device that fails to attach. The keys the image and its clients share are
defined in `oci/annotations.py` and re-exported here, so the snapshotter reads one module.
"""

from __future__ import annotations

import re

from ..oci.annotations import (
    ACCELERATION_LAYER,
    BLOB_DIGEST,
    BLOB_FS_TYPE,
    BLOB_SIZE,
    CRI_IMAGE_REF,
    RECORD_TRACE,
    RECORD_TRACE_PATH,
    TARGET_IMAGE_REF,
    TARGET_SNAPSHOT_REF,
    VERSION,
    is_acceleration_layer,
)
from .errors import InvalidArgument

__all__ = [
    "ACCELERATION_LAYER",
    "BLOB_DIGEST",
    "BLOB_FS_TYPE",
    "BLOB_SIZE",
    "CRI_IMAGE_REF",
    "LOCAL_COMMIT_PATH",
    "RECORD_TRACE",
    "RECORD_TRACE_PATH",
    "REMOTE",
    "REMOTE_VALUE",
    "SNAPSHOT_TYPE",
    "TARGET_IMAGE_REF",
    "TARGET_SNAPSHOT_REF",
    "VERSION",
    "VSIZE",
    "WRITABLE",
    "WRITABLE_MODES",
    "image_ref",
    "is_acceleration_layer",
    "is_remote_layer",
    "records_trace",
    "validate",
]

# labels only the snapshotter and containerd exchange (the image's keys are in oci/annotations.py)
VSIZE = "containerd.io/snapshot/overlaybd/vsize"
REMOTE = "containerd.io/snapshot/remote"
REMOTE_VALUE = "remote snapshot"
SNAPSHOT_TYPE = "containerd.io/snapshot/type"
WRITABLE = "containerd.io/snapshot/overlaybd.writable"
LOCAL_COMMIT_PATH = "containerd.io/snapshot/overlaybd.localcommitpath"

MAX_LABEL_BYTES = 4096  # containerd labels.Validate: len(key)+len(value)
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
WRITABLE_MODES = ("dir", "dev")


def validate(labels: dict[str, str]) -> None:
    """containerd's generic rule plus the overlaybd-specific labels' syntax."""
    for k, v in labels.items():
        if not k:
            raise InvalidArgument("label key must not be empty: invalid argument")
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"label key and value greater than maximum size ({MAX_LABEL_BYTES} bytes), "
                f"key: {k[:64]}: invalid argument"
            )
    digest = labels.get(BLOB_DIGEST)
    if digest is not None and not DIGEST_RE.match(digest):
        raise InvalidArgument(f"label {BLOB_DIGEST}={digest!r} is not a sha256 digest: invalid argument")
    size = labels.get(BLOB_SIZE)
    if size is not None and not (size.isdigit() and int(size) > 0):
        raise InvalidArgument(f"label {BLOB_SIZE}={size!r} is not a positive byte count: invalid argument")
    vsize = labels.get(VSIZE)
    if vsize is not None and not (vsize.isdigit() and 0 < int(vsize) <= 1 << 20):
        raise InvalidArgument(f"label {VSIZE}={vsize!r} is not a size in GB (1..1048576): invalid argument")
    writable = labels.get(WRITABLE)
    if writable is not None and writable not in (*WRITABLE_MODES, "overlayfs", "false"):
        raise InvalidArgument(f"label {WRITABLE}={writable!r} must be dir or dev: invalid argument")
    if records_trace(labels):
        trace = labels.get(RECORD_TRACE_PATH, "")
        if not trace.startswith("/"):
            raise InvalidArgument(
                f"label {RECORD_TRACE_PATH}={trace!r} must be an absolute path when "
                f"{RECORD_TRACE}=yes: invalid argument"
            )


def image_ref(labels: dict[str, str]) -> str:
    return labels.get(TARGET_IMAGE_REF) or labels.get(CRI_IMAGE_REF) or ""


def is_remote_layer(labels: dict[str, str]) -> bool:
    """Upstream identifySnapshotStorageType rule 1: a lazily loadable overlaybd layer being pulled."""
    return bool(
        labels.get(TARGET_SNAPSHOT_REF) and labels.get(BLOB_DIGEST) and labels.get(BLOB_SIZE) and image_ref(labels)
    )


def records_trace(labels: dict[str, str]) -> bool:
    """`ctr record-trace`: the rootfs asks for its image layer's reads to be recorded."""
    return labels.get(RECORD_TRACE) == "yes"
