"""Building a lazy layer's `config.v1.json` from the snapshot chain and the image reference.

Why: the device of a layer must show the merged image, so its config lists every lower of
the chain (bottom -> top, copied from the parent's config) plus this layer, and a
`repoBlobUrl` derived from the image reference (`http://` for hosts marked insecure).
"""

from __future__ import annotations

import json
from typing import Any

from ..format.atomic import atomic_write_bytes
from .errors import InvalidArgument
from .layout import SnapshotDir


def repo_blob_url(image_ref: str, insecure_hosts: set[str]) -> str:
    """`https://<host>/v2/<repo>/blobs` for an image reference (docker.io -> registry-1.docker.io)."""
    from ..registry.image_ref import ReferenceError, parse_reference

    try:
        ref = parse_reference(image_ref)
    except ReferenceError as e:
        raise InvalidArgument(f"{e}: invalid argument") from e
    host = ref.registry
    scheme = "http" if host in insecure_hosts else "https"
    return f"{scheme}://{host}/v2/{ref.repository}/blobs"


def read_config(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return json.loads(f.read())


def write_config(path: str, cfg: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(cfg, indent=2).encode() + b"\n")


ZFILE_MAGIC = b"ZFile\x00\x01\x00"
LSMT_MAGIC0 = (564050879402828).to_bytes(8, "little")


def is_overlaybd_file(path: str) -> bool:
    """A ZFile or LSMT layer (by magic), as upstream's identifySnapshotStorageType rule 2 checks."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return head == ZFILE_MAGIC or head == LSMT_MAGIC0


def parent_lowers(parent: SnapshotDir | None) -> list[dict[str, Any]]:
    """The lowers a child of `parent` stacks on. A committed overlaybd snapshot's config lists every layer
    of its chain including its own (remote blob or sealed file), so this is just the parent's `lowers`."""
    if parent is None:
        return []
    cfg = read_config(parent.config)
    lowers = list(cfg.get("lowers", []))
    if cfg.get("accelerationLayer") and lowers:
        lowers.pop()  # the trace layer is no disk layer: layers stacked above leave it out
    return lowers


def sealed_config(sd: SnapshotDir) -> dict[str, Any]:
    """Config of a committed (sealed) writable snapshot: its lowers plus the sealed layer itself, read-only."""
    base = read_config(sd.config)
    lowers = [lo for lo in base.get("lowers", []) if lo.get("file") != sd.sealed] + [{"file": sd.sealed}]
    return {"repoBlobUrl": base.get("repoBlobUrl", ""), "lowers": lowers, "resultFile": sd.result_file}


def remote_layer_config(
    sd: SnapshotDir, parent: SnapshotDir | None, blob_url: str, digest: str, size: int
) -> dict[str, Any]:
    lowers = parent_lowers(parent)
    lowers.append({"digest": digest, "size": size, "dir": sd.block})
    if len(lowers) > 255:
        raise InvalidArgument(f"layer chain of {len(lowers)} overlaybd layers exceeds 255: invalid argument")
    return {"repoBlobUrl": blob_url, "lowers": lowers, "resultFile": sd.result_file}


def acceleration_layer_config(
    sd: SnapshotDir, parent: SnapshotDir | None, blob_url: str, digest: str, size: int
) -> dict[str, Any]:
    """The image's trace layer: the parent's lowers plus this layer (dir holds `trace`), flagged so the image
    service drops it from the disk and replays `<dir>/trace` (spec format.md §8)."""
    cfg = remote_layer_config(sd, parent, blob_url, digest, size)
    cfg["accelerationLayer"] = True
    return cfg


def writable_config(sd: SnapshotDir, parent: SnapshotDir | None) -> dict[str, Any]:
    lowers = parent_lowers(parent)
    base = read_config(parent.config) if parent is not None else {}
    return {
        "repoBlobUrl": base.get("repoBlobUrl", ""),
        "lowers": lowers,
        "upper": {"index": sd.writable_index, "data": sd.writable_data},
        "resultFile": sd.result_file,
    }
