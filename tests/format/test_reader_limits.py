"""Format readers under hostile input (issue 14 item 9): one clear error in bounded time and memory.

Each case is a file a mutation fuzzer found: a trailer claiming a virtual size beyond the LSMT
maximum, a pax size of thousands of digits, a FIFO given as a layer, and a 1M-entry index whose
parsed form must stay compact however many layers of a stack hold it.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from array import array
from pathlib import Path

import pytest
from overlaybd.format.errors import FormatError
from overlaybd.format.fileio import LocalFile
from overlaybd.format.lsmt import open_ro
from overlaybd.format.lsmt.header import FLAG_DATA, FLAG_HEADER, FLAG_SEALED, MAX_VIRTUAL_SIZE, HeaderTrailer
from overlaybd.format.tarwrap import build_headers, open_tar, pax_record

BIN = Path(sys.executable).parent
VSIZE_AT = 48  # byte offset of virtual_size in the header/trailer struct (format.md §1.1)


def tool(name: str, *args: object, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / name), *map(str, args)], capture_output=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess[bytes], *needles: bytes) -> None:
    """Exit 1, exactly one short stderr line, no traceback, naming what it must."""
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and b"Traceback" not in r.stderr, r.stderr
    assert len(lines[0]) < 300, lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def with_trailer_vsize(vectors: Path, tmp_path: Path, vsize: int) -> Path:
    data = bytearray((vectors / "commit" / "L0.commit").read_bytes())
    struct.pack_into("<Q", data, len(data) - 4096 + VSIZE_AT, vsize)
    p = tmp_path / "huge.commit"
    p.write_bytes(data)
    return p


def test_trailer_vsize_beyond_lsmt_maximum_is_refused(vectors: Path, tmp_path: Path) -> None:
    p = with_trailer_vsize(vectors, tmp_path, MAX_VIRTUAL_SIZE + 512)
    with pytest.raises(FormatError) as e:
        open_ro(LocalFile(p))
    assert (e.value.path, e.value.field) == (str(p), "trailer.virtual_size")
    one_line_error(tool("overlaybd-dump", "--sha256", p), str(p).encode(), b"trailer.virtual_size")


def test_trailer_vsize_at_the_maximum_opens(vectors: Path, tmp_path: Path) -> None:
    p = with_trailer_vsize(vectors, tmp_path, MAX_VIRTUAL_SIZE)
    with open_ro(LocalFile(p)) as layer:
        assert layer.size() == MAX_VIRTUAL_SIZE


def pax_tar(record: bytes) -> bytes:
    """A tar wrapper whose pax header holds `record` (header size field and checksum fixed up)."""
    pad = -len(record) % 512
    hdrs = bytearray(build_headers(10)[:512])
    hdrs[124:136] = b"%11o " % len(record)
    hdrs[148:156] = b" " * 8
    hdrs[148:156] = b"%6o \0" % sum(hdrs[:512])
    return bytes(hdrs) + record + bytes(pad) + build_headers(10)[1024:] + bytes(1024)


@pytest.mark.parametrize("digits", [21, 4301, 6000])
def test_pax_size_with_too_many_digits(tmp_path: Path, digits: int) -> None:
    record = pax_record("size", "9" * digits)
    p = tmp_path / "bad.tar"
    p.write_bytes(pax_tar(record))
    with pytest.raises(FormatError) as e:
        open_tar(LocalFile(p))
    assert (e.value.path, e.value.field) == (str(p), "pax size")
    assert f"{digits}-digit" in e.value.message and len(str(e.value)) < 200  # the number is not echoed whole
    one_line_error(tool("overlaybd-info", p), b"pax size")


def test_pax_record_length_with_too_many_digits(tmp_path: Path) -> None:
    record = b"1" * 5000 + b" size=1\n"
    p = tmp_path / "bad.tar"
    p.write_bytes(pax_tar(record))
    with pytest.raises(FormatError) as e:
        open_tar(LocalFile(p))
    assert e.value.field == "pax record" and len(str(e.value)) < 200


@pytest.mark.parametrize("name", ["overlaybd-info", "overlaybd-dump"])
def test_fifo_is_refused_at_once(tmp_path: Path, name: str) -> None:
    fifo = tmp_path / "layer.fifo"
    os.mkfifo(fifo)
    with pytest.raises(FormatError) as e:
        LocalFile(fifo)
    assert e.value.field == "file" and "FIFO" in e.value.message
    args = ("--sha256", fifo) if name == "overlaybd-dump" else (fifo,)
    one_line_error(tool(name, *args, timeout=20), str(fifo).encode(), b"not a regular file")


# ---- memory of big indexes ------------------------------------------------------------------------------------------
ENTRIES = 1_000_000


def write_big_layer(path: Path, n: int) -> int:
    """A committed layer with `n` one-sector mappings (data and zeroed alternating) with one-sector
    holes between them, so none can be joined; returns its virtual size."""
    words = array("Q", [0]) * (2 * n)
    words[0::2] = array("Q", (2 * i | 1 << 50 for i in range(n)))
    words[1::2] = array("Q", (8 | (i & 1) << 55 for i in range(n)))
    vsize = 2 * n * 512
    with open(path, "wb") as f:
        f.write(HeaderTrailer(FLAG_HEADER | FLAG_DATA | FLAG_SEALED, virtual_size=vsize).pack())
        f.write(b"\xab" * 512)
        f.write(words.tobytes())
        f.write(HeaderTrailer(FLAG_DATA | FLAG_SEALED, 4096 + 512, n, vsize).pack())
    return vsize


# The peak RSS of a child process in MiB: its own VmHWM; ru_maxrss (getrusage) would include the
# forking pytest's peak, which Linux keeps across exec.
_PEAK = "int(next(x for x in open('/proc/self/status') if x.startswith('VmHWM:')).split()[1]) // 1024"

# open the layer k times as the lowers of one stack, read across it, print max RSS in MiB
_MEASURE = textwrap.dedent(
    """
    import sys
    from overlaybd.format import lsmt
    from overlaybd.format.fileio import LocalFile

    path, k = sys.argv[1], int(sys.argv[2])
    stack = lsmt.Stack([lsmt.open_ro(LocalFile(path)) for _ in range(k)])
    buf = memoryview(bytearray(1 << 20))
    vsize = stack.size()
    for off in range(0, vsize, vsize // 16):
        assert stack.pread_into(buf, off) == len(buf)
    stack.pread_into(buf, 0)
    assert bytes(buf[:2048]) == b"\\xab" * 512 + bytes(1536)  # data, hole, zeroed, hole
    print(PEAK)
    """
).replace("PEAK", _PEAK)


@pytest.fixture(scope="module")
def big_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.commit"
    write_big_layer(path, ENTRIES)
    return path


@pytest.mark.parametrize("layers,limit_mib", [(1, 80), (4, 180)])
def test_big_index_memory_is_bounded(big_layer: Path, layers: int, limit_mib: int) -> None:
    """1M entries, max RSS of the whole process: 336 MiB (one layer) and 1102 MiB (stacked x4)
    with the index as Python lists; ~51 and ~126 MiB with compact arrays shared by the read path."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(big_layer), str(layers)], capture_output=True, timeout=180)
    assert r.returncode == 0, r.stderr.decode()
    peak = int(r.stdout)
    assert peak < limit_mib, f"max RSS {peak} MiB with {layers} x {ENTRIES} entries"


def test_big_index_info_is_bounded(big_layer: Path) -> None:
    """overlaybd-info counts the index from its compact form (no Mapping per entry)."""
    script = (
        "import sys; from overlaybd.cli.info import describe; "
        "facts = describe(sys.argv[1]); assert facts['lsmt']['index']['entries'] == int(sys.argv[2]), facts; "
        f"print({_PEAK})"
    )
    r = subprocess.run([sys.executable, "-c", script, str(big_layer), str(ENTRIES)], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert int(r.stdout) < 100
