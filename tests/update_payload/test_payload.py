"""Update payloads: round trip, wire layout against update_engine's field numbers (decoded without our
.proto), signatures against the openssl CLI, reproducibility, and one distinct error per corruption."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, utils
from helpers.payload import Keys, flip
from overlaybd.update_payload import (
    BadMagic,
    BadSignature,
    HashMismatch,
    KeyProblem,
    MalformedPayload,
    PayloadError,
    TruncatedPayload,
    UnsupportedPayload,
    WrongKey,
    verify_and_extract,
    write_payload,
)
from overlaybd.update_payload import update_metadata_pb2 as pb
from overlaybd.update_payload.layout import load_private_key


def parts(data: bytes) -> tuple[int, pb.DeltaArchiveManifest, int]:
    """(manifest size, manifest, metadata size) of payload bytes."""
    assert data[:4] == b"CrAU"
    (msize,) = struct.unpack(">Q", data[12:20])
    m = pb.DeltaArchiveManifest()
    m.ParseFromString(data[20 : 20 + msize])
    return msize, m, 20 + msize


def extract(payload: Path, pub: Path, out: Path) -> bytes:
    with open(out, "w+b") as f:
        verify_and_extract(payload, pub, f)
    return out.read_bytes()


@pytest.fixture()
def payload(tmp_path: Path, image: Path, keys: Keys) -> Path:
    out = tmp_path / "flatcar_test_update-flatcar-overlaybd.gz"
    write_payload(image, out, keys.private)
    return out


def test_round_trip(tmp_path: Path, image: Path, keys: Keys) -> None:
    res = write_payload(image, tmp_path / "p.gz", keys.private)
    assert res.image_size == image.stat().st_size
    assert res.image_sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    assert res.replace == 1 and res.replace_bz == 2  # the random chunk stays raw
    assert res.sha256 == hashlib.sha256((tmp_path / "p.gz").read_bytes()).hexdigest()
    assert extract(tmp_path / "p.gz", keys.public, tmp_path / "out.raw") == image.read_bytes()


def test_reproducible(tmp_path: Path, image: Path, keys: Keys) -> None:
    a = write_payload(image, tmp_path / "a" / "p.gz", keys.private, threads=1)
    b = write_payload(image, tmp_path / "b" / "other-name.gz", keys.private, threads=4)
    assert (tmp_path / "a/p.gz").read_bytes() == (tmp_path / "b/other-name.gz").read_bytes()
    assert a.sha256 == b.sha256


def test_wire_layout_is_update_engine_v1(payload: Path, image: Path) -> None:
    """Decode the manifest with `protoc --decode_raw` (no .proto: field numbers only) and check the numbers
    update_engine's DeltaArchiveManifest uses: ops=1, noop ops=2, block_size=3, signatures offset/size=4/5,
    new_partition_info=9 {size=1, hash=2}; InstallOperation type=1, data offset/length=2/3, dst_extents=6,
    data_sha256_hash=8."""
    data = payload.read_bytes()
    assert data[:4] == b"CrAU" and struct.unpack(">Q", data[4:12]) == (1,)
    msize, m, meta = parts(data)
    raw = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "--decode_raw"],
        input=data[20 : 20 + msize],
        capture_output=True,
        check=True,
    ).stdout.decode()
    size = image.stat().st_size
    assert "3: 4096\n" in raw
    assert f"4: {m.signatures_offset}\n5: {m.signatures_size}\n" in raw
    assert f"9 {{\n  1: {size}\n  2: " in raw
    assert raw.startswith("1 {\n  1: 0\n  2: 0\n  3: 1048576\n  6 {\n    1: 0\n    2: 256\n  }\n  8: ")
    assert "2 {\n  1: 0\n" in raw and "    1: 18446744073709551615\n" in raw  # noop op at the sparse hole
    # Blobs are contiguous, in order, and end where the signature starts; the payload ends with it.
    offset = 0
    for op in m.partition_operations:
        assert op.data_offset == offset
        offset += op.data_length
    assert m.signatures_offset == offset
    assert len(data) == meta + m.signatures_offset + m.signatures_size
    sigs = pb.Signatures()
    sigs.ParseFromString(data[meta + m.signatures_offset :])
    assert [s.version for s in sigs.signatures] == [2] and len(sigs.signatures[0].data) == 256


def test_signature_matches_openssl(tmp_path: Path, payload: Path, keys: Keys) -> None:
    """The signature is plain RSASSA-PKCS1-v1_5/SHA-256 over everything before the signature blob:
    `openssl dgst -verify` accepts it and `openssl dgst -sign` makes the same bytes."""
    data = payload.read_bytes()
    _, m, meta = parts(data)
    signed = tmp_path / "signed.bin"
    signed.write_bytes(data[: meta + m.signatures_offset])
    sigs = pb.Signatures()
    sigs.ParseFromString(data[meta + m.signatures_offset :])
    sig = tmp_path / "sig.bin"
    sig.write_bytes(sigs.signatures[0].data)
    res = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(keys.public), "-signature", str(sig), str(signed)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "Verified OK" in res.stdout, res.stdout + res.stderr
    ours = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(keys.private), str(signed)], capture_output=True, check=True
    ).stdout
    assert ours == sigs.signatures[0].data
    res = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(keys.other_public), "-signature", str(sig), str(signed)],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0


def resign(path: Path, key: Path, mutate: Callable[[pb.DeltaArchiveManifest, bytearray], None]) -> None:
    """Rewrite a payload with a changed manifest/blob area and a valid signature over the result: the
    content checks behind the signature must catch what the signature no longer does."""
    data = path.read_bytes()
    _, m, meta = parts(data)
    blobs = bytearray(data[meta : meta + m.signatures_offset])
    mutate(m, blobs)
    mbytes = m.SerializeToString()
    head = b"CrAU" + struct.pack(">QQ", 1, len(mbytes)) + mbytes + bytes(blobs)
    sig = load_private_key(key).sign(
        hashlib.sha256(head).digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
    )
    sigs = pb.Signatures()
    s = sigs.signatures.add()
    s.version, s.data = 2, sig
    blob = sigs.SerializeToString()
    assert len(blob) == m.signatures_size
    path.write_bytes(head + blob)


def _op_hash(m: pb.DeltaArchiveManifest, b: bytearray) -> None:
    m.partition_operations[1].data_sha256_hash = b"\x01" * 32


def _image_hash(m: pb.DeltaArchiveManifest, b: bytearray) -> None:
    m.new_partition_info.hash = b"\x02" * 32


def _bigger(m: pb.DeltaArchiveManifest, b: bytearray) -> None:
    m.new_partition_info.size += 4096


def _smaller(m: pb.DeltaArchiveManifest, b: bytearray) -> None:
    m.new_partition_info.size -= 8192


def _move(m: pb.DeltaArchiveManifest, b: bytearray) -> None:
    m.partition_operations[0].type = pb.InstallOperation.MOVE


def _two_extents(m: pb.DeltaArchiveManifest, b: bytearray) -> None:
    m.partition_operations[0].dst_extents.add(start_block=500, num_blocks=1)


def _unsigned(m: pb.DeltaArchiveManifest, b: bytearray) -> None:
    m.ClearField("signatures_offset")


def _bad_bzip2(m: pb.DeltaArchiveManifest, b: bytearray) -> None:
    op = m.partition_operations[1]
    assert op.type == pb.InstallOperation.REPLACE_BZ
    b[op.data_offset + 20] ^= 0xFF
    op.data_sha256_hash = hashlib.sha256(bytes(b[op.data_offset : op.data_offset + op.data_length])).digest()


def _overlap(m: pb.DeltaArchiveManifest, b: bytearray) -> None:
    m.partition_operations[-1].data_length += 10


@pytest.mark.parametrize(
    ("mutate", "error", "text"),
    [
        (_op_hash, HashMismatch, "partition_operations[1]: data sha256"),
        (_image_hash, HashMismatch, "extracted image sha256"),
        (_bigger, HashMismatch, "extracted image sha256"),
        (_smaller, MalformedPayload, "writes past the image size"),
        (_move, UnsupportedPayload, "operation MOVE"),
        (_two_extents, UnsupportedPayload, "2 destination extents"),
        (_unsigned, MalformedPayload, "unsigned payload"),
        (_bad_bzip2, MalformedPayload, "bzip2"),
        (_overlap, MalformedPayload, "overlaps the signature"),
    ],
)
def test_signed_but_wrong_content(
    tmp_path: Path, payload: Path, keys: Keys, mutate: Callable, error: type[PayloadError], text: str
) -> None:
    resign(payload, keys.private, mutate)
    with pytest.raises(error) as exc:
        extract(payload, keys.public, tmp_path / "out.raw")
    assert text in str(exc.value) and str(payload) in str(exc.value) and "\n" not in str(exc.value)


def test_bad_magic(tmp_path: Path, image: Path, keys: Keys) -> None:
    with pytest.raises(BadMagic, match=r"bad magic .*not an update payload"):
        extract(image, keys.public, tmp_path / "out.raw")  # a raw image instead of its payload
    html = tmp_path / "404.gz"
    html.write_bytes(b"<html>not found</html>")
    with pytest.raises(BadMagic):
        extract(html, keys.public, tmp_path / "out.raw")


def test_other_major_version(tmp_path: Path, payload: Path, keys: Keys) -> None:
    data = bytearray(payload.read_bytes())
    data[4:12] = struct.pack(">Q", 2)
    payload.write_bytes(bytes(data))
    with pytest.raises(UnsupportedPayload, match="major version 2"):
        extract(payload, keys.public, tmp_path / "out.raw")


@pytest.mark.parametrize("where", ["header", "manifest", "blobs", "signature", "empty"])
def test_truncated(tmp_path: Path, payload: Path, keys: Keys, where: str) -> None:
    data = payload.read_bytes()
    _, m, meta = parts(data)
    cut = {
        "header": 15,
        "manifest": meta - 5,
        "blobs": meta + m.signatures_offset // 2,
        "signature": len(data) - 1,
        "empty": 0,
    }[where]
    payload.write_bytes(data[:cut])
    with pytest.raises(TruncatedPayload, match="truncated"):
        extract(payload, keys.public, tmp_path / "out.raw")


def test_trailing_bytes(tmp_path: Path, payload: Path, keys: Keys) -> None:
    payload.write_bytes(payload.read_bytes() + b"x")
    with pytest.raises(MalformedPayload, match="1 bytes after the signature blob"):
        extract(payload, keys.public, tmp_path / "out.raw")


@pytest.mark.parametrize("part", ["manifest", "blob", "last blob byte"])
def test_modified_after_signing(tmp_path: Path, payload: Path, keys: Keys, part: str) -> None:
    data = payload.read_bytes()
    _, m, meta = parts(data)
    offset = {"manifest": 25, "blob": meta + 100, "last blob byte": meta + m.signatures_offset - 1}[part]
    if part == "manifest":
        # Change a hash byte inside the manifest (keeps it parseable).
        offset = data.index(m.new_partition_info.hash)
    flip(payload, offset)
    with pytest.raises(BadSignature, match="modified after signing"):
        extract(payload, keys.public, tmp_path / "out.raw")
    assert not (tmp_path / "out.raw").read_bytes(), "nothing is written before the signature verifies"


def test_wrong_key(tmp_path: Path, payload: Path, keys: Keys) -> None:
    with pytest.raises(WrongKey, match="does not verify with .*other.pub.pem"):
        extract(payload, keys.other_public, tmp_path / "out.raw")


def test_corrupt_signature(tmp_path: Path, payload: Path, keys: Keys) -> None:
    flip(payload, payload.stat().st_size - 10)
    with pytest.raises(WrongKey, match="corrupt"):
        extract(payload, keys.public, tmp_path / "out.raw")


def test_bad_keys(tmp_path: Path, payload: Path, image: Path, keys: Keys) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(KeyProblem, match="not a PEM file"):
        extract(payload, junk, tmp_path / "out.raw")
    with pytest.raises(KeyProblem, match="missing.pem"):
        extract(payload, tmp_path / "missing.pem", tmp_path / "out.raw")
    ec = tmp_path / "ec.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ec)], check=True)
    with pytest.raises(KeyProblem, match="not an RSA key"):
        write_payload(image, tmp_path / "p.gz", ec)
    small = tmp_path / "small.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(small), "1024"], check=True, capture_output=True)
    with pytest.raises(KeyProblem, match="1024 bits, at least 2048"):
        write_payload(image, tmp_path / "p.gz", small)


def test_image_size_must_be_block_aligned(tmp_path: Path, keys: Keys) -> None:
    img = tmp_path / "odd.raw"
    img.write_bytes(b"x" * 5000)
    with pytest.raises(ValueError, match="not a non-zero multiple of 4096"):
        write_payload(img, tmp_path / "p.gz", keys.private)
    assert not (tmp_path / "p.gz").exists()


def test_rsa_4096_key(tmp_path: Path, image: Path) -> None:
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "4096"], check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    write_payload(image, tmp_path / "p.gz", key)
    assert extract(tmp_path / "p.gz", pub, tmp_path / "out.raw") == image.read_bytes()
