"""OCI image -> overlaybd image, the way upstream's convertor/overlaybd-apply builds layers.

Per source layer: a writable overlaybd layer is stacked on the already converted layers, exposed
as a block device through the FUSE frontend (+ losetup), formatted (first layer only), mounted,
and the OCI tar is applied with whiteouts. After unmount the writable layer is committed
(`overlaybd-commit -z -t`): the result is a tar-wrapped ZFile, the layer blob, whose digest is
also its diffID. Manifest annotations follow spec format.md §2.7 / flatcar.md §8.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..host.command import HostError
from ..host.mkfs import mkfs
from ..host.mount import mount, umount, umount_all_under
from ..oci.annotations import layer_annotations
from ..oci.layout import Layout
from ..oci.mediatypes import (
    MT_DOCKER_CONFIG,
    MT_DOCKER_LAYER,
    MT_DOCKER_MANIFEST,
    MT_OCI_CONFIG,
    MT_OCI_LAYER,
    MT_OCI_MANIFEST,
)
from .extract import apply_layer

log = logging.getLogger(__name__)


class ConvertError(RuntimeError):
    """Conversion failed; the message names the layer (index and digest) and the step."""


@dataclass
class Options:
    vsize_gb: int = 64
    fstype: str = "ext4"
    algorithm: str = "lz4"
    block_kib: int = 4
    oci: bool = True  # OCI manifest/media types (convertor --oci); False: Docker v2


@contextlib.contextmanager
def writable_device(config: str, work: str) -> Iterator[str]:
    """`config` served in this process through FUSE + a loop device; always torn down, flushed after success."""
    from ..fuse.file_device import FileDevice
    from ..image import open_image

    try:
        image = open_image(config)
    except Exception as e:
        raise ConvertError(f"{config}: cannot attach a device: {e}") from e
    try:
        dev = FileDevice(image, os.path.join(work, "run", f"conv-{uuid.uuid4().hex[:8]}.img"))
        try:
            path = dev.start()
        except Exception as e:
            raise ConvertError(f"{config}: cannot attach a device: {e}") from e
        try:
            yield path
        finally:
            dev.stop()
        image.fsync()  # the layer is committed next: its writes must be on disk
    finally:
        image.close()


def build_layer(index: int, layer_stream: Any, layer_name: str, lowers: list[str], work: str, opts: Options) -> str:
    """Apply one OCI layer onto a new writable overlaybd layer over `lowers`; returns the committed blob path."""
    from ..format import lsmt
    from ..format.commit import commit_layer
    from ..format.errors import FormatError
    from ..format.output import OutputOptions

    d = os.path.join(work, f"layer{index}")
    os.makedirs(d)
    data, idx = os.path.join(d, "writable_data"), os.path.join(d, "writable_index")
    lsmt.create_rw(data, idx, opts.vsize_gb << 30).close()
    config = os.path.join(d, "config.v1.json")
    cfg = {
        "lowers": [{"file": p} for p in lowers],
        "upper": {"index": idx, "data": data},
        "resultFile": os.path.join(d, "init-debug.log"),
    }
    with open(config, "w") as f:
        json.dump(cfg, f)
    with writable_device(config, work) as dev:
        if index == 0:
            try:
                mkfs(dev, opts.fstype)
            except HostError as e:
                raise ConvertError(f"layer {index}: {e}") from e
        mnt = os.path.join(d, "mnt")
        try:
            mount(dev, mnt, opts.fstype)
        except HostError as e:
            raise ConvertError(f"layer {index}: {e}") from e
        try:
            n = apply_layer(layer_stream, mnt, layer_name)
            log.info("layer %d (%s): %d entries applied", index, layer_name, n)
        finally:
            umount(mnt)
    out = os.path.join(d, "overlaybd.commit")
    blob = OutputOptions(zfile=True, tar=True, algorithm=opts.algorithm, block_size=opts.block_kib * 1024)
    try:  # as `overlaybd-commit -z -t`: a tar-wrapped ZFile, the layer blob
        commit_layer(data, idx, out, blob)
    except FormatError as e:
        raise ConvertError(f"layer {index} ({layer_name}): commit failed: {e}") from e
    os.unlink(data)
    os.unlink(idx)
    return out


def convert_layout(
    src: Layout,
    dst: Layout,
    dst_name: str,
    *,
    src_name: str | None = None,
    opts: Options | None = None,
    work_dir: str | None = None,
) -> str:
    """Convert the image `src_name` of `src` into `dst` tagged `dst_name`; returns the manifest digest."""
    opts = opts or Options()
    image = src.source(src_name)
    dst.init()
    if work_dir:
        os.makedirs(work_dir, exist_ok=True)  # --work-dir names where scratch goes; it need not exist yet
    work = tempfile.mkdtemp(prefix="obdconv-", dir=work_dir)
    try:
        lowers: list[str] = []
        layers: list[dict[str, Any]] = []
        for i, desc in enumerate(image.manifest.get("layers", [])):
            name = f"layer {i} ({desc.get('digest')})"
            with src.open_layer(desc) as stream:
                committed = build_layer(i, stream, name, lowers, work, opts)
            digest, size = dst.put_file(committed)
            kept = os.path.join(work, f"committed{i}")
            shutil.copyfile(dst.blob_path(digest), kept)  # next layers read it as a lower
            lowers.append(kept)
            layers.append(
                {
                    "mediaType": MT_OCI_LAYER if opts.oci else MT_DOCKER_LAYER,
                    "digest": digest,
                    "size": size,
                    "annotations": layer_annotations(digest, size, opts.fstype),
                }
            )
        config = dict(image.config)
        config["rootfs"] = {"type": "layers", "diff_ids": [ly["digest"] for ly in layers]}
        config.pop("history", None)  # history entries would no longer line up with the layers
        cdigest, csize = dst.put_bytes(json.dumps(config).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST if opts.oci else MT_DOCKER_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG if opts.oci else MT_DOCKER_CONFIG, "digest": cdigest, "size": csize},
            "layers": layers,
        }
        mdigest, msize = dst.put_bytes(json.dumps(manifest).encode())
        dst.tag(dst_name, mdigest, msize, manifest["mediaType"])
        return mdigest
    finally:
        umount_all_under(work, lazy=True)
        shutil.rmtree(work, ignore_errors=True)
