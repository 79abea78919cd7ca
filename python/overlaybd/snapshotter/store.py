"""SQLite metadata of the snapshots (what upstream keeps in bolt `metadata.db`).

Why SQLite: stdlib, crash-safe (WAL + synchronous=FULL), and one `BEGIN IMMEDIATE` per RPC
gives each RPC all-or-nothing semantics. The numeric `id` (AUTOINCREMENT, never reused)
names the snapshot's directory `snapshots/<id>`, so a directory left by a crash between
mkdir and COMMIT can be told apart from a live one on the next start.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import NotFound

VIEW, ACTIVE, COMMITTED = 1, 2, 3
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL DEFAULT '',
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""


@dataclass
class Snapshot:
    """One row: `key` is the active key or the committed name (one namespace, like bolt)."""

    id: int
    key: str
    parent: str
    kind: int
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 0
    inodes: int = 0


def _row(r: sqlite3.Row) -> Snapshot:
    return Snapshot(
        r["id"],
        r["key"],
        r["parent"],
        r["kind"],
        r["created_ns"],
        r["updated_ns"],
        json.loads(r["labels"]),
        r["size"],
        r["inodes"],
    )


def now_ns() -> int:
    return time.time_ns()


class Store:
    """Thread-safe access to metadata.db; use `with store.transaction() as tx:` per RPC."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Serialised read-write transaction: committed on normal exit, rolled back on exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


class Transaction:
    """Row operations inside one transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def find(self, key: str) -> Snapshot | None:
        r = self.db.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
        return _row(r) if r else None

    def get(self, key: str) -> Snapshot:
        s = self.find(key)
        if s is None:
            raise NotFound(f"snapshot {key} does not exist: not found")
        return s

    def all(self) -> list[Snapshot]:
        return [_row(r) for r in self.db.execute("SELECT * FROM snapshots ORDER BY id")]

    def insert(self, key: str, parent: str, kind: int, labels: dict[str, str]) -> Snapshot:
        t = now_ns()
        cur = self.db.execute(
            "INSERT INTO snapshots (key, parent, kind, created_ns, updated_ns, labels) VALUES (?, ?, ?, ?, ?, ?)",
            (key, parent, kind, t, t, json.dumps(labels, sort_keys=True)),
        )
        assert cur.lastrowid is not None  # an INSERT always sets it
        return Snapshot(cur.lastrowid, key, parent, kind, t, t, dict(labels))

    def save(self, s: Snapshot) -> None:
        """Write back every mutable column of `s` (matched by id)."""
        self.db.execute(
            "UPDATE snapshots SET key=?, parent=?, kind=?, created_ns=?, updated_ns=?, labels=?, size=?, inodes=? "
            "WHERE id=?",
            (
                s.key,
                s.parent,
                s.kind,
                s.created_ns,
                s.updated_ns,
                json.dumps(s.labels, sort_keys=True),
                s.size,
                s.inodes,
                s.id,
            ),
        )

    def delete(self, sid: int) -> None:
        self.db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))

    def has_children(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1", (key,)).fetchone() is not None

    def chain(self, key: str) -> list[Snapshot]:
        """`key` and its ancestors, nearest first."""
        out: list[Snapshot] = []
        while key:
            s = self.get(key)
            out.append(s)
            key = s.parent
        return out
