"""The single-file tar wrapper around overlaybd layer blobs (spec §2.7).

Registry blobs are `overlaybd-commit -z -t` output: a pax extended header
(`overlaybd.pax`, one `size=` record), a ustar header (`overlaybd.commit`, size
field 0 — the pax record carries the real size), the payload (a ZFile or LSMT
layer), zero padding to 512 and two zero blocks. Standard tar tools can list and
extract it; overlaybd reads the payload in place at offset 1536.

The writer streams: it writes placeholder headers whose magic is "xxtar"/"xx"
(so a half-written file is never taken for a tar), the payload, the end-of-archive
blocks, and only then rewrites the three header blocks with the final size.
"""

from __future__ import annotations

import grp
import pwd
from typing import Protocol

from .errors import FormatError, Truncated
from .fileio import RandomAccessFile, read_exact

BLOCK = 512
PAX_NAME = b"overlaybd.pax"
PAYLOAD_NAME = b"overlaybd.commit"
USTAR_MAGIC = b"ustar\x00"
USTAR_VERSION = b"00"
PLACEHOLDER_MAGIC = b"xxtar\x00"
PLACEHOLDER_VERSION = b"xx"
#: a pax header larger than this is not one overlaybd wrote; refuse rather than allocate
MAX_PAX_SIZE = 64 * 1024
HEADERS_SIZE = 3 * BLOCK

# ustar field (offset, length)
_NAME = (0, 100)
_MODE = (100, 8)
_UID = (108, 8)
_GID = (116, 8)
_SIZE = (124, 12)
_MTIME = (136, 12)
_CHKSUM = (148, 8)
_TYPEFLAG = (156, 1)
_MAGIC = (257, 6)
_VERSION = (263, 2)
_UNAME = (265, 32)
_GNAME = (297, 32)


# ---- reading ------------------------------------------------------------------------------------------------------
def _field(block: bytes, f: tuple[int, int]) -> bytes:
    return block[f[0] : f[0] + f[1]]


def _parse_number(raw: bytes, path: str, field: str) -> int:
    """A tar numeric field: octal ASCII padded with spaces/NULs, or GNU base-256 (high bit set)."""
    if raw and raw[0] & 0x80:
        value = raw[0] & 0x3F
        for b in raw[1:]:
            value = (value << 8) | b
        if raw[0] & 0x40:
            raise FormatError(path, field, "negative base-256 number")
        return value
    text = raw.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise FormatError(path, field, f"not an octal number: {raw!r}") from None


def _checksums(block: bytes) -> tuple[int, int]:
    """(unsigned, signed) header sums with the checksum field counted as spaces."""
    masked = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(masked)
    signed = sum(b - 256 if b >= 128 else b for b in masked)
    return unsigned, signed


def _is_ustar(block: bytes) -> bool:
    if _field(block, _MAGIC) != USTAR_MAGIC or _field(block, _VERSION) != USTAR_VERSION:
        return False
    try:
        stored = _parse_number(_field(block, _CHKSUM), "", "chksum")
    except FormatError:
        return False
    return stored in _checksums(block)


MAX_SIZE_DIGITS = 20  # a 64-bit size has at most 20 decimal digits
_EXCERPT = 24  # bytes of a bad value echoed in an error (the line stays short, whatever the input)


def _excerpt(raw: bytes) -> str:
    """A bad value for an error message: its first bytes, and its length when it was cut."""
    if len(raw) <= _EXCERPT:
        return repr(raw)
    return f"{raw[:_EXCERPT]!r}... ({len(raw)} bytes)"


