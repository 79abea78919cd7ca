"""Where a snapshot's files live under the root (upstream's on-disk layout, spec flatcar.md §7.4).

`snapshots/<id>/{fs/, work/, block/{config.v1.json, init-debug.log, mountpoint/, writable_data,
writable_index, backstore_mark}}`. One place for the names so reconcile, Remove and the
device code agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SnapshotDir:
    root: str
    id: int

    @property
    def path(self) -> str:
        return os.path.join(self.root, "snapshots", str(self.id))

    @property
    def fs(self) -> str:
        return os.path.join(self.path, "fs")

    @property
    def work(self) -> str:
        return os.path.join(self.path, "work")

    @property
    def block(self) -> str:
        return os.path.join(self.path, "block")

    @property
    def config(self) -> str:
        return os.path.join(self.block, "config.v1.json")

    @property
    def result_file(self) -> str:
        return os.path.join(self.block, "init-debug.log")

    @property
    def mountpoint(self) -> str:
        return os.path.join(self.block, "mountpoint")

    @property
    def backstore_mark(self) -> str:
        return os.path.join(self.block, "backstore_mark")

    @property
    def writable_data(self) -> str:
        return os.path.join(self.block, "writable_data")

    @property
    def writable_index(self) -> str:
        return os.path.join(self.block, "writable_index")

    @property
    def sealed(self) -> str:
        return os.path.join(self.fs, "overlaybd.sealed")

    @property
    def commit_file(self) -> str:
        return os.path.join(self.fs, "overlaybd.commit")

    @property
    def image_ref(self) -> str:
        return os.path.join(self.path, "image_ref")

    def is_block(self) -> bool:
        """An overlaybd snapshot (remote layer, local layer or writable device) has a device config."""
        return os.path.exists(self.config)


def snapshots_dir(root: str) -> str:
    return os.path.join(root, "snapshots")
