"""CRC-32C as upstream overlaybd computes it: raw, reflected, no pre/post inversion.

Upstream's `crc32c_extend(data, n, crc)` updates `crc` with the Castagnoli polynomial
without the usual `~` on entry and exit (spec §2.3). The PyPI `crc32c` package (C,
SSE4.2) implements the *standard* CRC with "continue from value v" semantics,
`std(d, v) = ~raw(~v, d)`, so the raw form is obtained by inverting the seed going in
and the result coming out — no per-byte Python loop on the hot path.
"""

from __future__ import annotations

from crc32c import crc32c as _std_crc32c

_MASK = 0xFFFFFFFF

#: Seed of the per-block CRC in ZFiles (upstream `NOI_WELL_KNOWN_PRIME`).
BLOCK_CRC_SEED = 100007


def crc32c_raw(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """Raw reflected CRC-32C of `data` continuing from `seed` (no inversion)."""
    return _std_crc32c(data, (seed ^ _MASK) & _MASK) ^ _MASK
