"""README's configuration reference is generated from the same tables the parsers use."""

from __future__ import annotations

from pathlib import Path

from overlaybd.config import reference_doc

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_current() -> None:
    text = README.read_text()
    assert reference_doc.splice(text, reference_doc.render()) == text, (
        "README.md configuration reference is stale: run python -m overlaybd.config.reference_doc --update README.md"
    )


def test_every_file_and_new_setting_is_documented() -> None:
    block = reference_doc.render()
    for key in (
        "cacheConfig.cacheSizeGB",
        "credentialConfig.path",
        "download.maxMBps",
        "p2pConfig.address",
        "readDeadlineSec",
        "lowers",
        "gzipIndex",
        "traceDir",
        "overlaybdConfigPath",
        "mirrorRegistry",
    ):
        assert f"`{key}`" in block
