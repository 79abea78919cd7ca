"""The kernel's half of a TCMU device, simulated on the host: for the command-path bench and tests.

Why: the development hosts have no target_core_user, and the qemu guest that has it runs under TCG,
where the daemon itself is emulated, so neither measures or exercises the daemon's command loop.
`SimKernel` lays out one device's UIO map0 as include/uapi/linux/target_core_user.h (mailbox
version 2) and the kernel do, in a real shared mmap:

* `struct tcmu_mailbox` at 0 (version, flags = CAP_OOOC, cmdr_off, cmdr_size, cmd_head at 12,
  cmd_tail at 64 on its own cache line; 128 bytes), the command ring at cmdr_off = 128, the data
  area after the ring, handed out in 4 KiB blocks;
* each command is a `tcmu_cmd_entry`: hdr (len_op = entry length | TCMU_OP_CMD, cmd_id, kflags,
  uflags), the unpacked `req` (iov_cnt, iov_bidi_cnt, iov_dif_cnt, cdb_off at +24), `iov[]` at +48
  (iov_base = offset of the data from the start of the mapping, runs of contiguous blocks merged
  into one iovec), the CDB right after the iovecs; entries are 8-byte aligned and at least
  sizeof(struct tcmu_cmd_entry) = 112 bytes so the response fits; an entry that would cross the
  end of the ring is preceded by a TCMU_OP_PAD entry up to the end;
* the kernel publishes cmd_head, then signals (uio_event_notify: the daemon's read of the uio fd
  returns); the daemon writes responses at cmd_tail and kicks (write to the uio fd); the kernel then
  walks from its last cleaned position to cmd_tail, skipping PADs, matching responses by cmd_id
  (out-of-order completion), and frees their data blocks.

The uio fd's read (wait) and write (kick) are a SOCK_DGRAM socketpair here; the daemon side is the
real `UioDevice` (through `UioDevice.from_fd`), `Ring`, `CommandProcessor` and `ScsiDisk`.
"""

from __future__ import annotations

import fcntl
import mmap
import select
import socket
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass, field

from overlaybd.tcmu.backstore import UioDevice

MAILBOX = struct.Struct("<HHIII")  # version flags cmdr_off cmdr_size cmd_head
MB_TAIL_AT = 64
MB_SIZE = 128  # sizeof(struct tcmu_mailbox): cmd_tail is 64-byte aligned
HDR = struct.Struct("<IHBB")  # len_op cmd_id kflags uflags
REQ = struct.Struct("<III4xQ")  # iov_cnt iov_bidi_cnt iov_dif_cnt (pad) cdb_off; then two u64 pads
IOV = struct.Struct("<QQ")
RSP = struct.Struct("<BxHI")  # scsi_status, pad, pad, read_len
IOV_AT = 48
CMD_ENTRY_MIN = 112
OP_PAD, OP_CMD = 0, 1
FLAG_CAP_OOOC = 1
DATA_BLOCK = 4096


@dataclass(slots=True)
class SimCommand:
    """A command the simulated kernel queued and has not seen completed yet."""

    cmd_id: int
    cdb: bytes
    blocks: list[int]
    length: int
    tag: object = None
    status: int = -1
    sense: bytes = b""
    iovs: list[tuple[int, int]] = field(default_factory=list)


