"""The ring protocol against an in-memory ring with the kernel's byte layout (no TCMU on the host)."""

from __future__ import annotations

import struct
import threading

import pytest
from helpers.tcmu_fakes import KernelRing, MemImage
from overlaybd.tcmu import ring as R
from overlaybd.tcmu.backstore import CommandProcessor
from overlaybd.tcmu.scsi import ScsiDisk


def read10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, n, 0)


def write10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, n, 0)


def test_struct_layout_matches_uapi_header():
    # struct tcmu_mailbox: version u16 @0, flags u16 @2, cmdr_off @4, cmdr_size @8, cmd_head @12, cmd_tail @64
    assert R.MB_VERSION.size == 16 and R.MB_TAIL_OFFSET == 64
    # tcmu_cmd_entry: hdr 8 bytes; req.iov_cnt @8, cdb_off @24 (the req struct is not packed), iov[] @48;
    # rsp.scsi_status @8, sense @16  (found the hard way: a guest kernel rejected the packed reading)
    assert R.ENTRY_HDR.size == 8 and R.IOV_OFFSET == 48 and R.IOVEC.size == 16
    assert R.SENSE_OFFSET == 16 and R.SENSE_BUFFERSIZE == 96 and R.ENTRY_MIN_SIZE == 112
    k = KernelRing()
    k.queue(read10(0, 1), data_in=512)
    entry = k.region[k.cmdr_off : k.cmdr_off + 112]
    assert struct.unpack_from("<I", entry, 0)[0] & 7 == R.OP_CMD
    assert struct.unpack_from("<I", entry, 8)[0] == 1  # iov_cnt
    cdb_off = struct.unpack_from("<Q", entry, 24)[0]
    assert k.region[cdb_off] == 0x28
    assert R.cdb_length(0x28) == 10 and R.cdb_length(0x08) == 6 and R.cdb_length(0x88) == 16
    assert R.cdb_length(0xA8) == 12


def make(size=1 << 20, **kw):
    k = KernelRing(**kw)
    img = MemImage(size)
    img.buf[:] = bytes(range(251)) * (size // 251) + bytes(size % 251)
    ring = R.Ring(memoryview(k.region))
    proc = CommandProcessor(ring, ScsiDisk(img), k.kick, workers=4)
    return k, img, proc


def test_read_write_roundtrip_with_scattered_iovecs():
    k, img, proc = make()
    a = k.queue(read10(2, 8), data_in=4096, split=1000)
    payload = bytes(range(256)) * 8
    b = k.queue(write10(100, 4), data_out=payload, split=512)
    assert proc.poll() == 2
    assert proc.drain(5)
    done = k.completions()
    assert done[a][0] == 0 and done[a][2] == bytes(img.buf[1024 : 1024 + 4096])
    assert done[b][0] == 0 and bytes(img.buf[51200 : 51200 + 2048]) == payload[:2048]
    assert 1 <= k.kicks <= 2  # one kick per drained batch of completions
    proc.close()


def test_pad_entries_wrap_and_many_rounds():
    k, img, proc = make(cmdr_size=512)
    for round_ in range(20):
        ids = [k.queue(read10(round_ + i, 1), data_in=512) for i in range(2)]
        proc.poll()
        assert proc.drain(5)
        done = k.completions()
        for i, cid in enumerate(ids):
            lba = round_ + i
            assert done[cid] == (0, bytes(96), bytes(img.buf[lba * 512 : lba * 512 + 512]))
    proc.close()


def test_out_of_order_completion_does_not_block_other_commands():
    k, img, proc = make()
    img.gate = threading.Event()
    slow = k.queue(read10(0, 1), data_in=512)
    proc.poll()
    img_gate = img.gate  # stays set: only reads wait on it, whenever the worker gets to the read
    fast = k.queue(struct.pack(">B5x", 0x00))  # TEST UNIT READY
    proc.poll()
    # the fast command completes into the first slot while the slow read is still waiting
    for _ in range(200):
        if k.tail:
            break
        threading.Event().wait(0.01)
        proc.poll()  # as the poll loop does every STALL_SECONDS while commands are queued
    first = k.completions()
    assert list(first) == [fast]
    img_gate.set()
    assert proc.drain(5)
    second = k.completions()
    assert list(second) == [slow] and second[slow][2] == bytes(img.buf[:512])
    proc.close()


def test_kernel_without_out_of_order_completion_is_refused():
    k = KernelRing(flags=0)
    with pytest.raises(R.RingError, match="CAP_OOOC"):
        CommandProcessor(R.Ring(memoryview(k.region)), ScsiDisk(MemImage(4096)), k.kick)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda k: struct.pack_into("<H", k.region, 0, 1), "version"),
        (lambda k: struct.pack_into("<I", k.region, 8, 1 << 30), "cmdr_size"),
    ],
)
def test_bad_mailbox(mutate, field):
    k = KernelRing()
    mutate(k)
    with pytest.raises(R.RingError, match=field):
        R.Ring(memoryview(k.region))


def test_bad_entries_are_reported_not_followed():
    k = KernelRing()
    ring = R.Ring(memoryview(k.region))
    k.queue(read10(0, 1), data_in=512)
    base = k.cmdr_off
    struct.pack_into("<QQ", k.region, base + 48, len(k.region) - 10, 512)  # iov outside the region
    with pytest.raises(R.RingError, match=r"iov\[0\]"):
        ring.fetch()
    k2 = KernelRing()
    ring2 = R.Ring(memoryview(k2.region))
    k2.queue(read10(0, 1), data_in=512)
    struct.pack_into("<I", k2.region, k2.cmdr_off, 0 | R.OP_CMD)  # zero length
    with pytest.raises(R.RingError, match="length"):
        ring2.fetch()
    k3 = KernelRing()
    ring3 = R.Ring(memoryview(k3.region))
    struct.pack_into("<I", k3.region, 12, 13)  # misaligned head
    with pytest.raises(R.RingError, match="cmd_head"):
        ring3.fetch()


def test_restart_picks_up_inflight_commands_from_tail():
    """Crash recovery: a new consumer starts at cmd_tail and completes what the old one had fetched."""
    k, img, proc = make()
    img.gate = threading.Event()
    cid = k.queue(read10(3, 1), data_in=512)
    proc.poll()  # the "old daemon" fetched it and then died before completing
    # new daemon: fresh Ring over the same memory
    img2 = MemImage(len(img.buf))
    img2.buf[:] = img.buf
    proc2 = CommandProcessor(R.Ring(memoryview(k.region)), ScsiDisk(img2), k.kick)
    assert proc2.poll() == 1
    assert proc2.drain(5)
    assert k.completions()[cid][2] == bytes(img.buf[1536:2048])
    img.gate.set()
    proc2.close()
    proc.close()
