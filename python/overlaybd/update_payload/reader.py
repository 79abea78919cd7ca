"""Verify a payload and extract its image, as ue-rs `download_sysext` does on a Flatcar machine.

Order matters: the signature is checked over the whole signed range *before* any operation is
applied, so nothing from an unverified payload reaches the output. Then every operation's blob is
checked against its signed sha256, written at its block, and the result is checked against the
signed image size and sha256. Operation types are those ue-rs applies (REPLACE, REPLACE_BZ) with one
destination extent each; anything else is refused rather than guessed at.
"""

from __future__ import annotations

import bz2
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf.message import DecodeError

from . import update_metadata_pb2 as pb
from .errors import (
    BadMagic,
    BadSignature,
    HashMismatch,
    MalformedPayload,
    TruncatedPayload,
    UnsupportedPayload,
    WrongKey,
)
from .layout import (
    HEADER,
    MAGIC,
    MAJOR_VERSION,
    MAX_MANIFEST,
    MAX_OP_DATA,
    MAX_SIGNATURES,
    SPARSE_HOLE,
    load_public_key,
)

OP_NAMES = {v: k for k, v in pb.InstallOperation.Type.items()}


@dataclass(frozen=True)
class PayloadInfo:
    """The parsed, not yet verified, payload: where its parts are."""

    name: str
    file_size: int
    manifest: pb.DeltaArchiveManifest
    metadata_size: int  # header + manifest: blob offsets count from here

    @property
    def signed_size(self) -> int:
        return self.metadata_size + self.manifest.signatures_offset

    @property
    def image_size(self) -> int:
        return self.manifest.new_partition_info.size

    @property
    def image_sha256(self) -> str:
        return self.manifest.new_partition_info.hash.hex()


def _pread(f: BinaryIO, offset: int, length: int, name: str, what: str) -> bytes:
    data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise TruncatedPayload(
            f"{name}: truncated: {what} needs bytes {offset}..{offset + length}, file ends at {offset + len(data)}"
        )
    return data


def open_payload(f: BinaryIO, name: str) -> PayloadInfo:
    """Parse header and manifest and check that every part the manifest names lies inside the file."""
    size = os.fstat(f.fileno()).st_size
    if size < 4:
        raise TruncatedPayload(f"{name}: truncated: {size} bytes, shorter than the payload header")
    head = os.pread(f.fileno(), HEADER.size, 0)
    if head[:4] != MAGIC:
        raise BadMagic(f"{name}: bad magic {head[:4]!r}: not an update payload (expected {MAGIC!r})")
    if len(head) < HEADER.size:
        raise TruncatedPayload(f"{name}: truncated: {size} bytes, shorter than the {HEADER.size}-byte payload header")
    _, version, manifest_size = HEADER.unpack(head)
    if version != MAJOR_VERSION:
        raise UnsupportedPayload(f"{name}: payload major version {version}, only {MAJOR_VERSION} is supported")
    if manifest_size > MAX_MANIFEST:
        raise MalformedPayload(f"{name}: manifest size {manifest_size} exceeds {MAX_MANIFEST} bytes")
    raw = _pread(f, HEADER.size, manifest_size, name, "the manifest")
    manifest = pb.DeltaArchiveManifest()
    try:
        manifest.ParseFromString(raw)
    except DecodeError as e:
        raise MalformedPayload(f"{name}: manifest does not parse: {e}") from None
    info = PayloadInfo(name=name, file_size=size, manifest=manifest, metadata_size=HEADER.size + manifest_size)
    _check_manifest(info)
    return info


def _check_manifest(info: PayloadInfo) -> None:
    m, name = info.manifest, info.name
    if not (m.HasField("signatures_offset") and m.HasField("signatures_size")):
        raise MalformedPayload(f"{name}: unsigned payload (manifest has no signatures_offset/signatures_size)")
    if not 0 < m.signatures_size <= MAX_SIGNATURES:
        raise MalformedPayload(f"{name}: signatures_size {m.signatures_size} is out of range 1..{MAX_SIGNATURES}")
    if m.block_size <= 0 or m.block_size & (m.block_size - 1):
        raise MalformedPayload(f"{name}: block_size {m.block_size} is not a power of two")
    if not (m.HasField("new_partition_info") and m.new_partition_info.HasField("size")):
        raise MalformedPayload(f"{name}: manifest has no new_partition_info.size")
    if len(m.new_partition_info.hash) != 32:
        raise MalformedPayload(
            f"{name}: new_partition_info.hash is {len(m.new_partition_info.hash)} bytes, not a sha256"
        )
    if not m.partition_operations:
        raise MalformedPayload(f"{name}: manifest has no partition_operations")
    end = info.signed_size + m.signatures_size
    if info.file_size < end:
        raise TruncatedPayload(f"{name}: truncated: {info.file_size} bytes, the signature ends at byte {end}")
    if info.file_size > end:
        raise MalformedPayload(f"{name}: {info.file_size - end} bytes after the signature blob")
    for i, op in enumerate(m.partition_operations):
        field = f"partition_operations[{i}]"
        if not op.HasField("type"):
            raise MalformedPayload(f"{name}: {field}: no type")
        if op.type not in (pb.InstallOperation.REPLACE, pb.InstallOperation.REPLACE_BZ):
            raise UnsupportedPayload(
                f"{name}: {field}: operation {OP_NAMES.get(op.type, op.type)} (only full payloads: REPLACE, REPLACE_BZ)"
            )
        if not (op.HasField("data_offset") and op.HasField("data_length")) or op.data_length == 0:
            raise MalformedPayload(f"{name}: {field}: no data")
        if op.data_length > MAX_OP_DATA:
            raise MalformedPayload(f"{name}: {field}: data_length {op.data_length} exceeds {MAX_OP_DATA}")
        if op.data_offset + op.data_length > m.signatures_offset:
            raise MalformedPayload(
                f"{name}: {field}: data {op.data_offset}+{op.data_length} "
                f"overlaps the signature at {m.signatures_offset}"
            )
        if len(op.dst_extents) != 1:
            raise UnsupportedPayload(f"{name}: {field}: {len(op.dst_extents)} destination extents, only 1 is handled")
        ext = op.dst_extents[0]
        if ext.start_block == SPARSE_HOLE or ext.num_blocks == 0:
            raise MalformedPayload(f"{name}: {field}: destination is a sparse hole or empty")
        if ext.start_block * m.block_size >= info.image_size:
            raise MalformedPayload(f"{name}: {field}: destination block {ext.start_block} is past the image size")
        if len(op.data_sha256_hash) != 32:
            raise MalformedPayload(f"{name}: {field}: no data_sha256_hash")


