"""Reading rendered Ignition configs in the Butane tests."""

from __future__ import annotations

import base64
import urllib.parse
from typing import Any


def decode_data_url(url: str) -> str:
    """The text of an Ignition `data:` URL (plain or base64)."""
    head, _, data = url.partition(",")
    assert head in ("data:", "data:;base64"), url[:40]
    return base64.b64decode(data).decode() if head.endswith("base64") else urllib.parse.unquote(data)


def files_by_path(ign: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """storage.files of an Ignition config, by path."""
    return {f["path"]: f for f in ign["storage"]["files"]}
