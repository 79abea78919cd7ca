"""The TCMU shared-memory ring (include/uapi/linux/target_core_user.h, mailbox version 2).

Layout of the UIO map0 region: a `tcmu_mailbox` at offset 0, the command ring at `cmdr_off`
(`cmdr_size` bytes, entries 8-byte aligned, wrapping with PAD entries), then the data area
(offsets in `iovec.iov_base` are relative to the start of the region). The kernel advances
`cmd_head`; we advance `cmd_tail` as we complete, then kick the kernel with a write to /dev/uioN.

Completion out of order (mailbox flag CAP_OOOC): a completion is written into whichever CMD slot
sits at the tail, with that slot's `cmd_id` replaced by the completed command's id. So a request's
fields are copied out before it is handed to a worker (its slot may be reused for another reply).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

MAILBOX_VERSION = 2
MB_VERSION = struct.Struct("<HHIII")  # version flags cmdr_off cmdr_size cmd_head   (offset 0)
MB_TAIL_OFFSET = 64  # cmd_tail lives on its own cache line
MB_TAIL = struct.Struct("<I")
MAILBOX_SIZE = 68
HEAD_WORD, TAIL_WORD = 12 // 4, MB_TAIL_OFFSET // 4  # u32 indexes of cmd_head / cmd_tail

FLAG_CAP_OOOC = 1 << 0
FLAG_CAP_READ_LEN = 1 << 1
FLAG_CAP_TMR = 1 << 2
FLAG_CAP_KEEP_BUF = 1 << 3

OP_PAD = 0
OP_CMD = 1
OP_TMR = 2
OP_MASK = 0x7

ENTRY_HDR = struct.Struct("<IHBB")  # len_op cmd_id kflags uflags                   (8)
# the union's req struct is not packed: cdb_off is 8-aligned inside it, so 4 padding bytes follow iov_dif_cnt
REQ = struct.Struct("<III4xQQQ")  # iov_cnt iov_bidi_cnt iov_dif_cnt _ cdb_off pad1 pad2  (40, at 8)
IOVEC = struct.Struct("<QQ")  # iov_base (offset into the region) iov_len            (16)
IOV_OFFSET = ENTRY_HDR.size + REQ.size  # 48
RSP = struct.Struct("<BxHI")  # scsi_status pad1 pad2 read_len                     (8, at 8)
SENSE_OFFSET = 16
SENSE_BUFFERSIZE = 96
ENTRY_MIN_SIZE = SENSE_OFFSET + SENSE_BUFFERSIZE  # 112 = sizeof(struct tcmu_cmd_entry)
HDR_RSP = struct.Struct("<IHBBBxHI")  # header + rsp up to the sense: one pack per completion

UFLAG_UNKNOWN_OP = 0x1
UFLAG_READ_LEN = 0x2

assert ENTRY_HDR.size == 8 and REQ.size == 40 and IOV_OFFSET == 48 and HDR_RSP.size == SENSE_OFFSET


_NO_SENSE = bytes(SENSE_BUFFERSIZE)
_CDB_LENGTHS = (6, 10, 10, 16, 16, 12, 16, 16)  # by group code; reserved/vendor groups: 16


def cdb_length(opcode: int) -> int:
    """SCSI CDB length from the opcode's group code (SPC-4 4.2.5.1)."""
    return _CDB_LENGTHS[(opcode >> 5) & 7]


@dataclass(slots=True)
class Command:
    """One SCSI command copied out of the ring: its id, CDB and data buffers (views into the region)."""

    cmd_id: int
    cdb: bytes
    iovs: list[memoryview]


class RingError(ValueError):
    """The mailbox or a ring entry is not what the kernel ABI says; names the field."""


