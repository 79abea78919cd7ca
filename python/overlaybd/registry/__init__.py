"""Registry access: OCI distribution client, auth, block cache, background download, metrics.

Entry points: `open_remote_blob` (a lower layer that lives in a registry, as a
RandomAccessFile), `RegistryClient` (manifests/blobs for the snapshotter) and
`parse_reference`. See docs/registry.md.
"""

from .client import Manifest, RegistryClient, RegistryError, client_for
from .image_ref import BlobLocation, ImageReference, ReferenceError, blob_url, parse_blob_url, parse_reference
from .remote_blob import RemoteBlobFile, open_remote_blob

__all__ = [
    "BlobLocation",
    "ImageReference",
    "Manifest",
    "ReferenceError",
    "RegistryClient",
    "RegistryError",
    "RemoteBlobFile",
    "blob_url",
    "client_for",
    "open_remote_blob",
    "parse_blob_url",
    "parse_reference",
]
