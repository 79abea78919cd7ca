"""Errors raised when reading or writing image files.

Every error names the file and the field (or region) that is wrong, so a user
seeing it in a log knows what to inspect.
"""

from __future__ import annotations


class FormatError(Exception):
    """A file is not a valid overlaybd/ZFile/tar layer, or an operation on it is invalid."""

    def __init__(self, path: str, field: str, message: str) -> None:
        self.path = path
        self.field = field
        self.message = message
        super().__init__(f"{path}: {field}: {message}")


class BadMagic(FormatError):
    """The magic number of a header or trailer does not match."""


class BadChecksum(FormatError):
    """A CRC32C (header digest, index CRC, block CRC, trace checksum) does not match."""


class Truncated(FormatError):
    """The file is shorter than its header/trailer/index claims."""


class BadIndex(FormatError):
    """The LSMT index or ZFile jump table is inconsistent (overlap, out of range, absurd size)."""


class Unaligned(FormatError):
    """An I/O offset or length is not a multiple of the required alignment (512 bytes)."""


class ReadOnly(FormatError):
    """A write or discard was attempted on a read-only layer or image."""
