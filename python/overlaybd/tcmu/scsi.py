"""SCSI block-device emulation (SBC-3/SPC-4 subset) over an image: what the TCMU handler answers.

Pure: takes a CDB and the command's data buffers, returns (status, sense). No ring, no kernel, so
every opcode and malformed CDB is unit-tested on the host. Upstream advertises UNMAP but does not
implement it; here it is implemented (the Linux sd driver prefers UNMAP when VPD B0/B2 offer it).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass

from overlaybd.format.errors import FormatError, ReadOnly
from overlaybd.image.frontend import BlockImage

log = logging.getLogger(__name__)

BLOCK = 512

# status
GOOD = 0x00
CHECK_CONDITION = 0x02

# sense keys
NO_SENSE = 0x0
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
ILLEGAL_REQUEST = 0x5
DATA_PROTECT = 0x7

# (asc, ascq)
ASC_WRITE_ERROR = (0x0C, 0x00)
ASC_UNRECOVERED_READ_ERROR = (0x11, 0x00)
ASC_PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
ASC_INVALID_OPCODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
ASC_WRITE_PROTECTED = (0x27, 0x00)
ASC_SAVING_PARAMS_UNSUPPORTED = (0x39, 0x00)

# opcodes
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW = 0x1E
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
VERIFY_10 = 0x2F
SYNCHRONIZE_CACHE_10 = 0x35
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SELECT_10 = 0x55
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
VERIFY_16 = 0x8F
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
SAI_READ_CAPACITY_16 = 0x10
READ_12 = 0xA8
WRITE_12 = 0xAA
VERIFY_12 = 0xAF

VPD_PAGES = bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
MAX_UNMAP_DESCRIPTORS = 4
MAX_UNMAP_LBAS = 0x400000  # 2 GiB per UNMAP command
WRITE_SAME_CHUNK = 1 << 20
LIO_OUI_NAA = 0x6001405  # NAA 6 + IEEE OUI 00:14:05 as LIO uses
_R10 = struct.Struct(">IxH")  # READ(10): LBA at 2, transfer length at 7
_R16 = struct.Struct(">QI")  # READ(16): LBA at 2, transfer length at 10


def sense_fixed(key: int, asc_ascq: tuple[int, int], info: int | None = None) -> bytes:
    """18-byte fixed-format sense data (response code 0x70, current error)."""
    s = bytearray(18)
    s[0] = 0x70
    s[2] = key & 0x0F
    s[7] = 10
    s[12], s[13] = asc_ascq
    if info is not None and info < 1 << 32:
        s[0] |= 0x80  # VALID: INFORMATION holds the failing LBA
        struct.pack_into(">I", s, 3, info)
    return bytes(s)


class ScsiError(Exception):
    """A command ends in CHECK CONDITION with this sense."""

    def __init__(self, key: int, asc_ascq: tuple[int, int], info: int | None = None):
        super().__init__(f"sense key {key:#x} asc/ascq {asc_ascq[0]:#04x}/{asc_ascq[1]:#04x}")
        self.sense = sense_fixed(key, asc_ascq, info)


def invalid_cdb() -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB)


class DataBuffer:
    """The command's data-in/out buffers (scatter list of memoryviews)."""

    def __init__(self, iovs: list[memoryview]):
        self.iovs = iovs
        self.length = sum(len(v) for v in iovs)

    def fill(self, data: bytes | bytearray, limit: int | None = None) -> int:
        """Copy `data` (cut to `limit` and our length) to the start of the buffers; returns bytes copied."""
        n = min(len(data), self.length if limit is None else min(limit, self.length))
        done = 0
        for v in self.iovs:
            if done >= n:
                break
            k = min(len(v), n - done)
            v[:k] = data[done : done + k]
            done += k
        return n

    def gather(self, limit: int) -> bytes:
        """The first `limit` bytes of data-out as one bytes object (for small parameter lists)."""
        out = bytearray()
        for v in self.iovs:
            if len(out) >= limit:
                break
            out += v[: limit - len(out)]
        return bytes(out)

    def spans(self, length: int):
        """Yield (offset_in_transfer, view) pieces covering the first `length` bytes."""
        done = 0
        for v in self.iovs:
            if done >= length:
                return
            k = min(len(v), length - done)
            yield done, v[:k]
            done += k