class SimKernel:
    """One simulated TCMU device: the shared mapping, the producer side of the ring, the uio signals."""

    def __init__(self, cmdr_size: int = 1 << 20, data_size: int = 4 << 20) -> None:
        if cmdr_size % 8 or data_size % DATA_BLOCK:
            raise ValueError("cmdr_size must be 8-aligned and data_size a multiple of 4096")
        self.cmdr_off = MB_SIZE
        self.cmdr_size = cmdr_size
        self.data_off = -(-(MB_SIZE + cmdr_size) // DATA_BLOCK) * DATA_BLOCK
        self.size = self.data_off + data_size
        self.map = mmap.mmap(-1, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.mem = memoryview(self.map)
        self.words = self.mem[:MB_SIZE].cast("I")  # cmd_head/cmd_tail: one 4-byte access each (no torn values)
        MAILBOX.pack_into(self.map, 0, 2, FLAG_CAP_OOOC, self.cmdr_off, cmdr_size, 0)
        struct.pack_into("<I", self.map, MB_TAIL_AT, 0)
        self.head = 0
        self.last_cleaned = 0
        self.next_id = 1
        self.free_blocks = list(range(data_size // DATA_BLOCK - 1, -1, -1))  # pop() hands out low blocks first
        self.inflight: dict[int, SimCommand] = {}
        self.kernel_sock, self.user_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.kernel_sock.setblocking(False)

    # ---- the daemon's side ------------------------------------------------------------------------------------
    def uio_device(self, minor: int = 0, name: str = "tcm-user/0/sim/overlaybd//sim") -> UioDevice:
        """The daemon's UioDevice over this mapping and the user end of the socketpair (owned by it)."""
        return UioDevice.from_fd(minor, name, self.user_sock.detach(), self.map)

    # ---- producing commands ------------------------------------------------------------------------------------
    def _ring_free(self) -> int:
        return (self.last_cleaned - self.head - 8) % self.cmdr_size

    def queue(self, cdb: bytes, length: int, data_out: bytes | memoryview | None = None, tag: object = None) -> int:
        """Write one command entry (and its data-out) into the ring; returns its cmd_id, or 0 when the
        ring or the data area has no room (complete some first). cmd_head is published by `notify`."""
        nblocks = -(-length // DATA_BLOCK)
        if nblocks > len(self.free_blocks):
            return 0
        blocks = [self.free_blocks.pop() for _ in range(nblocks)]
        iovs: list[tuple[int, int]] = []
        left = length
        for b in blocks:
            n = min(DATA_BLOCK, left)
            base = self.data_off + b * DATA_BLOCK
            if iovs and iovs[-1][0] + iovs[-1][1] == base:
                iovs[-1] = (iovs[-1][0], iovs[-1][1] + n)
            else:
                iovs.append((base, n))
            left -= n
        entry = max(CMD_ENTRY_MIN, (IOV_AT + IOV.size * len(iovs) + len(cdb) + 7) & ~7)
        pad = self.cmdr_size - self.head if self.head + entry > self.cmdr_size else 0
        if entry + pad > self._ring_free():
            self.free_blocks.extend(reversed(blocks))
            return 0
        m = self.map
        if pad:
            HDR.pack_into(m, self.cmdr_off + self.head, pad | OP_PAD, 0, 0, 0)
            self.head = 0
        at = self.cmdr_off + self.head
        cmd_id = self.next_id
        self.next_id = self.next_id % 0xFFFF + 1
        cdb_at = at + IOV_AT + IOV.size * len(iovs)
        HDR.pack_into(m, at, entry | OP_CMD, cmd_id, 0, 0)
        REQ.pack_into(m, at + HDR.size, len(iovs), 0, 0, cdb_at)
        for i, (base, n) in enumerate(iovs):
            IOV.pack_into(m, at + IOV_AT + i * IOV.size, base, n)
        m[cdb_at : cdb_at + len(cdb)] = cdb
        if data_out is not None:
            done = 0
            for base, n in iovs:
                m[base : base + n] = data_out[done : done + n]
                done += n
        self.head = (self.head + entry) % self.cmdr_size
        self.inflight[cmd_id] = SimCommand(cmd_id, bytes(cdb), blocks, length, tag, iovs=iovs)
        return cmd_id

    def notify(self) -> None:
        """Publish cmd_head and signal the daemon (its read of the uio fd returns).

        A real uio fd coalesces events: one read returns however many notifications came since the
        last one. So a signal the daemon has not read yet (bytes still queued on our end, SIOCOUTQ)
        is not repeated: the daemon fetches up to the new cmd_head after reading the pending one."""
        self.words[3] = self.head
        pending = struct.unpack("i", fcntl.ioctl(self.kernel_sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        if pending:
            return
        try:
            self.kernel_sock.send(b"\1\0\0\0")
        except BlockingIOError:  # the daemon has plenty of unread signals queued already
            pass

    # ---- consuming completions ----------------------------------------------------------------------------------
    def wait_kick(self, timeout: float | None) -> bool:
        """Block until the daemon kicked (wrote to its uio fd); drains queued kicks. False on timeout."""
        r, _, _ = select.select([self.kernel_sock], [], [], timeout)
        if not r:
            return False
        try:
            while True:
                self.kernel_sock.recv(64)
        except BlockingIOError:
            pass
        return True

    def reap(self, on_done: Callable[[SimCommand, memoryview], None] | None = None) -> int:
        """Walk from the last cleaned entry to cmd_tail: read each response, hand the command and its
        data (a view valid only during the call) to `on_done`, free its blocks. Returns how many."""
        tail = self.words[MB_TAIL_AT // 4]
        m = self.map
        done = 0
        while self.last_cleaned != tail:
            at = self.cmdr_off + self.last_cleaned
            len_op, cmd_id, _k, _u = HDR.unpack_from(m, at)
            length = len_op & ~7
            if length == 0:
                raise RuntimeError(f"ring entry at {self.last_cleaned} has length 0")
            if len_op & 7 == OP_CMD:
                cmd = self.inflight.pop(cmd_id, None)
                if cmd is None:
                    raise RuntimeError(
                        f"completion for unknown cmd_id {cmd_id} at ring offset {self.last_cleaned} "
                        f"(tail {tail}, head {self.head}, next id {self.next_id}, {len(self.inflight)} in flight)"
                    )
                cmd.status = RSP.unpack_from(m, at + HDR.size)[0]
                cmd.sense = bytes(m[at + 16 : at + 16 + 96]).rstrip(b"\0") if cmd.status else b""
                if on_done is not None:
                    if len(cmd.iovs) == 1:
                        base, n = cmd.iovs[0]
                        on_done(cmd, self.mem[base : base + n])
                    else:
                        on_done(cmd, memoryview(b"".join(self.mem[b : b + n] for b, n in cmd.iovs)))
                self.free_blocks.extend(reversed(cmd.blocks))
                done += 1
            self.last_cleaned = (self.last_cleaned + length) % self.cmdr_size
        return done

    def close(self) -> None:
        self.kernel_sock.close()
        self.user_sock.close()
        self.words.release()
        self.mem.release()
        try:
            self.map.close()
        except BufferError:  # the daemon's UioDevice still maps it; it closes its own view
            pass


# ---- CDBs as the kernel's SCSI layer sends them ---------------------------------------------------------------------
def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def unmap(param_len: int) -> bytes:
    return struct.pack(">BBIBHB", 0x42, 0, 0, 0, param_len, 0)


def unmap_params(ranges: list[tuple[int, int]]) -> bytes:
    """UNMAP parameter list (SBC-3 5.28.2): 8-byte header, then 16-byte (LBA, count) descriptors."""
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(body), len(body)) + body
