"""Mount descriptions returned to containerd, built like containerd's overlay snapshotter does.

Why a module: the rules (bind for no parent, ro rbind for a one-parent view, overlay with
lowerdir nearest-first otherwise, `index=off` when the kernel has the knob) are what makes
ordinary images behave exactly as under containerd's own `overlayfs` snapshotter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

OVERLAY_INDEX_PARAM = "/sys/module/overlay/parameters/index"


@dataclass
class Mount:
    type: str
    source: str
    options: list[str] = field(default_factory=list)


def overlay_index_off() -> list[str]:
    """containerd adds index=off when the overlay module has the `index` feature."""
    return ["index=off"] if os.path.exists(OVERLAY_INDEX_PARAM) else []


def bind(path: str, readonly: bool) -> Mount:
    return Mount("bind", path, ["ro" if readonly else "rw", "rbind"])


def overlay_mounts(upper: str, work: str, lowers: list[str], view: bool) -> list[Mount]:
    """Mounts for an active (`view=False`) or view snapshot; `lowers` nearest parent first."""
    if not lowers:
        return [bind(upper, readonly=view)]
    if view:
        if len(lowers) == 1:
            return [bind(lowers[0], readonly=True)]
        return [Mount("overlay", "overlay", [*overlay_index_off(), "lowerdir=" + ":".join(lowers)])]
    options = [*overlay_index_off(), f"workdir={work}", f"upperdir={upper}", "lowerdir=" + ":".join(lowers)]
    return [Mount("overlay", "overlay", options)]