class Ring:
    """The consumer side of one device's command ring over a writable buffer (an mmap or a bytearray)."""

    def __init__(self, region: memoryview):
        self.region = region
        version, self.flags, self.cmdr_off, self.cmdr_size, _head = MB_VERSION.unpack_from(region, 0)
        if version != MAILBOX_VERSION:
            raise RingError(f"tcmu_mailbox.version: {version}, expected {MAILBOX_VERSION}")
        if self.cmdr_off < MAILBOX_SIZE or self.cmdr_off + self.cmdr_size > len(region) or self.cmdr_size % 8:
            raise RingError(f"tcmu_mailbox.cmdr_off/cmdr_size: {self.cmdr_off}/{self.cmdr_size} outside the region")
        self.ooo = bool(self.flags & FLAG_CAP_OOOC)
        # cmd_head / cmd_tail as native u32 words: an item of a memoryview cast to "I" is read and written
        # with one 4-byte access, while struct's "<I" packs byte by byte, so the kernel (running
        # concurrently on another CPU) could see a torn cmd_tail and reap entries not yet completed
        self._words = region[:MAILBOX_SIZE].cast("I")
        # where we have read requests up to (may run ahead of cmd_tail while commands are in flight)
        self.next_read = self.tail
        self._lock = threading.Lock()

    @property
    def head(self) -> int:
        return int(self._words[HEAD_WORD])

    @property
    def tail(self) -> int:
        return int(self._words[TAIL_WORD])

    def _entry_header(self, pos: int) -> tuple[int, int, int]:
        """(op, length, cmd_id) of the entry at ring offset `pos`."""
        if pos % 8 or pos + ENTRY_HDR.size > self.cmdr_size:
            raise RingError(f"tcmu_cmd_entry at {pos}: misaligned or past cmdr_size {self.cmdr_size}")
        len_op, cmd_id, _k, _u = ENTRY_HDR.unpack_from(self.region, self.cmdr_off + pos)
        length = len_op & ~OP_MASK
        if length == 0 or pos + length > self.cmdr_size:
            raise RingError(f"tcmu_cmd_entry at {pos}: hdr.len_op length {length} invalid")
        return len_op & OP_MASK, length, cmd_id

    def fetch(self) -> list[Command]:
        """Copy out every request the kernel queued since the last call (PAD and TMR entries skipped)."""
        out: list[Command] = []
        head = self.head
        if head >= self.cmdr_size or head % 8:
            raise RingError(f"tcmu_mailbox.cmd_head: {head} invalid for cmdr_size {self.cmdr_size}")
        while self.next_read != head:
            pos = self.next_read
            op, length, cmd_id = self._entry_header(pos)
            if op == OP_CMD:
                out.append(self._parse_cmd(pos, length, cmd_id))
            self.next_read = (pos + length) % self.cmdr_size
        return out

    def _parse_cmd(self, pos: int, length: int, cmd_id: int) -> Command:
        region = self.region
        base = self.cmdr_off + pos
        if length < ENTRY_MIN_SIZE:
            raise RingError(f"tcmu_cmd_entry {cmd_id}: length {length} < {ENTRY_MIN_SIZE}")
        iov_cnt, bidi, dif, cdb_off, _p1, _p2 = REQ.unpack_from(region, base + 8)
        n = iov_cnt + bidi + dif
        if IOV_OFFSET + n * 16 > length:
            raise RingError(f"tcmu_cmd_entry {cmd_id}: req.iov_cnt {n} does not fit in {length} bytes")
        size = len(region)
        data_start = self.cmdr_off + self.cmdr_size
        iovs: list[memoryview] = []
        at = base + IOV_OFFSET
        for i in range(iov_cnt):
            off, ln = IOVEC.unpack_from(region, at)
            if off + ln > size or off < data_start:
                raise RingError(f"tcmu_cmd_entry {cmd_id}: req.iov[{i}] {off}+{ln} outside the data area")
            iovs.append(region[off : off + ln])
            at += 16
        if cdb_off >= size:
            raise RingError(f"tcmu_cmd_entry {cmd_id}: req.cdb_off {cdb_off} outside the region")
        cdb = bytes(region[cdb_off : cdb_off + _CDB_LENGTHS[(region[cdb_off] >> 5) & 7]])
        return Command(cmd_id, cdb, iovs)

    def close(self) -> None:
        """Drop our view of the mailbox words (so the device's mapping can be unmapped)."""
        self._words.release()

    def complete(self, cmd_id: int, status: int, sense: bytes = b"") -> None:
        """Write a response into the slot at the tail and advance cmd_tail (caller kicks the kernel)."""
        if len(sense) > SENSE_BUFFERSIZE:
            raise ValueError("sense data longer than TCMU_SENSE_BUFFERSIZE")
        with self._lock:
            tail = self.tail
            while True:
                op, length, _id = self._entry_header(tail)
                if op == OP_CMD:
                    break
                tail = (tail + length) % self.cmdr_size  # PAD/TMR slots are consumed as we pass them
            base = self.cmdr_off + tail
            len_op = ENTRY_HDR.unpack_from(self.region, base)[0]
            HDR_RSP.pack_into(self.region, base, len_op, cmd_id, 0, 0, status, 0, 0)
            sense_at = base + SENSE_OFFSET
            self.region[sense_at : sense_at + SENSE_BUFFERSIZE] = (
                sense.ljust(SENSE_BUFFERSIZE, b"\0") if sense else _NO_SENSE
            )
            self._words[TAIL_WORD] = (tail + length) % self.cmdr_size  # one store, after the response
