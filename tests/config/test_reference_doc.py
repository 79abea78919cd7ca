"""README's configuration reference is generated from the same tables the parsers use."""

from __future__ import annotations

from pathlib import Path

from overlaybd.config import reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_current() -> None:
    text = README.read_text()
    assert reference.splice(text, reference.render()) == text, (
        "README.md configuration reference is stale: run python -m overlaybd.config.reference --update README.md"
    )


def test_every_overlaybd_json_field_is_documented() -> None:
    block = reference.render()
    for key in ("cacheConfig.cacheSizeGB", "credentialConfig.path", "download.maxMBps", "p2pConfig.address"):
        assert f"`{key}`" in block
