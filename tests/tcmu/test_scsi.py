"""SCSI emulation: every opcode, sense data for every error, malformed CDBs."""

from __future__ import annotations

import struct

import pytest
from helpers.tcmu_fakes import MemImage
from overlaybd.format.errors import BadChecksum, ReadOnly
from overlaybd.tcmu import scsi as S

SIZE = 8 << 20
NUM = SIZE // 512


def disk(read_only=False, **kw):
    img = MemImage(SIZE, read_only=read_only)
    img.buf[:] = bytes((i * 7 + 3) & 255 for i in range(256 * 512)) * (SIZE // (256 * 512))
    return img, S.ScsiDisk(img, S.DeviceInfo(serial="3f0c8a1e-demo", **kw))


def run(d, cdb: bytes, out: bytes = b"", data_in: int = 0):
    buf = bytearray(out) if out else bytearray(data_in)
    status, sense = d.execute(cdb, [memoryview(buf)] if buf else [])
    return status, sense, bytes(buf)


def key_asc(sense: bytes) -> tuple[int, int, int]:
    return sense[2] & 0xF, sense[12], sense[13]


def rw(op: int, lba: int, n: int) -> bytes:
    if op in (S.READ_6, S.WRITE_6):
        return bytes([op, (lba >> 16) & 0x1F, (lba >> 8) & 255, lba & 255, n & 255, 0])
    if op in (S.READ_10, S.WRITE_10):
        return struct.pack(">BBIBHB", op, 0, lba, 0, n, 0)
    if op in (S.READ_12, S.WRITE_12):
        return struct.pack(">BBIIBB", op, 0, lba, n, 0, 0)
    return struct.pack(">BBQIBB", op, 0, lba, n, 0, 0)


def test_sense_layout():
    s = S.sense_fixed(S.MEDIUM_ERROR, S.ASC_UNRECOVERED_READ_ERROR, 0x1234)
    assert len(s) == 18 and s[0] == 0xF0 and s[2] == 3 and s[7] == 10 and s[12:14] == b"\x11\x00"
    assert s[3:7] == b"\x00\x00\x12\x34"


def test_test_unit_ready_and_friends():
    _, d = disk()
    for cdb in (bytes(6), bytes([S.START_STOP_UNIT, 0, 0, 0, 1, 0]), bytes([S.PREVENT_ALLOW, 0, 0, 0, 0, 0])):
        assert run(d, cdb)[0] == S.GOOD
    st, _, data = run(d, bytes([S.REQUEST_SENSE, 0, 0, 0, 18, 0]), data_in=18)
    assert st == S.GOOD and data[0] == 0x70 and data[2] == 0


def test_standard_inquiry():
    _, d = disk()
    st, _, data = run(d, bytes([S.INQUIRY, 0, 0, 0, 96, 0]), data_in=96)
    assert st == S.GOOD
    assert data[0] == 0 and data[2] == 5 and data[8:16] == b"LIO-ORG " and data[16:32] == b"TCMU device     "
    assert data[32:36] == b"0002" and data[4] == 31


def vpd(d, page: int, alloc: int = 255) -> bytes:
    st, sense, data = run(d, bytes([S.INQUIRY, 1, page, 0, alloc, 0]), data_in=alloc)
    assert st == S.GOOD, sense
    return data[: 4 + struct.unpack_from(">H", data, 2)[0]]


def test_vpd_pages():
    _, d = disk(max_transfer_blocks=2048)
    assert vpd(d, 0x00)[4:] == bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
    assert vpd(d, 0x80)[4:] == b"3f0c8a1e-demo"
    p83 = vpd(d, 0x83)
    assert p83[4:8] == bytes([0x02, 0x01, 0, 21]) and p83[8:29] == b"LIO-ORG 3f0c8a1e-demo"
    assert p83[29:33] == bytes([0x01, 0x03, 0, 16]) and p83[33] >> 4 == 6
    b0 = vpd(d, 0xB0)
    assert struct.unpack_from(">H", b0, 2)[0] == 0x3C and b0[4] & 1  # WSNZ
    assert struct.unpack_from(">I", b0, 8)[0] == 2048
    assert struct.unpack_from(">II", b0, 20) == (S.MAX_UNMAP_LBAS, 4)
    assert struct.unpack_from(">Q", b0, 36)[0] == 0xFFFFFFFF
    assert struct.unpack_from(">H", vpd(d, 0xB1), 4)[0] == 1
    b2 = vpd(d, 0xB2)
    assert b2[5] & 0xE0 == 0xE0 and b2[5] & 0x04  # LBPU LBPWS LBPWS10, LBPRZ


def test_inquiry_invalid_fields():
    _, d = disk()
    for cdb in (bytes([S.INQUIRY, 1, 0x99, 0, 255, 0]), bytes([S.INQUIRY, 0, 0x80, 0, 255, 0])):
        st, sense, _ = run(d, cdb, data_in=255)
        assert st == S.CHECK_CONDITION and key_asc(sense) == (5, 0x24, 0)


def test_inquiry_allocation_length_cuts_data():
    _, d = disk()
    buf = bytearray(64)
    assert d.execute(bytes([S.INQUIRY, 0, 0, 0, 8, 0]), [memoryview(buf)])[0] == S.GOOD
    assert buf[8:] == bytes(56)


def test_read_capacity():
    _, d = disk()
    st, _, data = run(d, bytes(10).replace(b"\0", bytes([S.READ_CAPACITY_10]), 1), data_in=8)
    assert st == S.GOOD and struct.unpack(">II", data) == (NUM - 1, 512)
    cdb = struct.pack(">BBQIBB", S.SERVICE_ACTION_IN_16, S.SAI_READ_CAPACITY_16, 0, 32, 0, 0)
    st, _, data = run(d, cdb, data_in=32)
    assert st == S.GOOD and struct.unpack_from(">QI", data) == (NUM - 1, 512) and data[14] == 0xC0
    st, sense, _ = run(d, struct.pack(">BBQIBB", S.SERVICE_ACTION_IN_16, 0x11, 0, 32, 0, 0), data_in=32)
    assert key_asc(sense) == (5, 0x24, 0)


@pytest.mark.parametrize("ro", [False, True])
def test_mode_sense_reports_write_protect(ro):
    _, d = disk(read_only=ro)
    st, _, data = run(d, bytes([S.MODE_SENSE_6, 0, 0x3F, 0, 255, 0]), data_in=255)
    assert st == S.GOOD and bool(data[2] & 0x80) == ro and data[0] == 3 + 20 + 12
    assert data[4] == 0x08 and data[24] == 0x0A
    st, _, data = run(d, struct.pack(">BBBBxxxHB", S.MODE_SENSE_10, 0, 0x08, 0, 255, 0), data_in=255)
    assert st == S.GOOD and bool(data[3] & 0x80) == ro and struct.unpack_from(">H", data)[0] == 6 + 20
    assert data[8] == 0x08 and not data[10] & 0x04  # WCE off
    st, sense, _ = run(d, bytes([S.MODE_SENSE_6, 0, 0x1C, 0, 255, 0]), data_in=255)
    assert key_asc(sense) == (5, 0x24, 0)
    st, sense, _ = run(d, bytes([S.MODE_SENSE_6, 0, 0xC8, 0, 255, 0]), data_in=255)
    assert key_asc(sense) == (5, 0x39, 0)


def test_mode_select():
    _, d = disk()
    _, _, sensed = run(d, bytes([S.MODE_SENSE_6, 0, 0x08, 0, 255, 0]), data_in=255)
    params = bytes(4) + sensed[4:24]
    assert run(d, bytes([S.MODE_SELECT_6, 0x10, 0, 0, len(params), 0]), out=params)[0] == S.GOOD
    changed = bytearray(params)
    changed[6] |= 0x04  # try to turn on WCE
    _st, sense, _ = run(d, bytes([S.MODE_SELECT_6, 0x10, 0, 0, len(changed), 0]), out=bytes(changed))
    assert key_asc(sense) == (5, 0x26, 0)
    _st, sense, _ = run(d, bytes([S.MODE_SELECT_6, 0x11, 0, 0, len(params), 0]), out=params)  # SP
    assert key_asc(sense) == (5, 0x24, 0)
    _st, sense, _ = run(d, bytes([S.MODE_SELECT_6, 0x10, 0, 0, 2, 0]), out=b"\0\0")
    assert key_asc(sense) == (5, 0x1A, 0)
    params10 = bytes(8) + sensed[4:24]
    cdb10 = struct.pack(">BBxxxxxHB", S.MODE_SELECT_10, 0x10, len(params10), 0)
    assert run(d, cdb10, out=params10)[0] == S.GOOD


@pytest.mark.parametrize(
    "rop, wop", [(S.READ_6, S.WRITE_6), (S.READ_10, S.WRITE_10), (S.READ_12, S.WRITE_12), (S.READ_16, S.WRITE_16)]
)
def test_read_write_all_sizes(rop, wop):
    img, d = disk()
    st, _, data = run(d, rw(rop, 10, 3), data_in=1536)
    assert st == S.GOOD and data == bytes(img.buf[5120 : 5120 + 1536])
    payload = bytes([0xAB]) * 1024
    assert run(d, rw(wop, 20, 2), out=payload)[0] == S.GOOD
    assert bytes(img.buf[10240 : 10240 + 1024]) == payload


def test_read6_zero_blocks_means_256():
    img, d = disk()
    st, _, data = run(d, rw(S.READ_6, 0, 0), data_in=256 * 512)
    assert st == S.GOOD and data == bytes(img.buf[: 256 * 512])


def test_out_of_range_and_short_buffer():
    _, d = disk()
    st, sense, _ = run(d, rw(S.READ_16, NUM - 1, 2), data_in=1024)
    assert st == S.CHECK_CONDITION and key_asc(sense) == (5, 0x21, 0)
    st, sense, _ = run(d, rw(S.READ_10, 0, 4), data_in=1024)
    assert key_asc(sense) == (5, 0x24, 0)


def test_failed_read_is_medium_error_with_lba():
    img, d = disk()
    img.fail_reads = True
    _st, sense, _ = run(d, rw(S.READ_10, 77, 1), data_in=512)
    assert key_asc(sense) == (3, 0x11, 0) and sense[0] & 0x80 and struct.unpack_from(">I", sense, 3)[0] == 77


def test_corrupt_data_is_medium_error_not_retried():
    img, d = disk(read_retry_seconds=60)
    img.fail_reads = BadChecksum("layer.zf", "block 3", "crc mismatch")
    _st, sense, _ = run(d, rw(S.READ_16, 9, 1), data_in=512)
    assert key_asc(sense) == (3, 0x11, 0) and struct.unpack_from(">I", sense, 3)[0] == 9


def test_transient_read_errors_are_retried():
    img, d = disk(read_retry_seconds=5)
    calls = []
    real = img.pread_into

    def flaky(view, offset):
        calls.append(offset)
        if len(calls) < 3:
            raise OSError(110, "timed out")
        return real(view, offset)

    img.pread_into = flaky
    st, _, data = run(d, rw(S.READ_10, 4, 1), data_in=512)
    assert st == S.GOOD and len(calls) == 3 and data == bytes(img.buf[2048:2560])


def test_image_readonly_error_is_write_protect():
    img, d = disk()
    img.fail_writes = ReadOnly("cfg", "upper", "no writable layer")
    _st, sense, _ = run(d, rw(S.WRITE_10, 5, 1), out=bytes(512))
    assert key_asc(sense) == (7, 0x27, 0)


def test_failed_write_is_medium_error():
    img, d = disk()
    img.fail_writes = True
    _st, sense, _ = run(d, rw(S.WRITE_10, 5, 1), out=bytes(512))
    assert key_asc(sense) == (3, 0x0C, 0)


def test_read_only_image_rejects_every_modification():
    img, d = disk(read_only=True)
    for cdb, out in [
        (rw(S.WRITE_10, 0, 1), bytes(512)),
        (struct.pack(">BBIBHB", S.WRITE_SAME_10, 0x08, 0, 0, 1, 0), bytes(512)),
        (struct.pack(">BBxxxxxHB", S.UNMAP, 0, 24, 0), struct.pack(">HH4xQI4x", 22, 16, 0, 1)),
    ]:
        st, sense, _ = run(d, cdb, out=out)
        assert st == S.CHECK_CONDITION and key_asc(sense) == (7, 0x27, 0)
    assert run(d, struct.pack(">BBIBHB", S.SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0))[0] == S.GOOD
    assert img.fsyncs == 0


def test_sync_cache_and_verify():
    img, d = disk()
    assert run(d, struct.pack(">BBIBHB", S.SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0))[0] == S.GOOD
    assert run(d, struct.pack(">BBQIBB", S.SYNCHRONIZE_CACHE_16, 0, 0, 0, 0, 0))[0] == S.GOOD
    assert img.fsyncs == 2
    assert run(d, struct.pack(">BBIBHB", S.VERIFY_10, 0, 0, 0, 8, 0))[0] == S.GOOD


def test_write_same():
    img, d = disk()
    st, _, _ = run(d, struct.pack(">BBIBHB", S.WRITE_SAME_10, 0x08, 8, 0, 16, 0), out=bytes(512))
    assert st == S.GOOD and img.discards == [(4096, 8192)]
    st, _, _ = run(d, struct.pack(">BBQIBB", S.WRITE_SAME_16, 0, 100, 3, 0, 0), out=bytes(512))
    assert st == S.GOOD and img.discards[-1] == (51200, 1536)  # zeros -> discard (LBPRZ)
    pattern = bytes(range(256)) * 2
    st, _, _ = run(d, struct.pack(">BBQIBB", S.WRITE_SAME_16, 0, 200, 3, 0, 0), out=pattern)
    assert st == S.GOOD and bytes(img.buf[102400 : 102400 + 1536]) == pattern * 3
    st, sense, _ = run(d, struct.pack(">BBIBHB", S.WRITE_SAME_10, 0x08, 8, 0, 0, 0), out=bytes(512))
    assert key_asc(sense) == (5, 0x24, 0)  # WSNZ
    st, sense, _ = run(d, struct.pack(">BBQIBB", S.WRITE_SAME_16, 0x08, NUM - 1, 2, 0, 0), out=bytes(512))
    assert key_asc(sense) == (5, 0x21, 0)


def unmap_params(*ranges, desc_len=None, data_len=None):
    desc = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    dl = len(desc) if desc_len is None else desc_len
    return struct.pack(">HH4x", 6 + dl if data_len is None else data_len, dl) + desc


def test_unmap():
    img, d = disk()
    p = unmap_params((8, 8), (100, 1))
    st, _, _ = run(d, struct.pack(">BBxxxxxHB", S.UNMAP, 0, len(p), 0), out=p)
    assert st == S.GOOD and img.discards == [(4096, 4096), (51200, 512)]
    assert bytes(img.buf[4096:8192]) == bytes(4096)


@pytest.mark.parametrize(
    "params, cdb_len, asc",
    [
        (unmap_params((NUM, 1)), None, 0x21),
        (unmap_params(*[(i, 1) for i in range(5)]), None, 0x26),  # more than 4 descriptors
        (unmap_params((0, 1), desc_len=15), None, 0x26),
        (unmap_params((0, 1), data_len=3), None, 0x26),
        (b"\0" * 4, 4, 0x1A),
        (unmap_params((0, 1)), 200, 0x1A),
    ],
)
def test_unmap_malformed(params, cdb_len, asc):
    img, d = disk()
    cdb = struct.pack(">BBxxxxxHB", S.UNMAP, 0, len(params) if cdb_len is None else cdb_len, 0)
    st, sense, _ = run(d, cdb, out=params)
    assert st == S.CHECK_CONDITION and key_asc(sense)[1] == asc and not img.discards


def test_unmap_anchor_and_empty():
    _img, d = disk()
    p = unmap_params((0, 1))
    _st, sense, _ = run(d, struct.pack(">BBxxxxxHB", S.UNMAP, 1, len(p), 0), out=p)
    assert key_asc(sense) == (5, 0x24, 0)
    assert run(d, struct.pack(">BBxxxxxHB", S.UNMAP, 0, 0, 0))[0] == S.GOOD


@pytest.mark.parametrize("cdb", [bytes([0xA3, 0x0C] + [0] * 10), bytes([0x04] + [0] * 5), bytes([0xFF] * 16), b""])
def test_unknown_opcode(cdb):
    _, d = disk()
    st, sense, _ = run(d, cdb, data_in=64)
    assert st == S.CHECK_CONDITION and key_asc(sense) == (5, 0x20, 0)


@pytest.mark.parametrize("op", [S.READ_10, S.WRITE_16, S.INQUIRY, S.MODE_SENSE_10, S.UNMAP, S.SERVICE_ACTION_IN_16])
def test_truncated_cdb_is_invalid_field(op):
    _, d = disk()
    st, sense, _ = run(d, bytes([op, 0, 0]), data_in=512)
    assert st == S.CHECK_CONDITION and key_asc(sense) == (5, 0x24, 0)
