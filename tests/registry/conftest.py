"""Fixtures of the registry tests: registries (anonymous, Basic, token, TLS), the vector layers, a fault proxy.

The code behind them lives in helpers/registry.py (the image and bench tiers use it too).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.registry import FaultProxy, Registry, need_tools


@pytest.fixture
def registry(tmp_path: Path):
    """Anonymous registry."""
    need_tools()
    r = Registry(tmp_path / "registry")
    yield r
    r.close()


@pytest.fixture
def basic_registry(tmp_path: Path):
    """Registry with htpasswd Basic auth; user `alice` / `s3cret`."""
    need_tools()
    r = Registry(tmp_path / "registry", auth="htpasswd", users={"alice": "s3cret"})
    yield r
    r.close()


@pytest.fixture
def token_registry(tmp_path: Path):
    """Registry with token auth; the token endpoint requires `bob` / `hunter2`."""
    need_tools()
    r = Registry(tmp_path / "registry", auth="token", users={"bob": "hunter2"})
    yield r
    r.close()


@pytest.fixture
def tls_registry(tmp_path: Path):
    """HTTPS registry (test CA) that requires a client certificate signed by the same CA."""
    need_tools()
    r = Registry(tmp_path / "registry", tls=True)
    yield r
    r.close()


@pytest.fixture
def vector_layers(vectors: Path) -> list[Path]:
    """L0 (zfile) + L1 (tar-wrapped zfile): stacked they give the README's L0+L1 hash."""
    return [vectors / "zfile" / "L0.commit.z_lz4", vectors / "zfile" / "L1.commit.z_lz4.tar"]


@pytest.fixture
def fault_proxy(registry: Registry):
    p = FaultProxy(registry.port)
    yield p
    p.close()
