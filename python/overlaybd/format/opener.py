"""Open any overlaybd layer blob the way upstream does: tar -> ZFile -> LSMT.

A registry blob is usually a tar wrapper around a ZFile around an LSMT layer,
but each wrapper is optional. Peeling is attempted in exactly upstream's order
(tar first, then ZFile), so a ZFile inside a tar opens and a tar inside a ZFile
does not — as upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .fileio import RandomAccessFile
from .tarwrap import open_tar
from .zfile import open_zfile
from .zfile.header import HT_SIZE, has_magic

if TYPE_CHECKING:
    from .lsmt import ReadOnlyLayer


def unwrap(f: RandomAccessFile, verify: bool = True) -> RandomAccessFile:
    """The innermost (LSMT) byte view of `f`: tar payload, then ZFile contents, if present.

    `verify` is the ZFile evict-and-retry switch. The returned object owns `f` (closing it closes `f`).
    A file carrying the ZFile magic is opened as a ZFile even if its header is damaged, so the
    error names the real problem (e.g. the header digest) instead of "not an LSMT layer".
    """
    payload = open_tar(f)
    if payload is not None:
        f = payload
    if f.size() >= HT_SIZE and has_magic(f.pread(24, 0)):
        f = open_zfile(f, verify=verify)
    return f


def open_layer(f: RandomAccessFile, verify: bool = True) -> "ReadOnlyLayer":
    """A read-only LSMT layer from any blob form (plain, ZFile, tar-wrapped)."""
    from .lsmt import open_ro

    return open_ro(unwrap(f, verify=verify))
