"""The prebuilt empty-ext4 base layer upstream ships as `baselayers/ext4_64` (a 64 GiB disk).

Why: upstream's convertor with `--mkfs=false` stacks every image on one shared base layer instead of
formatting each image's bottom layer, and Flatcar's image ships it at
/usr/local/overlaybd/baselayers/ext4_64. Built at image build time without ever writing 64 GiB: a sparse
writable layer is served as a block device (FUSE + loop), formatted with the project's mkfs options
(fixed UUID and hash seed; timestamps from E2FSPROGS_FAKE_TIME for a reproducible build), and
committed as a ZFile-compressed layer.
"""

from __future__ import annotations

import os
import shutil
import tempfile

#: fixed identity of the base layer: file system UUID and directory hash seed
BASE_FS_UUID = "6f766572-6c61-7962-642d-657874345f36"
BASE_VSIZE = 64 << 30


def build_base_layer(out: str, vsize: int = BASE_VSIZE, fs_uuid: str = BASE_FS_UUID) -> None:
    """Write the committed base layer to `out` (replacing it). Needs root, /dev/fuse and loop devices."""
    from ..format import lsmt
    from ..format.commit import commit_layer
    from ..format.output import OutputOptions
    from ..fuse.file_device import FileDevice
    from ..host.mkfs import mkfs

    work = tempfile.mkdtemp(prefix="obd-baselayer-")
    try:
        data, index = os.path.join(work, "data"), os.path.join(work, "index")
        layer = lsmt.create_rw(data, index, vsize, uuid=fs_uuid.upper(), sparse=True)
        stack = lsmt.Stack([], upper=layer)
        try:
            dev = FileDevice(stack, os.path.join(work, "base.img"), read_only=False, threads=1)
            device = dev.start()
            try:
                mkfs(device, "ext4", uuid=fs_uuid)
            finally:
                dev.stop()
            stack.fsync()
        finally:
            stack.close()
        commit_layer(data, index, out, OutputOptions(zfile=True, replace=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
