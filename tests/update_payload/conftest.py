"""Throwaway RSA keys and a small sysext-like image, made once per session (keygen is the slow part)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from helpers.payload import Keys
from overlaybd.update_payload import generate_key_pem, public_key_pem


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    paths = []
    for name in ("key", "other"):
        priv, pub = d / f"{name}.pem", d / f"{name}.pub.pem"
        priv.write_bytes(generate_key_pem())
        pub.write_bytes(public_key_pem(priv))
        paths += [priv, pub]
    return Keys(*paths)


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 MiB + a partial chunk: an incompressible chunk (REPLACE), compressible ones (REPLACE_BZ)."""
    rng = random.Random(12)
    p = tmp_path_factory.mktemp("img") / "flatcar-overlaybd.raw"
    with open(p, "wb") as f:
        f.write(rng.randbytes(1 << 20))
        f.write(b"\0" * (1 << 20))
        f.write(b"overlaybd " * 70000)
        f.write(b"\0" * (-f.tell() % 4096))
    assert p.stat().st_size % 4096 == 0 and p.stat().st_size % (1 << 20)
    return p
