"""Host-side stand-ins for what only a TCMU kernel provides.

`KernelRing` plays the kernel's producer half of the ring in a bytearray, with the exact byte layout
of include/uapi/linux/target_core_user.h, because the host kernel has no target_core_user (the real
kernel is exercised in tests/vm). `MemImage` is an in-memory image with the overlaybd.image interface.
"""

from __future__ import annotations

import struct
import threading

MB_CMDR_OFF = 128
OP_PAD, OP_CMD = 0, 1


class MemImage:
    def __init__(self, size: int, *, read_only: bool = False):
        self.buf = bytearray(size)
        self.read_only = read_only
        self.name = "mem"
        self.discards: list[tuple[int, int]] = []
        self.fsyncs = 0
        self.fail_reads = False
        self.fail_writes = False
        self.gate: threading.Event | None = None  # when set, reads wait for it

    def size(self) -> int:
        return len(self.buf)

    def pread_into(self, view: memoryview, offset: int) -> int:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_reads:
            raise self.fail_reads if isinstance(self.fail_reads, Exception) else OSError(5, "remote blob unreachable")
        n = max(0, min(len(view), len(self.buf) - offset))
        view[:n] = self.buf[offset : offset + n]
        return n

    def pwrite(self, data, offset: int) -> int:
        if self.fail_writes:
            raise self.fail_writes if isinstance(self.fail_writes, Exception) else OSError(28, "no space")
        self.buf[offset : offset + len(data)] = data
        return len(data)

    def discard(self, offset: int, length: int) -> None:
        self.discards.append((offset, length))
        self.buf[offset : offset + length] = bytes(length)

    def fsync(self) -> None:
        self.fsyncs += 1


class KernelRing:
    """The kernel's side of the ring: queues commands (advancing cmd_head) and reads completions."""

    def __init__(self, cmdr_size: int = 1024, data_size: int = 1 << 20, flags: int = 1, version: int = 2):
        self.cmdr_off = MB_CMDR_OFF
        self.cmdr_size = cmdr_size
        self.data_off = self.cmdr_off + cmdr_size
        self.region = bytearray(self.data_off + data_size)
        struct.pack_into("<HHIII", self.region, 0, version, flags, self.cmdr_off, cmdr_size, 0)
        self.head = 0
        self.last_cleaned = 0
        self.next_id = 1
        self.data_next = self.data_off
        self.buffers: dict[int, list[tuple[int, int]]] = {}
        self.kicks = 0

    def _put_head(self, head: int) -> None:
        self.head = head
        struct.pack_into("<I", self.region, 12, head)

    def alloc(self, length: int) -> int:
        if self.data_next + length > len(self.region):
            self.data_next = self.data_off
        off = self.data_next
        self.data_next += length
        return off

    def queue(self, cdb: bytes, data_out: bytes = b"", data_in: int = 0, split: int | None = None) -> int:
        """Queue one command; data is split into iovecs of `split` bytes. Returns its cmd_id."""
        length = len(data_out) or data_in
        pieces = []
        pos = 0
        while pos < length:
            n = min(split or length, length - pos)
            off = self.alloc(n)
            self.region[off : off + n] = data_out[pos : pos + n] if data_out else bytes(n)
            pieces.append((off, n))
            pos += n
        size = 48 + 16 * len(pieces) + len(cdb)
        size = max(112, (size + 7) & ~7)
        if self.head + size > self.cmdr_size:  # wrap with a PAD entry like the kernel does
            pad = self.cmdr_size - self.head
            struct.pack_into("<IHBB", self.region, self.cmdr_off + self.head, pad | OP_PAD, 0, 0, 0)
            self._put_head(0)
        cmd_id = self.next_id
        self.next_id += 1
        base = self.cmdr_off + self.head
        cdb_off = base + 48 + 16 * len(pieces)
        struct.pack_into("<IHBB", self.region, base, size | OP_CMD, cmd_id, 0, 0)
        struct.pack_into("<III4xQQQ", self.region, base + 8, len(pieces), 0, 0, cdb_off, 0, 0)
        for i, (off, n) in enumerate(pieces):
            struct.pack_into("<QQ", self.region, base + 48 + 16 * i, off, n)
        self.region[cdb_off : cdb_off + len(cdb)] = cdb
        self.buffers[cmd_id] = pieces
        self._put_head((self.head + size) % self.cmdr_size)
        return cmd_id

    @property
    def tail(self) -> int:
        return struct.unpack_from("<I", self.region, 64)[0]

    def completions(self) -> dict[int, tuple[int, bytes, bytes]]:
        """What the kernel would reap: cmd_id -> (status, sense, data-in bytes)."""
        out = {}
        while self.last_cleaned != self.tail:
            base = self.cmdr_off + self.last_cleaned
            len_op, cmd_id, _k, _u = struct.unpack_from("<IHBB", self.region, base)
            length = len_op & ~7
            if len_op & 7 == OP_CMD:
                status = self.region[base + 8]
                sense = bytes(self.region[base + 16 : base + 16 + 96])
                data = b"".join(bytes(self.region[o : o + n]) for o, n in self.buffers.pop(cmd_id))
                out[cmd_id] = (status, sense, data)
            self.last_cleaned = (self.last_cleaned + length) % self.cmdr_size
        return out

    def kick(self) -> None:
        self.kicks += 1
