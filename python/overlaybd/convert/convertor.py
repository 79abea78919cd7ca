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
from ..host.progress import CountingReader, Progress
from ..oci.annotations import layer_annotations
from ..oci.identity import chain_id_uuid, chain_ids
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
    oci: bool = False  # OCI manifest/media types (convertor --oci); False: Docker v2, upstream convertor's default
    #: committed empty-ext4 layer (upstream's baselayers/ext4_64) stacked under layer 0 instead of mkfs, and
    #: shipped as the image's first layer (upstream convertor --mkfs=false)
    base_layer: str | None = None
    #: build layers in user space with e2fsprogs (convert/userspace.py); None: when not root
    userspace: bool | None = None


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


def build_layer(
    index: int,
    layer_stream: Any,
    layer_name: str,
    lowers: list[str],
    work: str,
    opts: Options,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Apply one OCI layer onto a new writable overlaybd layer over `lowers`; returns the committed blob path.

    `uuid`/`parent_uuid` go into the committed layer's header (upstream: from the source chain IDs).
    """
    from . import userspace

    d = os.path.join(work, f"layer{index}")
    os.makedirs(d)
    data, idx = os.path.join(d, "writable_data"), os.path.join(d, "writable_index")
    sc: userspace.Scratch | None = None
    if userspace.wanted(opts):  # no device, mount or root: e2fsprogs on a scratch image
        sc = userspace.fill_writable(index, layer_stream, layer_name, lowers, work, opts, data, idx)
    else:
        _fill_through_device(index, layer_stream, layer_name, lowers, work, opts, data, idx)
    out = commit_writable(
        d, data, idx, opts, f"layer {index} ({layer_name})", uuid=uuid, parent_uuid=parent_uuid, progress=progress
    )
    if sc is not None:
        sc.layers.append(userspace.fingerprint(out))  # the scratch now holds this chain: the next layer reuses it
    return out


def _fill_through_device(
    index: int, layer_stream: Any, layer_name: str, lowers: list[str], work: str, opts: Options, data: str, idx: str
) -> None:
    """Create the writable layer `data` + `idx` over `lowers` and apply the layer through a device and a
    mount (mkfs first for layer 0 without a base layer)."""
    from ..format import lsmt

    d = os.path.dirname(data)
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
        if index == 0 and not opts.base_layer:
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


def commit_writable(
    d: str,
    data: str,
    idx: str,
    opts: Any,
    what: str,
    *,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Commit the writable layer `data` + `idx` to `d`/overlaybd.commit as `overlaybd-commit -z -t` does (a
    tar-wrapped ZFile, the layer blob), then remove the writable files; returns the blob path."""
    from ..format.commit import commit_layer
    from ..format.errors import FormatError
    from ..format.output import OutputOptions

    out = os.path.join(d, "overlaybd.commit")
    blob = OutputOptions(zfile=True, tar=True, algorithm=opts.algorithm, block_size=opts.block_kib * 1024)
    if progress is not None:
        st = os.stat(data)
        progress.step("commit", min(st.st_size, st.st_blocks * 512))
    try:
        report = progress.advance if progress is not None and progress.enabled else None
        commit_layer(data, idx, out, blob, uuid=uuid, parent_uuid=parent_uuid, progress=report)
    except FormatError as e:
        raise ConvertError(f"{what}: commit failed: {e}") from e
    os.unlink(data)
    os.unlink(idx)
    return out


#: the history entry of the base layer an image converted without mkfs starts with
BASE_LAYER_HISTORY = {"created_by": "overlaybd base layer (empty ext4)", "comment": "overlaybd baselayers/ext4_64"}


def _base_layer_descriptor(dst: Layout, opts: Options, work: str) -> dict[str, Any]:
    """Put the base layer into `dst` as a layer blob (tar-wrapped, like every other layer) and describe it."""
    from ..format.output import LayerOutput, OutputOptions

    assert opts.base_layer
    out = os.path.join(work, "baselayer.commit")
    try:
        with open(opts.base_layer, "rb") as f, LayerOutput(out, OutputOptions(tar=True)) as sink:
            while chunk := f.read(1 << 20):
                sink.write(chunk)
    except OSError as e:
        raise ConvertError(f"base layer {opts.base_layer}: {e.strerror or e}") from e
    digest, size = dst.put_file(out)
    return {
        "mediaType": MT_OCI_LAYER if opts.oci else MT_DOCKER_LAYER,
        "digest": digest,
        "size": size,
        "annotations": layer_annotations(digest, size, opts.fstype),
    }


def convert_layout(
    src: Layout,
    dst: Layout,
    dst_name: str,
    *,
    src_name: str | None = None,
    opts: Options | None = None,
    work_dir: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Convert the image `src_name` of `src` into `dst` tagged `dst_name`; returns the manifest digest.

    Layer i's LSMT UUID is taken from the source chain ID of layers 0..i and its parent UUID from that of
    layer i-1 (as upstream), the config keeps its `history`, and `progress` shows layer i of n on a terminal.
    """
    opts = opts or Options()
    progress = progress or Progress("convert", enabled=False)
    image = src.source(src_name)
    descs = image.manifest.get("layers", [])
    diff_ids = (image.config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(descs):
        raise ConvertError(
            f"{src.path}: config rootfs.diff_ids lists {len(diff_ids)} layers but the manifest has {len(descs)}"
        )
    try:
        uuids = [chain_id_uuid(c) for c in chain_ids(diff_ids)]
    except ValueError as e:
        raise ConvertError(f"{src.path}: config rootfs.diff_ids: {e}") from e
    dst.init()
    if work_dir:
        os.makedirs(work_dir, exist_ok=True)  # --work-dir names where scratch goes; it need not exist yet
    work = tempfile.mkdtemp(prefix="obdconv-", dir=work_dir)
    try:
        lowers: list[str] = [opts.base_layer] if opts.base_layer else []
        layers: list[dict[str, Any]] = []
        for i, desc in enumerate(descs):
            name = f"layer {i} ({desc.get('digest')})"
            progress.stage(f"layer {i + 1} of {len(descs)}")
            progress.step("apply")
            with src.open_layer(desc) as stream:
                committed = build_layer(
                    i,
                    CountingReader(stream, progress) if progress.enabled else stream,
                    name,
                    lowers,
                    work,
                    opts,
                    uuid=uuids[i],
                    parent_uuid=uuids[i - 1] if i else None,
                    progress=progress,
                )
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
        if opts.base_layer:
            layers.insert(0, _base_layer_descriptor(dst, opts, work))
        progress.close()
        config = dict(image.config)
        config["rootfs"] = {"type": "layers", "diff_ids": [ly["digest"] for ly in layers]}
        if opts.base_layer and isinstance(config.get("history"), list):
            # every converted layer is its source layer's history entry; the base layer gets its own, first
            config["history"] = [BASE_LAYER_HISTORY, *config["history"]]
        cdigest, csize = dst.put_bytes(json.dumps(config).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST if opts.oci else MT_DOCKER_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG if opts.oci else MT_DOCKER_CONFIG, "digest": cdigest, "size": csize},
            "layers": layers,
        }
        mdigest, msize = dst.put_bytes(json.dumps(manifest).encode())
        dst.tag(dst_name, mdigest, msize, MT_OCI_MANIFEST if opts.oci else MT_DOCKER_MANIFEST)
        return mdigest
    finally:
        progress.close()
        umount_all_under(work, lazy=True)
        shutil.rmtree(work, ignore_errors=True)