def _pax_size(data: bytes, path: str) -> int | None:
    """The `size` value of a pax extended-header data block, or None if absent."""
    pos = 0
    size: int | None = None
    while pos < len(data) and data[pos] != 0:
        sp = data.find(b" ", pos)
        if sp < 0:
            raise FormatError(path, "pax record", f"no length at offset {pos}")
        digits = data[pos:sp]
        if not digits.isdigit() or len(digits) > MAX_SIZE_DIGITS:
            raise FormatError(path, "pax record", f"bad length {_excerpt(digits)} at offset {pos}")
        length = int(digits)
        if length <= sp - pos + 1 or pos + length > len(data) or data[pos + length - 1] != 0x0A:
            raise FormatError(path, "pax record", f"malformed record at offset {pos}")
        key, eq, value = data[sp + 1 : pos + length - 1].partition(b"=")
        if not eq:
            raise FormatError(path, "pax record", f"no '=' in record at offset {pos}")
        if key == b"size":
            if not value.isdigit():
                raise FormatError(path, "pax size", f"not a decimal number: {_excerpt(value)}")
            if len(value) > MAX_SIZE_DIGITS:
                raise FormatError(path, "pax size", f"{len(value)}-digit number: {_excerpt(value)}")
            size = int(value)
        pos += length
    return size


