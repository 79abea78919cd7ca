"""copy_into: the GIL-free bulk copy used on the cold read path (no registry needed)."""

from __future__ import annotations

import os

import pytest
from overlaybd.registry.memcopy import NOGIL_MIN, copy_into


@pytest.mark.parametrize("n", [0, 1, NOGIL_MIN - 1, NOGIL_MIN, 3 * NOGIL_MIN + 5])
def test_copy_into_sources(n):
    data = os.urandom(n)
    for src in (data, memoryview(bytearray(data)), memoryview(data)):  # bytes, writable view, read-only view
        dst = bytearray(n + 20)
        copy_into(memoryview(dst)[7 : 7 + n], src)
        assert dst[7 : 7 + n] == data and dst[:7] == bytes(7) and dst[7 + n :] == bytes(13)


def test_copy_into_short_destination_is_refused():
    dst = bytearray(NOGIL_MIN)
    with pytest.raises(ValueError):
        copy_into(memoryview(dst), os.urandom(NOGIL_MIN + 1))