@dataclass
class DeviceInfo:
    """Identity and limits the emulation reports."""

    serial: str = "overlaybd"
    max_transfer_blocks: int = 128  # TCMU's default hw_max_sectors
    read_retry_seconds: float = 0.0  # upstream retries failed reads for days; 0 = fail at once


class ScsiDisk:
    """The emulated disk: a 512-byte-block direct-access device backed by an image."""

    def __init__(self, image: BlockImage, info: DeviceInfo | None = None, *, read_only: bool | None = None):
        self.image = image
        self.info = info or DeviceInfo()
        self.read_only = image.read_only if read_only is None else (read_only or image.read_only)
        self.num_lbas = image.size() // BLOCK
        self._write_lock = threading.Lock()
        self._handlers = {
            TEST_UNIT_READY: self._ok,
            START_STOP_UNIT: self._ok,
            PREVENT_ALLOW: self._ok,
            REQUEST_SENSE: self._request_sense,
            INQUIRY: self._inquiry,
            READ_CAPACITY_10: self._read_capacity_10,
            SERVICE_ACTION_IN_16: self._service_action_in,
            MODE_SENSE_6: self._mode_sense,
            MODE_SENSE_10: self._mode_sense,
            MODE_SELECT_6: self._mode_select,
            MODE_SELECT_10: self._mode_select,
            READ_6: self._read,
            READ_10: self._read,
            READ_12: self._read,
            READ_16: self._read,
            WRITE_6: self._write,
            WRITE_10: self._write,
            WRITE_12: self._write,
            WRITE_16: self._write,
            VERIFY_10: self._verify,
            VERIFY_12: self._verify,
            VERIFY_16: self._verify,
            SYNCHRONIZE_CACHE_10: self._sync,
            SYNCHRONIZE_CACHE_16: self._sync,
            WRITE_SAME_10: self._write_same,
            WRITE_SAME_16: self._write_same,
            UNMAP: self._unmap,
        }

    # -- entry point ---------------------------------------------------------------------------
    def execute(self, cdb: bytes, iovs: list[memoryview]) -> tuple[int, bytes]:
        """Run one command; returns (SCSI status, sense bytes or b"")."""
        if len(iovs) == 1 and cdb and (cdb[0] == READ_10 or cdb[0] == READ_16) and self._fast_read(cdb, iovs[0]):
            return GOOD, b""
        if not cdb:
            return CHECK_CONDITION, sense_fixed(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
        handler = self._handlers.get(cdb[0])
        if handler is None:
            return CHECK_CONDITION, sense_fixed(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
        try:
            handler(cdb, DataBuffer(iovs))
        except ScsiError as e:
            return CHECK_CONDITION, e.sense
        except (struct.error, IndexError):
            return CHECK_CONDITION, invalid_cdb().sense  # CDB shorter than its opcode needs
        return GOOD, b""

    def _fast_read(self, cdb: bytes, view: memoryview) -> bool:
        """READ(10)/READ(16) into one buffer, done in one image read: True when it fully succeeded.

        Why: most commands are reads of this shape, and the general path (DataBuffer, spans, retry
        loop) is ~1.5 us of a ~10 us command. Anything unusual (short CDB, range, a short or failed
        read) returns False and the general path runs the command again, with its checks, retries
        and sense data."""
        try:
            lba, count = (_R10 if cdb[0] == READ_10 else _R16).unpack_from(cdb, 2)
        except struct.error:
            return False
        length = count * BLOCK
        if not count or lba + count > self.num_lbas or len(view) < length:
            return False
        try:
            return bool(self.image.pread_into(view if len(view) == length else view[:length], lba * BLOCK) == length)
        except Exception:  # the general path reports it (and retries transient errors)
            return False

    # -- trivial -------------------------------------------------------------------------------
    def _ok(self, cdb: bytes, buf: DataBuffer) -> None:
        return None

    def _request_sense(self, cdb: bytes, buf: DataBuffer) -> None:
        buf.fill(sense_fixed(NO_SENSE, (0, 0)), cdb[4])

    # -- INQUIRY -------------------------------------------------------------------------------
    def _inquiry(self, cdb: bytes, buf: DataBuffer) -> None:
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        data: bytes | bytearray
        if cdb[1] & 0x01:
            data = self._vpd(cdb[2])
        elif cdb[2] != 0 or cdb[1] & 0xFE:
            raise invalid_cdb()
        else:
            data = bytearray(36)
            data[0] = 0x00  # direct-access block device
            data[2] = 0x05  # SPC-3
            data[3] = 0x12  # HiSup, response format 2
            data[4] = len(data) - 5
            data[7] = 0x02  # CmdQue
            data[8:16] = b"LIO-ORG "
            data[16:32] = b"TCMU device".ljust(16)
            data[32:36] = b"0002"
        buf.fill(data, alloc)

    def _vpd(self, page: int) -> bytes:
        serial = self.info.serial.encode()[:200]
        if page == 0x00:
            body = VPD_PAGES
        elif page == 0x80:
            body = serial
        elif page == 0x83:
            t10 = b"LIO-ORG " + serial
            hexdigits = "".join(c for c in self.info.serial.lower() if c in "0123456789abcdef").ljust(25, "0")[:25]
            naa = bytes.fromhex(f"{LIO_OUI_NAA:07x}{hexdigits}")
            body = bytes([0x02, 0x01, 0, len(t10)]) + t10 + bytes([0x01, 0x03, 0, len(naa)]) + naa
        elif page == 0xB0:
            b = bytearray(0x3C)
            b[0] = 0x01  # WSNZ: WRITE SAME with zero blocks is rejected
            struct.pack_into(">H", b, 2, 8)  # optimal transfer length granularity: 4 KiB
            struct.pack_into(">I", b, 4, self.info.max_transfer_blocks)
            struct.pack_into(">I", b, 8, self.info.max_transfer_blocks)
            struct.pack_into(">I", b, 16, MAX_UNMAP_LBAS)
            struct.pack_into(">I", b, 20, MAX_UNMAP_DESCRIPTORS)
            struct.pack_into(">I", b, 24, 8)  # optimal unmap granularity: 4 KiB
            struct.pack_into(">Q", b, 32, 0xFFFFFFFF)  # max WRITE SAME length
            body = bytes(b)
        elif page == 0xB1:
            b = bytearray(0x3C)
            struct.pack_into(">H", b, 0, 1)  # non-rotating medium
            body = bytes(b)
        elif page == 0xB2:
            body = bytes([0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0])  # LBPU LBPWS LBPWS10 LBPRZ; thin
        else:
            raise invalid_cdb()
        return bytes([0x00, page]) + struct.pack(">H", len(body)) + body

    # -- capacity ------------------------------------------------------------------------------
    def _read_capacity_10(self, cdb: bytes, buf: DataBuffer) -> None:
        last = self.num_lbas - 1
        buf.fill(struct.pack(">II", min(last, 0xFFFFFFFF), BLOCK), 8)

    def _service_action_in(self, cdb: bytes, buf: DataBuffer) -> None:
        if cdb[1] & 0x1F != SAI_READ_CAPACITY_16:
            raise invalid_cdb()
        alloc = struct.unpack_from(">I", cdb, 10)[0]
        data = bytearray(32)
        struct.pack_into(">QI", data, 0, self.num_lbas - 1, BLOCK)
        data[14] = 0xC0  # LBPME | LBPRZ
        buf.fill(data, alloc)

    # -- mode pages ----------------------------------------------------------------------------
    def _mode_pages(self, page: int, subpage: int, changeable: bool) -> bytes:
        caching = bytearray(20)
        caching[0], caching[1] = 0x08, 0x12  # WCE=0: no volatile cache to lose
        control = bytearray(12)
        control[0], control[1] = 0x0A, 0x0A
        if not changeable:
            control[2] = 0x02  # GLTSD
        if subpage not in (0x00, 0xFF):
            raise invalid_cdb()
        if page == 0x08:
            return bytes(caching)
        if page == 0x0A:
            return bytes(control)
        if page == 0x3F:
            return bytes(caching + control)
        raise invalid_cdb()

    def _mode_sense(self, cdb: bytes, buf: DataBuffer) -> None:
        ten = cdb[0] == MODE_SENSE_10
        pc = cdb[2] >> 6
        if pc == 3:
            raise ScsiError(ILLEGAL_REQUEST, ASC_SAVING_PARAMS_UNSUPPORTED)
        pages = self._mode_pages(cdb[2] & 0x3F, cdb[3], pc == 1)
        wp = 0x80 if self.read_only else 0x00
        if ten:
            alloc = struct.unpack_from(">H", cdb, 7)[0]
            hdr = struct.pack(">HBBxxH", 6 + len(pages), 0, wp, 0)
        else:
            alloc = cdb[4]
            hdr = bytes([3 + len(pages), 0, wp, 0])
        buf.fill(hdr + pages, alloc)

    def _mode_select(self, cdb: bytes, buf: DataBuffer) -> None:
        ten = cdb[0] == MODE_SELECT_10
        if not cdb[1] & 0x10 or cdb[1] & 0x01:  # PF must be set; SP (save) unsupported
            raise invalid_cdb()
        length = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
        if length == 0:
            return
        if length > buf.length:
            raise ScsiError(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR)
        data = buf.gather(length)
        hlen = 8 if ten else 4
        if len(data) < hlen:
            raise ScsiError(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR)
        bdl = struct.unpack_from(">H", data, 6)[0] if ten else data[3]
        pos = hlen + bdl
        # nothing is changeable: accept a page only if it equals what MODE SENSE reports
        while pos < len(data):
            if pos + 2 > len(data):
                raise ScsiError(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR)
            code, plen = data[pos] & 0x3F, data[pos + 1]
            page = data[pos : pos + 2 + plen]
            try:
                current = self._mode_pages(code, 0, False)
            except ScsiError:
                raise ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST) from None
            if page[2:] != current[2 : 2 + plen] or len(page) != len(current):
                raise ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST)
            pos += 2 + plen

    # -- I/O -----------------------------------------------------------------------------------
    @staticmethod
    def _lba_count(cdb: bytes) -> tuple[int, int]:
        op = cdb[0]
        if op in (READ_6, WRITE_6):
            lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
            return lba, cdb[4] or 256
        if op in (READ_10, WRITE_10, VERIFY_10, WRITE_SAME_10):
            lba, count = struct.unpack_from(">IxH", cdb, 2)
            return lba, count
        if op in (READ_12, WRITE_12, VERIFY_12):
            return struct.unpack_from(">II", cdb, 2)
        return struct.unpack_from(">QI", cdb, 2)  # 16-byte forms

    def _check_range(self, lba: int, count: int) -> None:
        if lba + count > self.num_lbas:
            raise ScsiError(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)

    def _read(self, cdb: bytes, buf: DataBuffer) -> None:
        lba, count = self._lba_count(cdb)
        self._check_range(lba, count)
        length = count * BLOCK
        if length > buf.length:
            raise invalid_cdb()
        base = lba * BLOCK
        for off, view in buf.spans(length):
            self._pread_retrying(view, base + off, lba)

    def _pread_retrying(self, view: memoryview, offset: int, lba: int) -> None:
        """Read fully; transient failures are retried with backoff for `read_retry_seconds`."""
        deadline = time.monotonic() + self.info.read_retry_seconds
        delay = 0.02
        while True:
            try:
                done = 0
                while done < len(view):
                    n = self.image.pread_into(view[done:], offset + done)
                    if n <= 0:
                        raise OSError(5, f"short read at {offset + done}")
                    done += n
                return
            except OSError as e:  # I/O and network errors may be transient: retry
                if time.monotonic() + delay > deadline:
                    log.error("read %d+%d: %s", offset, len(view), e)
                    raise ScsiError(MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR, lba) from e
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            except FormatError as e:  # corrupt data (bad checksum, bad index) does not heal
                log.error("read %d+%d: %s", offset, len(view), e)
                raise ScsiError(MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR, lba) from e

    def _check_writable(self) -> None:
        if self.read_only:
            raise ScsiError(DATA_PROTECT, ASC_WRITE_PROTECTED)

    def _write(self, cdb: bytes, buf: DataBuffer) -> None:
        self._check_writable()
        lba, count = self._lba_count(cdb)
        self._check_range(lba, count)
        length = count * BLOCK
        if length > buf.length:
            raise invalid_cdb()
        base = lba * BLOCK
        try:
            with self._write_lock:
                for off, view in buf.spans(length):
                    self.image.pwrite(view, base + off)
        except (OSError, FormatError) as e:
            log.error("write %d+%d: %s", base, length, e)
            if isinstance(e, ReadOnly) or getattr(e, "errno", None) == 30:  # EROFS
                raise ScsiError(DATA_PROTECT, ASC_WRITE_PROTECTED) from e
            raise ScsiError(MEDIUM_ERROR, ASC_WRITE_ERROR, lba) from e

    def _verify(self, cdb: bytes, buf: DataBuffer) -> None:
        lba, count = self._lba_count(cdb)
        self._check_range(lba, count)
        if cdb[1] & 0x06:  # BYTCHK compare: not supported
            raise invalid_cdb()

    def _sync(self, cdb: bytes, buf: DataBuffer) -> None:
        if self.read_only:
            return
        try:
            with self._write_lock:
                self.image.fsync()
        except (OSError, FormatError) as e:
            log.error("fsync: %s", e)
            raise ScsiError(MEDIUM_ERROR, ASC_WRITE_ERROR) from e

    def _discard(self, lba: int, count: int) -> None:
        try:
            with self._write_lock:
                self.image.discard(lba * BLOCK, count * BLOCK)
        except (OSError, FormatError) as e:
            log.error("discard %d+%d: %s", lba, count, e)
            raise ScsiError(MEDIUM_ERROR, ASC_WRITE_ERROR, lba) from e

    def _write_same(self, cdb: bytes, buf: DataBuffer) -> None:
        self._check_writable()
        lba, count = self._lba_count(cdb)
        if count == 0 or cdb[1] & 0x01:  # WSNZ; LBDATA/PBDATA (obsolete) unsupported
            raise invalid_cdb()
        self._check_range(lba, count)
        if cdb[1] & 0x08:  # UNMAP
            self._discard(lba, count)
            return
        if buf.length < BLOCK:
            raise invalid_cdb()
        block = buf.gather(BLOCK)
        if block == bytes(BLOCK):
            self._discard(lba, count)  # LBPRZ: unmapped blocks read as zeros
            return
        chunk = block * (WRITE_SAME_CHUNK // BLOCK)
        pos, end = lba * BLOCK, (lba + count) * BLOCK
        try:
            with self._write_lock:
                while pos < end:
                    n = min(len(chunk), end - pos)
                    self.image.pwrite(memoryview(chunk)[:n], pos)
                    pos += n
        except (OSError, FormatError) as e:
            raise ScsiError(MEDIUM_ERROR, ASC_WRITE_ERROR, lba) from e

    def _unmap(self, cdb: bytes, buf: DataBuffer) -> None:
        self._check_writable()
        if cdb[1] & 0x01:  # ANCHOR
            raise invalid_cdb()
        length = struct.unpack_from(">H", cdb, 7)[0]
        if length == 0:
            return
        if length < 8 or length > buf.length:
            raise ScsiError(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR)
        data = buf.gather(length)
        data_len, desc_len = struct.unpack_from(">HH", data, 0)
        if desc_len % 16 or 8 + desc_len > length or data_len < 6 + desc_len:
            raise ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST)
        n = desc_len // 16
        if n > MAX_UNMAP_DESCRIPTORS:
            raise ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST)
        ranges = [struct.unpack_from(">QI", data, 8 + 16 * i) for i in range(n)]
        for lba, count in ranges:
            if count > MAX_UNMAP_LBAS:
                raise ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST)
            self._check_range(lba, count)
        for lba, count in ranges:
            if count:
                self._discard(lba, count)