def _hash_range(f: BinaryIO, length: int) -> bytes:
    h = hashlib.sha256()
    offset = 0
    while offset < length:
        buf = os.pread(f.fileno(), min(1 << 20, length - offset), offset)
        if not buf:
            raise OSError("file shrank while being read")
        h.update(buf)
        offset += len(buf)
    return h.digest()


def verify_signature(f: BinaryIO, info: PayloadInfo, key: rsa.RSAPublicKey, key_name: str) -> None:
    """Check the Signatures blob against sha256(payload up to the blob), as update_engine does: the
    digest recovered with the key must equal the computed one. A signature that does not decode with
    the key was made with another key; one that decodes to another digest covers other bytes."""
    m, name = info.manifest, info.name
    blob = _pread(f, info.signed_size, m.signatures_size, name, "the signature blob")
    sigs = pb.Signatures()
    try:
        sigs.ParseFromString(blob)
    except DecodeError as e:
        raise MalformedPayload(f"{name}: signature blob does not parse: {e}") from None
    if not sigs.signatures:
        raise MalformedPayload(f"{name}: signature blob holds no signature")
    digest = _hash_range(f, info.signed_size)
    key_bytes = (key.key_size + 7) // 8
    other_digest: bytes | None = None
    for sig in sigs.signatures:
        if len(sig.data) != key_bytes:
            continue
        try:
            recovered = key.recover_data_from_signature(sig.data, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        if hmac.compare_digest(recovered, digest):
            return
        other_digest = recovered
    if other_digest is not None:
        raise BadSignature(
            f"{name}: bad signature: signed sha256 {other_digest.hex()} but the payload hashes to {digest.hex()} "
            "(modified after signing)"
        )
    sizes = ", ".join(str(len(s.data) * 8) for s in sigs.signatures)
    raise WrongKey(
        f"{name}: signature does not verify with {key_name}: signed with another key, or the signature is corrupt "
        f"(signature bits {sizes}, key bits {key.key_size})"
    )


def extract(f: BinaryIO, info: PayloadInfo, out: BinaryIO) -> None:
    """Apply every operation to `out` (a seekable file) and check the result against the manifest."""
    m, name = info.manifest, info.name
    bs = m.block_size
    for i, op in enumerate(m.partition_operations):
        field = f"partition_operations[{i}]"
        data = _pread(f, info.metadata_size + op.data_offset, op.data_length, name, field)
        if not hmac.compare_digest(hashlib.sha256(data).digest(), op.data_sha256_hash):
            raise HashMismatch(
                f"{name}: {field}: data sha256 {hashlib.sha256(data).hexdigest()} != {op.data_sha256_hash.hex()}"
            )
        ext = op.dst_extents[0]
        room = ext.num_blocks * bs
        if op.type == pb.InstallOperation.REPLACE_BZ:
            dec = bz2.BZ2Decompressor()
            try:
                data = dec.decompress(data, max_length=room + 1)
            except (OSError, ValueError) as e:
                raise MalformedPayload(f"{name}: {field}: bzip2 data does not decompress: {e}") from None
            if not dec.eof:
                raise MalformedPayload(f"{name}: {field}: bzip2 data is incomplete or larger than {room} bytes")
        if len(data) > room:
            raise MalformedPayload(f"{name}: {field}: {len(data)} bytes do not fit {ext.num_blocks} blocks")
        start = ext.start_block * bs
        if start + len(data) > info.image_size:
            raise MalformedPayload(f"{name}: {field}: writes past the image size {info.image_size}")
        out.seek(start)
        out.write(data)
    out.truncate(info.image_size)
    out.flush()
    h = hashlib.sha256()
    out.seek(0)
    while buf := out.read(1 << 20):
        h.update(buf)
    if out.tell() != info.image_size:
        raise HashMismatch(f"{name}: extracted {out.tell()} bytes, the manifest signs {info.image_size}")
    if not hmac.compare_digest(h.digest(), m.new_partition_info.hash):
        raise HashMismatch(f"{name}: extracted image sha256 {h.hexdigest()} != signed {info.image_sha256}")


def verify_and_extract(
    payload: str | os.PathLike[str], public_key: str | os.PathLike[str], out: BinaryIO, name: str | None = None
) -> PayloadInfo:
    """Verify `payload` with the RSA public key file and write the image into `out` (w+b, seekable).
    Errors name the payload as `name` (e.g. the URL it came from), else by its path."""
    key = load_public_key(public_key)
    name = name or os.fspath(payload)
    with open(payload, "rb") as f:
        info = open_payload(f, name)
        verify_signature(f, info, key, os.fspath(public_key))
        extract(f, info, out)
    return info
