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
    "esc",
    "image_ref",
    "is_acceleration_layer",
    "is_remote_layer",
    "records_trace",
    "validate",
    "validate_key",
]

# labels only the snapshotter and containerd exchange (the image's keys are in oci/annotations.py)
VSIZE = "containerd.io/snapshot/overlaybd/vsize"
REMOTE = "containerd.io/snapshot/remote"
REMOTE_VALUE = "remote snapshot"
SNAPSHOT_TYPE = "containerd.io/snapshot/type"
WRITABLE = "containerd.io/snapshot/overlaybd.writable"
LOCAL_COMMIT_PATH = "containerd.io/snapshot/overlaybd.localcommitpath"

MAX_LABEL_BYTES = 4096  # containerd labels.Validate: len(key)+len(value)
MAX_KEY_BYTES = 4096  # snapshot keys/names: containerd's are "<ns>/<seq>/<key>", far below; bounds every echo
MAX_INT64 = (1 << 63) - 1  # what the metadata store (SQLite INTEGER) and UsageResponse (int64) hold
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
DECIMAL_RE = re.compile(r"^[0-9]{1,19}$")  # ASCII digits only (str.isdigit() accepts e.g. "²")
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x85: "\\x85", 0x2028: "\\u2028", 0x2029: "\\u2029"}
WRITABLE_MODES = ("dir", "dev")


def esc(text: str, limit: int = 256) -> str:
    """Client data made safe for one log line or error message: control characters escaped (a key with a
    newline cannot forge a log line), and cut to `limit` characters with a note of the full length."""
    out = text[:limit].translate(_CONTROL)
    return out if len(text) <= limit else f"{out}...({len(text)} chars)"


def validate_key(key: str, what: str = "snapshot key") -> None:
    """Keys are bounded: a huge key would be stored and then echoed into every error message about it
    (the client then sees RESOURCE_EXHAUSTED for an oversized status instead of the real error)."""
    if not key:
        raise InvalidArgument(f"{what} must not be empty: invalid argument")
    n = len(key.encode("utf-8", "surrogatepass"))
    if n > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"{what} is {n} bytes, greater than maximum size ({MAX_KEY_BYTES} bytes), key: {esc(key, 64)}: "
            "invalid argument"
        )


def _int_label(labels: dict[str, str], key: str, lo: int, hi: int, meaning: str) -> None:
    """A decimal label within lo..hi, else InvalidArgument naming the label (never an int SQLite cannot hold)."""
    v = labels.get(key)
    if v is not None and not (DECIMAL_RE.match(v) and lo <= int(v) <= hi):
        raise InvalidArgument(f"label {key}={esc(v, 64)!r} is not {meaning} ({lo}..{hi}): invalid argument")


def validate(labels: dict[str, str]) -> None:
    """containerd's generic rule (labels.Validate, same message) plus the overlaybd-specific labels' syntax."""
    for k, v in labels.items():
        if not k:
            raise InvalidArgument("label key must not be empty: invalid argument")
        if len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass")) > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"label key and value greater than maximum size ({MAX_LABEL_BYTES} bytes), "
                f"key: {esc(k[:10])}: invalid argument"
            )
    digest = labels.get(BLOB_DIGEST)
    if digest is not None and not DIGEST_RE.match(digest):
        raise InvalidArgument(f"label {BLOB_DIGEST}={esc(digest, 80)!r} is not a sha256 digest: invalid argument")
    _int_label(labels, BLOB_SIZE, 1, MAX_INT64, "a positive byte count")
    _int_label(labels, VSIZE, 1, 1 << 20, "a size in GB")
    writable = labels.get(WRITABLE)
    if writable is not None and writable not in (*WRITABLE_MODES, "overlayfs", "false"):
        raise InvalidArgument(f"label {WRITABLE}={esc(writable, 64)!r} must be dir or dev: invalid argument")
    if records_trace(labels):
        trace = labels.get(RECORD_TRACE_PATH, "")
        if not trace.startswith("/"):
            raise InvalidArgument(
                f"label {RECORD_TRACE_PATH}={esc(trace)!r} must be an absolute path when "
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
