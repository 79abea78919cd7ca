"""update_engine payloads ("CrAU" v1) for sysext images: write them as Flatcar's build does, verify and
extract them as Flatcar's machines do (ue-rs `download_sysext`).

Why here: Flatcar delivers official sysexts such as `flatcar-overlaybd` as signed update payloads
(`flatcar-overlaybd.gz`), fetched by the initrd and by the update postinstall for the exact OS version.
The build makes them (`build.sh --payload-key`), the test tier and `overlaybd-download-sysext` read them.

Layout (all integers big-endian)::

    "CrAU" | u64 version = 1 | u64 manifest_size | DeltaArchiveManifest (protobuf)
    | data blobs (one per operation, in order) | Signatures (protobuf)

The signature is RSASSA-PKCS1-v1_5 with SHA-256 over every byte before the Signatures blob; the
manifest records the blob's offset (relative to the end of the manifest) and size, so it is signed too.
"""

from __future__ import annotations

from .errors import (
    BadMagic,
    BadSignature,
    HashMismatch,
    KeyProblem,
    MalformedPayload,
    PayloadError,
    TruncatedPayload,
    UnsupportedPayload,
    WrongKey,
)
from .reader import PayloadInfo, open_payload, verify_and_extract
from .writer import WriteResult, generate_key_pem, public_key_pem, write_payload

__all__ = [
    "BadMagic",
    "BadSignature",
    "HashMismatch",
    "KeyProblem",
    "MalformedPayload",
    "PayloadError",
    "PayloadInfo",
    "TruncatedPayload",
    "UnsupportedPayload",
    "WriteResult",
    "WrongKey",
    "generate_key_pem",
    "open_payload",
    "public_key_pem",
    "verify_and_extract",
    "write_payload",
]
