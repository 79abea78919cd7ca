"""Constants of the payload format and the RSA key handling both sides share.

Values are those of Flatcar's update_engine/delta_generator (full payloads): 4 KiB blocks, 1 MiB
chunks, one signature numbered 2, a dummy "noop" REPLACE operation at a sparse hole covering the
signature blob. RSA work uses the `cryptography` package so the frozen sysext bundle needs no
`openssl` binary from the host.
"""

from __future__ import annotations

import os
import struct

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .errors import KeyProblem

MAGIC = b"CrAU"
MAJOR_VERSION = 1
HEADER = struct.Struct(">4sQQ")  # magic, major version, manifest size
BLOCK_SIZE = 4096
CHUNK_SIZE = 1 << 20
SPARSE_HOLE = (1 << 64) - 1
SIGNATURE_VERSION = 2  # update_engine numbers n signatures as 3-n .. 2; one key gives version 2
MIN_RSA_BITS = 2048
# Reader bounds: a manifest or one operation's data larger than this is refused before it is read.
MAX_MANIFEST = 16 << 20
MAX_OP_DATA = 64 << 20
MAX_SIGNATURES = 1 << 20


def _read_pem(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        raise KeyProblem(f"{os.fspath(path)}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise KeyProblem(f"{os.fspath(path)}: not a PEM file")
    return data


def load_private_key(path: str | os.PathLike[str]) -> rsa.RSAPrivateKey:
    """An unencrypted RSA private key (PKCS#1 or PKCS#8 PEM) of at least 2048 bits."""
    data = _read_pem(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyProblem(f"{os.fspath(path)}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyProblem(f"{os.fspath(path)}: {type(key).__name__} is not an RSA key (payloads are RSA-signed)")
    if key.key_size < MIN_RSA_BITS:
        raise KeyProblem(f"{os.fspath(path)}: RSA key of {key.key_size} bits, at least {MIN_RSA_BITS} needed")
    return key


def load_public_key(path: str | os.PathLike[str]) -> rsa.RSAPublicKey:
    """An RSA public key as PEM ("PUBLIC KEY" as ue-rs reads it, or PKCS#1 "RSA PUBLIC KEY")."""
    data = _read_pem(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyProblem(f"{os.fspath(path)}: not a PEM public key ({e})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyProblem(f"{os.fspath(path)}: {type(key).__name__} is not an RSA key (payloads are RSA-signed)")
    return key


def public_pem(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM ("BEGIN PUBLIC KEY"): the form of update-payload-key.pub.pem."""
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