class TarPayload:
    """The payload region of a tar wrapper, as a RandomAccessFile (closing it closes the tar file)."""

    def __init__(self, f: RandomAccessFile, offset: int, size: int) -> None:
        self.name = f.name
        self._f = f
        self.offset = offset
        self._size = size

    def size(self) -> int:
        return self._size

    def pread_into(self, buf: memoryview, offset: int) -> int:
        n = max(0, min(len(buf), self._size - offset))
        if n == 0:
            return 0
        view = buf if n == len(buf) else memoryview(buf)[:n]
        return self._f.pread_into(view, self.offset + offset)

    def pread(self, size: int, offset: int) -> bytes:
        n = max(0, min(size, self._size - offset))
        return self._f.pread(n, self.offset + offset) if n else b""

    def fd_span(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, file offset) of a span of the payload when the file below can name one (see ZFileReader)."""
        inner = getattr(self._f, "fd_span", None)
        if inner is None or offset < 0 or offset + length > self._size:
            return None
        where: tuple[int, int] | None = inner(self.offset + offset, length)
        return where

    def evict(self, offset: int, length: int) -> None:
        """Forward a cache eviction (used by the ZFile reader's retry) to the underlying file, if it caches."""
        evict = getattr(self._f, "evict", None)
        if evict is not None:
            evict(self.offset + offset, length)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "TarPayload":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TarPayload({self.name!r}, offset={self.offset}, size={self._size})"


def open_tar(f: RandomAccessFile) -> TarPayload | None:
    """The payload view if `f` is a tar wrapper (ustar magic, version 00, valid checksum), else None."""
    file_size = f.size()
    if file_size < BLOCK:
        return None
    first = read_exact(f, BLOCK, 0, "tar header")
    if not _is_ustar(first):
        return None
    size: int | None = None
    if _field(first, _TYPEFLAG) in (b"x", b"g"):
        pax_len = _parse_number(_field(first, _SIZE), f.name, "pax header size")
        if pax_len > MAX_PAX_SIZE:
            raise FormatError(f.name, "pax header size", f"{pax_len} bytes exceeds {MAX_PAX_SIZE}")
        pax_data = read_exact(f, pax_len, BLOCK, "pax records")
        size = _pax_size(pax_data, f.name)
        header_offset = BLOCK + -(-pax_len // BLOCK) * BLOCK
        second = read_exact(f, BLOCK, header_offset, "tar header")
        if size is None:
            size = _parse_number(_field(second, _SIZE), f.name, "tar size")
        offset = header_offset + BLOCK
    else:
        size = _parse_number(_field(first, _SIZE), f.name, "tar size")
        offset = BLOCK
    if offset + size > file_size:
        raise Truncated(f.name, "tar size", f"payload of {size} bytes at offset {offset} exceeds file size {file_size}")
    return TarPayload(f, offset, size)


# ---- writing ------------------------------------------------------------------------------------------------------
class _Output(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int, /) -> object: ...


def _put(block: bytearray, f: tuple[int, int], value: bytes) -> None:
    if len(value) > f[1]:
        raise ValueError(f"tar field too long: {value!r}")
    block[f[0] : f[0] + len(value)] = value


def _octal(value: int, width: int) -> bytes:
    """`width` chars of space-padded octal (upstream's format), e.g. 6 -> b'100644'."""
    text = b"%*o" % (width, value)
    if len(text) > width:
        raise ValueError(f"{value} does not fit a {width}-digit tar field")
    return text


def _finish(block: bytearray) -> bytes:
    unsigned, _ = _checksums(bytes(block))
    _put(block, _CHKSUM, _octal(unsigned, 6) + b" \x00")
    return bytes(block)


def _user_name(uid: int) -> bytes:
    try:
        return pwd.getpwuid(uid).pw_name.encode()[:31]
    except KeyError:
        return b""


def _group_name(gid: int) -> bytes:
    try:
        return grp.getgrgid(gid).gr_name.encode()[:31]
    except KeyError:
        return b""


def pax_record(key: str, value: str) -> bytes:
    """One pax record "<len> key=value\\n" where <len> counts the whole record including itself."""
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def build_headers(payload_size: int, mode: int = 0o100644, placeholder: bool = False) -> bytes:
    """The three 512-byte header blocks (pax header, pax data, ustar header) for a payload."""
    magic, version = (PLACEHOLDER_MAGIC, PLACEHOLDER_VERSION) if placeholder else (USTAR_MAGIC, USTAR_VERSION)
    record = pax_record("size", str(payload_size))

    pax = bytearray(BLOCK)
    _put(pax, _NAME, PAX_NAME)
    _put(pax, _SIZE, _octal(len(record), 11) + b" ")
    _put(pax, _TYPEFLAG, b"x")
    _put(pax, _MAGIC, magic)
    _put(pax, _VERSION, version)

    data = bytearray(BLOCK)
    data[: len(record)] = record

    ustar = bytearray(BLOCK)
    _put(ustar, _NAME, PAYLOAD_NAME)
    _put(ustar, _MODE, _octal(mode, 6) + b" \x00")
    _put(ustar, _UID, _octal(0, 6) + b" \x00")
    _put(ustar, _GID, _octal(0, 6) + b" \x00")
    _put(ustar, _SIZE, _octal(0, 11) + b" ")
    _put(ustar, _MTIME, _octal(0, 11) + b" ")
    _put(ustar, _TYPEFLAG, b"0")
    _put(ustar, _MAGIC, magic)
    _put(ustar, _VERSION, version)
    _put(ustar, _UNAME, _user_name(0))
    _put(ustar, _GNAME, _group_name(0))
    return _finish(pax) + bytes(data) + _finish(ustar)


class TarWrapWriter:
    """Wraps a streamed payload in overlaybd's tar layout on `out` (needs write() and pwrite()).

    write()/pwrite() address the payload (pwrite offsets are payload-relative); close()
    writes the end-of-archive blocks and the final headers. It does not close `out`.
    """

    def __init__(self, out: _Output, mode: int = 0o100644) -> None:
        self._out = out
        self.mode = mode
        self._size = 0
        self._closed = False
        out.write(build_headers(0, mode, placeholder=True))

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("TarWrapWriter is closed")
        n = memoryview(data).nbytes
        self._out.write(data)
        self._size += n
        return n

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Overwrite already written payload bytes (e.g. the ZFile header rewrite)."""
        n = memoryview(data).nbytes
        if offset < 0 or offset + n > self._size:
            raise ValueError(f"pwrite [{offset}, {offset + n}) outside the {self._size} payload bytes written")
        self._out.pwrite(data, HEADERS_SIZE + offset)
        return n

    def tell(self) -> int:
        return self._size

    def close(self) -> None:
        """Finish the archive: zero padding to 512, two zero blocks, final headers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        end = HEADERS_SIZE + self._size
        self._out.write(bytes(-end % BLOCK + 2 * BLOCK))
        self._out.pwrite(build_headers(self._size, self.mode), 0)

    @property
    def payload_size(self) -> int:
        return self._size
