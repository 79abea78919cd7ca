"""Layer identities of an image: OCI chain IDs, and the LSMT layer UUIDs derived from them.

Why: a converted layer's UUID (and its parent's) must be the same whoever converts the same source
layers, so that layers converted separately stack and deduplicate; upstream's convertor takes the
first 128 bits of the source layer's chain ID, and so do we (the snapshotter and rpull use chain IDs
as snapshot names, so they share `chain_ids`).
"""

from __future__ import annotations

import hashlib


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI ChainID: chain[0] = diff[0]; chain[i] = sha256(chain[i-1] + " " + diff[i])."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def chain_id_uuid(chain_id: str) -> str:
    """The layer UUID of a chain ID: its first 32 hex digits as 8-4-4-4-12 (upper-case, as LSMT tools print)."""
    algo, _, hexd = chain_id.partition(":")
    if algo != "sha256" or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        raise ValueError(f"not a sha256 chain ID: {chain_id!r}")
    h = hexd[:32].upper()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
