"""The merged view of read-only layers with an optional writable upper (format.md §1.7).

The lowers' indexes are merged once into a single lookup table (topmost mapping wins, holes
fall through), so a read costs one bisect whatever the depth. With an upper, its index is
consulted first and only its gaps are read from the lowers' table (upstream `ComboIndex`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import FormatError, ReadOnly
from .mapping import SECTOR, Mapping, merge_columns
from .readonly import ReadOnlyLayer
from .segments import SegmentTable, check_aligned, zero_fill
from .writable import WritableLayer

MAX_STACK_LAYERS = 255


def _check_chain(lowers: Sequence[ReadOnlyLayer], upper: WritableLayer | None) -> None:
    """uuid of each layer must be the parent_uuid of the one above it (upstream `check_order`)."""
    chain: list[ReadOnlyLayer | WritableLayer] = list(lowers) + ([upper] if upper is not None else [])
    for below, above in zip(chain[:-1], chain[1:], strict=True):
        if below.uuid.upper() != above.parent_uuid.upper():
            raise FormatError(
                above.name,
                "parent_uuid",
                f"{above.parent_uuid} does not match uuid {below.uuid} of the layer below ({below.name})",
            )


class Stack:
    """RandomAccessFile-like view of `lowers` (bottom..top) plus an optional writable `upper`.

    The Stack owns its layers: close() closes them all. Writes and discards go to the upper;
    without one they raise ReadOnly.
    """

    def __init__(
        self, lowers: Sequence[ReadOnlyLayer], upper: WritableLayer | None = None, check_order: bool = False
    ) -> None:
        if not lowers and upper is None:
            raise ValueError("a stack needs at least one layer")
        if len(lowers) > MAX_STACK_LAYERS:
            raise FormatError(lowers[-1].name, "layers", f"{len(lowers)} lower layers, at most {MAX_STACK_LAYERS}")
        if check_order:
            _check_chain(lowers, upper)
        self.lowers = list(lowers)
        self.upper = upper
        top_down = list(reversed(self.lowers))
        self.layers: list[ReadOnlyLayer | WritableLayer] = ([upper] if upper is not None else []) + top_down
        self.name = upper.name if upper is not None else (top_down[0].name if top_down else "")
        # vsize of the lowers: the topmost layer whose trailer has a non-zero virtual_size
        self.lower_vsize = next((la.vsize for la in top_down if la.vsize > 0), 0)
        self._lower_table = SegmentTable(
            merge_columns([la.index for la in top_down]), [la.file.pread_into for la in top_down]
        )
        self._lower_read = self._lower_table.read_into
        if upper is None:
            # read-only stack: the per-read path is one closure (see SegmentTable.fast_reader)
            general = Stack.pread_into.__get__(self)
            self.pread_into = self._lower_table.fast_reader(self.lower_vsize, general)  # type: ignore[method-assign,assignment]
        else:
            upper.rw_tag = len(self.lowers)
            if upper.vsize == 0 and self.lower_vsize:
                if upper.read_only:
                    upper.vsize = self.lower_vsize
                else:
                    upper.set_vsize(self.lower_vsize)

    @property
    def vsize(self) -> int:
        return self.upper.vsize if self.upper is not None else self.lower_vsize

    @property
    def read_only(self) -> bool:
        return self.upper is None or self.upper.read_only

    def size(self) -> int:
        return self.vsize

    def mappings(self) -> list[Mapping]:
        """The merged index; tag = position of the winning layer in `self.layers` (0 = top)."""
        per_layer = [la.index.columns() if isinstance(la, WritableLayer) else la.index for la in self.layers]
        return merge_columns(per_layer).to_mappings()

    def pread_into(self, buf: memoryview, offset: int) -> int:
        """Read virtual bytes into `buf`; short only at vsize; offset/length 512-aligned."""
        n = len(buf)
        if offset % SECTOR or n % SECTOR:
            check_aligned(self.name, offset, n)
        vsize = self.upper.vsize if self.upper is not None else self.lower_vsize
        if offset + n > vsize:
            n = max(0, vsize - offset)
            buf = buf[:n]
        if n:
            if self.upper is None:
                self._lower_read(buf, offset, zero_fill)
            else:
                self.upper.read_into(buf, offset, self._lower_read)
        return n

    def pread(self, size: int, offset: int) -> bytes:
        buf = bytearray(size)
        n = self.pread_into(memoryview(buf), offset)
        return bytes(buf[:n])

    def _writable(self, what: str) -> WritableLayer:
        if self.upper is None:
            raise ReadOnly(self.name, what, "stack has no writable upper layer")
        return self.upper

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        return self._writable("pwrite").pwrite(data, offset)

    def discard(self, offset: int, length: int) -> None:
        self._writable("discard").discard(offset, length)

    def fsync(self) -> None:
        if self.upper is not None and not self.upper.read_only:
            self.upper.fsync()

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Stack({len(self.lowers)} lowers, upper={self.upper!r}, vsize={self.vsize})"
