"""The daemon's command loop behind the simulated UIO device (`tcmu.uio_sim`): a few hundred READ(10)/
READ(16) of 4 KiB and 128 KiB, WRITEs and UNMAPs through the real TcmuDevice (poll thread, workers, Ring,
ScsiDisk) over a shared mmap laid out as target_core_user.h; every byte checked. No timing."""

from __future__ import annotations

import random

from overlaybd.tcmu import uio_sim
from overlaybd.tcmu.backstore import TcmuDevice
from overlaybd.tcmu.scsi import DeviceInfo, ScsiDisk

SIZE = 4 << 20


class Disk:
    """An in-memory image (the BlockImage calls ScsiDisk makes)."""

    def __init__(self, rng: random.Random) -> None:
        self.buf = bytearray(rng.randbytes(SIZE))
        self.read_only = False
        self.name = "mem"

    def size(self) -> int:
        return SIZE

    def pread_into(self, view: memoryview, offset: int) -> int:
        view[:] = self.buf[offset : offset + len(view)]
        return len(view)

    def pwrite(self, data: memoryview, offset: int) -> int:
        self.buf[offset : offset + len(data)] = data
        return len(data)

    def discard(self, offset: int, length: int) -> None:
        self.buf[offset : offset + length] = bytes(length)

    def fsync(self) -> None:
        pass


def test_simulated_ring_reads_writes_unmaps_with_correct_data() -> None:
    rng = random.Random(7)
    disk = Disk(rng)
    expect = bytearray(disk.buf)  # the kernel side's model of the disk
    sim = uio_sim.SimKernel(cmdr_size=16384, data_size=1 << 20)  # small ring: many PAD wraps
    dev = TcmuDevice(sim.uio_device(), ScsiDisk(disk, DeviceInfo(max_transfer_blocks=2048)), workers=4)
    dev.start()
    bad: list[str] = []

    def on_done(cmd: uio_sim.SimCommand, data: memoryview) -> None:
        kind, off, n = cmd.tag  # type: ignore[misc]
        if cmd.status:
            bad.append(f"{kind} {off}+{n}: status {cmd.status} sense {cmd.sense.hex()}")
        elif kind == "read" and bytes(data[:n]) != expect[off : off + n]:
            bad.append(f"read {off}+{n}: wrong data")

    done = submitted = 0
    total = 400
    try:
        while done < total:
            queued = 0
            # writes/unmaps only when nothing is in flight, so the model's order is the disk's order
            while submitted < total and len(sim.inflight) < 16:
                kind = rng.choice(["r10", "r16", "r10big", "r16big", "write", "unmap"])
                if kind in ("write", "unmap") and sim.inflight:
                    break
                blocks = 256 if kind.endswith("big") else 8
                lba = rng.randrange(0, SIZE // 512 - blocks)
                off, n = lba * 512, blocks * 512
                if kind.startswith("r"):
                    cdb = uio_sim.read16(lba, blocks) if "16" in kind else uio_sim.read10(lba, blocks)
                    ok = sim.queue(cdb, n, None, ("read", off, n))
                elif kind == "write":
                    payload = rng.randbytes(n)
                    ok = sim.queue(uio_sim.write10(lba, blocks), n, payload, ("write", off, n))
                    if ok:
                        expect[off : off + n] = payload
                else:
                    params = uio_sim.unmap_params([(lba, blocks)])
                    ok = sim.queue(uio_sim.unmap(len(params)), len(params), params, ("unmap", off, n))
                    if ok:
                        expect[off : off + n] = bytes(n)
                if not ok:
                    break
                submitted += 1
                queued += 1
                if kind in ("write", "unmap"):
                    break
            if queued:
                sim.notify()
            assert sim.wait_kick(10), f"no completion ({done}/{total})"
            done += sim.reap(on_done)
    finally:
        dev.stop()
        sim.close()
    assert not bad, bad[:5]
    assert disk.buf == expect
