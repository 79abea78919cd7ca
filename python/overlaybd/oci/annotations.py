"""Annotation and label keys of overlaybd images (upstream pkg/label), and the layer annotations the convertor sets.

Why here: manifest annotations written by the convertor and record-trace are read back by rpull, which passes
them (plus the image reference) as snapshot labels to the snapshotter. Writers and readers share these keys;
checking incoming labels stays with the snapshotter (`snapshotter/labels.py`).
"""

from __future__ import annotations

#: prefix of the overlaybd layer annotations; rpull forwards every `containerd.io/snapshot/` annotation
SNAPSHOT_PREFIX = "containerd.io/snapshot/"
OVERLAYBD_PREFIX = SNAPSHOT_PREFIX + "overlaybd/"

# manifest layer annotations (and, forwarded by rpull, snapshot labels)
VERSION = OVERLAYBD_PREFIX + "version"
BLOB_DIGEST = OVERLAYBD_PREFIX + "blob-digest"
BLOB_SIZE = OVERLAYBD_PREFIX + "blob-size"
BLOB_FS_TYPE = OVERLAYBD_PREFIX + "blob-fs-type"
ACCELERATION_LAYER = OVERLAYBD_PREFIX + "acceleration-layer"

# snapshot labels the clients (rpull, record-trace) send to the snapshotter
TARGET_SNAPSHOT_REF = "containerd.io/snapshot.ref"
TARGET_IMAGE_REF = SNAPSHOT_PREFIX + "image-ref"
CRI_IMAGE_REF = SNAPSHOT_PREFIX + "cri.image-ref"
DIFF_ID = SNAPSHOT_PREFIX + "diff-id"
PARENT_CHAIN_ID = SNAPSHOT_PREFIX + "parent-chain-id"
RECORD_TRACE = OVERLAYBD_PREFIX + "record-trace"
RECORD_TRACE_PATH = OVERLAYBD_PREFIX + "record-trace-path"

#: the overlaybd layer format version the convertor writes (upstream's value)
FORMAT_VERSION = "0.1.0"


def layer_annotations(digest: str, size: int, fs_type: str) -> dict[str, str]:
    """Annotations of a converted overlaybd layer: what rpull needs to prepare it lazily."""
    return {VERSION: FORMAT_VERSION, BLOB_DIGEST: digest, BLOB_SIZE: str(size), BLOB_FS_TYPE: fs_type}


def is_overlaybd_layer(annotations: dict[str, str]) -> bool:
    """A layer rpull can prepare lazily: it names its blob's digest and size."""
    return BLOB_DIGEST in annotations and BLOB_SIZE in annotations


def is_acceleration_layer(annotations: dict[str, str]) -> bool:
    """The image's trace layer (record-trace): its blob is a small tar holding `trace`."""
    return annotations.get(ACCELERATION_LAYER) == "yes"
