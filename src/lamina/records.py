"""The store's records: one SQLite database in WAL mode, ``ROOT/meta.db``.

Why SQLite: per-layer records must change in small transactions from many processes at
once (the CLI's ``mount`` and ``umount`` are separate processes; the plugin serves
requests in threads), and a crash must never leave a half-written index. WAL gives
readers that never block and one short writer at a time; ``BEGIN IMMEDIATE`` makes each
check-then-change step atomic across processes. Long work (unpacking a tar, deleting a
tree) never happens inside a transaction: the record says ``creating`` or ``removing``
while it runs, and a per-layer file lock says whether its process is still alive.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    id          TEXT PRIMARY KEY,
    parent      TEXT,
    rw          INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('creating', 'ready', 'removing')),
    created     REAL NOT NULL,
    size        INTEGER,
    mount_label TEXT NOT NULL DEFAULT '',
    size_limit  INTEGER,
    tarsplit    INTEGER NOT NULL DEFAULT 0,
    diff_id     TEXT
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
CREATE TABLE IF NOT EXISTS mounts (
    id      TEXT PRIMARY KEY,
    path    TEXT NOT NULL,
    boot_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refs (
    ref        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    pid_start  TEXT NOT NULL,
    persistent INTEGER NOT NULL,
    boot_id    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS refs_id ON refs(id);
"""


@dataclass(frozen=True)
class LayerRecord:
    """What the store knows about one layer."""

    id: str
    parent: str | None
    rw: bool
    state: str
    created: float
    size: int | None
    mount_label: str
    size_limit: int | None
    has_tarsplit: bool
    diff_id: str | None = None
    mount_count: int = 0

    @property
    def complete(self) -> bool:
        return self.state == "ready"

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "parent": self.parent,
            "kind": "rw" if self.rw else "ro",
            "state": self.state,
            "created": self.created,
            "size": self.size,
            "size_limit": self.size_limit,
            "diff_id": self.diff_id,
            "mounts": self.mount_count,
        }


class Records:
    """Thread-safe access to ``meta.db``; every write goes through :meth:`write`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=60000")
        with self.write() as db:
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                db.execute(stmt)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One atomic read-check-write step, serialised across threads and processes.

        ``durable=False`` skips the fsync at commit (still atomic, still crash-safe for a
        killed process). For mount references only: they belong to one boot and are reset
        after a reboot, so surviving a power loss would buy nothing, and get/put sit on
        every container start.
        """
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                else:
                    self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for reading several rows."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    # -- queries used by the store ------------------------------------------------

    @staticmethod
    def get(db: sqlite3.Connection, layer_id: str) -> LayerRecord | None:
        row = db.execute(
            "SELECT id, parent, rw, state, created, size, mount_label, size_limit, tarsplit,"
            " diff_id, (SELECT COUNT(*) FROM refs WHERE refs.id = layers.id)"
            " FROM layers WHERE id = ?",
            (layer_id,),
        ).fetchone()
        return _record(row) if row else None

    @staticmethod
    def all(db: sqlite3.Connection) -> list[LayerRecord]:
        rows = db.execute(
            "SELECT id, parent, rw, state, created, size, mount_label, size_limit, tarsplit,"
            " diff_id, (SELECT COUNT(*) FROM refs WHERE refs.id = layers.id)"
            " FROM layers ORDER BY created, id"
        ).fetchall()
        return [_record(r) for r in rows]

    @staticmethod
    def children(db: sqlite3.Connection, layer_id: str) -> list[str]:
        return [r[0] for r in db.execute("SELECT id FROM layers WHERE parent = ? ORDER BY id", (layer_id,))]

    @staticmethod
    def insert(db: sqlite3.Connection, layer_id: str, parent: str | None, rw: bool,
               mount_label: str, size_limit: int | None) -> None:
        db.execute(
            "INSERT INTO layers (id, parent, rw, state, created, mount_label, size_limit)"
            " VALUES (?, ?, ?, 'creating', ?, ?, ?)",
            (layer_id, parent, int(rw), time.time(), mount_label, size_limit),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(row: tuple) -> LayerRecord:  # type: ignore[type-arg]
    return LayerRecord(
        id=row[0], parent=row[1], rw=bool(row[2]), state=row[3], created=row[4], size=row[5],
        mount_label=row[6], size_limit=row[7], has_tarsplit=bool(row[8]), diff_id=row[9],
        mount_count=row[10],
    )
