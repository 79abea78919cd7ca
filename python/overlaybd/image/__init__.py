"""Opening a device config (config.v1.json) into a readable/writable block image.

Knows nothing of SCSI or FUSE; the frontends only see the `BlockImage` contract (`frontend.py`).
"""

from .frontend import BlockImage, ImageOpener, default_opener
from .image import Image, ImageOpenError, close_all, effective_lowers, open_image, open_lowers, write_result_file
from .layers import DIR_CANDIDATES, LayerOpenError, blob_url, find_local, local_candidates

__all__ = [
    "BlockImage",
    "DIR_CANDIDATES",
    "Image",
    "ImageOpenError",
    "ImageOpener",
    "LayerOpenError",
    "blob_url",
    "close_all",
    "default_opener",
    "effective_lowers",
    "find_local",
    "local_candidates",
    "open_image",
    "open_lowers",
    "write_result_file",
]
