"""Write a signed full-image payload the way Flatcar's `delta_generator -new_image IMG -private_key KEY`
does: the image cut into 1 MiB chunks, each stored bzip2-compressed (REPLACE_BZ) when that is
smaller and raw (REPLACE) otherwise, with the sha256 of every stored blob, the new image's size and
sha256, and one RSA-2048/SHA-256 signature.

Reproducible: bzip2 at a fixed level and PKCS#1 v1.5 signatures are deterministic and protobuf
serialises known fields in field-number order, so the same image and key give the same bytes.
"""

from __future__ import annotations

import bz2
import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from ..format.atomic import AtomicOutput
from . import update_metadata_pb2 as pb
from .errors import KeyProblem
from .layout import (
    BLOCK_SIZE,
    CHUNK_SIZE,
    HEADER,
    MAGIC,
    MAJOR_VERSION,
    MIN_RSA_BITS,
    SIGNATURE_VERSION,
    SPARSE_HOLE,
    load_private_key,
    public_pem,
)

BZIP2_LEVEL = 9  # libbz2's default block size (900k), as update_engine's BzipCompress uses


@dataclass(frozen=True)
class WriteResult:
    """What was written: for the build log and the published listings."""

    path: Path
    size: int
    sha256: str
    image_size: int
    image_sha256: str
    replace: int
    replace_bz: int


def _compress(chunk: bytes) -> tuple[pb.InstallOperation.Type, bytes]:
    packed = bz2.compress(chunk, BZIP2_LEVEL)
    if len(packed) < len(chunk):
        return pb.InstallOperation.REPLACE_BZ, packed
    return pb.InstallOperation.REPLACE, chunk


def _chunks(path: Path, size: int, chunk_size: int):  # type: ignore[no-untyped-def]
    with open(path, "rb") as f:
        for offset in range(0, size, chunk_size):
            data = f.read(chunk_size)
            if len(data) != min(chunk_size, size - offset):
                raise OSError(f"{path}: changed while being read")
            yield data


def _signatures_blob(signature: bytes) -> bytes:
    msg = pb.Signatures()
    sig = msg.signatures.add()
    sig.version = SIGNATURE_VERSION
    sig.data = signature
    return msg.SerializeToString()


def write_payload(
    image: str | os.PathLike[str],
    out: str | os.PathLike[str],
    private_key: str | os.PathLike[str],
    *,
    threads: int | None = None,
) -> WriteResult:
    """Make the signed payload for `image` at `out` (atomically). The image size must be a multiple of
    4096, as delta_generator requires (erofs and squashfs images are)."""
    image, out = Path(image), Path(out)
    key = load_private_key(private_key)
    size = image.stat().st_size
    if size == 0 or size % BLOCK_SIZE:
        raise ValueError(f"{image}: size {size} is not a non-zero multiple of {BLOCK_SIZE} (update payload blocks)")
    if size > 0xFFFFFFFF:
        raise ValueError(f"{image}: {size} bytes; payload data offsets are 32-bit")
    key_bytes = (key.key_size + 7) // 8

    manifest = pb.DeltaArchiveManifest()
    manifest.block_size = BLOCK_SIZE
    counts = {pb.InstallOperation.REPLACE: 0, pb.InstallOperation.REPLACE_BZ: 0}
    image_hash = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    # bzip2 releases the GIL: compress chunks in parallel, consume them in order.
    workers = threads or min(4, os.cpu_count() or 1)
    with tempfile.TemporaryFile(dir=out.parent) as blobs, ThreadPoolExecutor(workers) as pool:
        offset = 0
        chunks = _chunks(image, size, CHUNK_SIZE)
        for index, (kind, data) in enumerate(pool.map(_compress, _tee_hash(chunks, image_hash))):
            op = manifest.partition_operations.add()
            op.type = kind
            op.data_offset = offset
            op.data_length = len(data)
            ext = op.dst_extents.add()
            ext.start_block = index * CHUNK_SIZE // BLOCK_SIZE
            ext.num_blocks = min(CHUNK_SIZE, size - index * CHUNK_SIZE) // BLOCK_SIZE
            op.data_sha256_hash = hashlib.sha256(data).digest()
            blobs.write(data)
            offset += len(data)
            counts[kind] += 1
        # The signature blob's place and size are part of the signed manifest: its size is known
        # up front (a PKCS#1 v1.5 signature is exactly as long as the modulus).
        sig_size = len(_signatures_blob(b"\0" * key_bytes))
        manifest.signatures_offset = offset
        manifest.signatures_size = sig_size
        noop = manifest.noop_operations.add()
        noop.type = pb.InstallOperation.REPLACE
        noop.data_offset = offset
        noop.data_length = sig_size
        hole = noop.dst_extents.add()
        hole.start_block = SPARSE_HOLE
        hole.num_blocks = (sig_size + BLOCK_SIZE - 1) // BLOCK_SIZE
        manifest.new_partition_info.size = size
        manifest.new_partition_info.hash = image_hash.digest()
        manifest_bytes = manifest.SerializeToString(deterministic=True)

        signed = hashlib.sha256()
        with AtomicOutput(out, mode=0o644) as f:
            head = HEADER.pack(MAGIC, MAJOR_VERSION, len(manifest_bytes)) + manifest_bytes
            f.write(head)
            signed.update(head)
            blobs.seek(0)
            while buf := blobs.read(1 << 20):
                f.write(buf)
                signed.update(buf)
            digest = signed.digest()
            signature = key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
            sig_blob = _signatures_blob(signature)
            assert len(sig_blob) == sig_size, "signature blob size changed"
            f.write(sig_blob)
            total = f.tell()
    whole = hashlib.sha256()
    with open(out, "rb") as f:
        while buf := f.read(1 << 20):
            whole.update(buf)
    return WriteResult(
        path=out,
        size=total,
        sha256=whole.hexdigest(),
        image_size=size,
        image_sha256=image_hash.hexdigest(),
        replace=counts[pb.InstallOperation.REPLACE],
        replace_bz=counts[pb.InstallOperation.REPLACE_BZ],
    )


def _tee_hash(chunks, h):  # type: ignore[no-untyped-def]
    for chunk in chunks:
        h.update(chunk)
        yield chunk


def generate_key_pem(bits: int = 2048) -> bytes:
    """A new unencrypted RSA private key (PKCS#8 PEM): throwaway dev keys for `make` and tests."""
    if bits < MIN_RSA_BITS:
        raise KeyProblem(f"RSA key of {bits} bits, at least {MIN_RSA_BITS} needed")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(private_key: str | os.PathLike[str]) -> bytes:
    """The public half of a private key file, as "BEGIN PUBLIC KEY" PEM (what machines verify with)."""
    return public_pem(load_private_key(private_key))
