"""The store's records: one SQLite database in WAL mode, ``ROOT/meta.db``.

Why SQLite: per-layer records must change in small transactions from many processes at
once (the CLI's ``mount`` and ``umount`` are separate processes; the plugin serves
requests in threads), and a crash must never leave a half-written index. WAL gives
readers that never block and one short writer at a time; ``BEGIN IMMEDIATE`` makes each
check-then-change step atomic across processes. Long work (unpacking a tar, deleting a
tree, a kernel mount) never happens inside a transaction: the record says ``creating``
or ``removing`` while it runs, and a per-layer file lock says whether its process is
still alive.

Every SQL statement of lamina's layer store is in this module. Callers get a
:class:`Reader` (inside :meth:`Records.read`) or a :class:`Writer` (inside
:meth:`Records.write`) whose methods are the operations the store needs, named for what
they mean; nobody else sees the connection, so the schema can change here alone.

Four tables:

* ``layers``: one row per layer, its parent, kind and :class:`LayerState`;
* ``refs``: one row per mount reference (who took it, in which boot);
* ``mounts``: where each mounted layer's view is, and in which boot it was mounted;
* ``snapshots``: the containerd face's key space, each key or committed name mapped to
  the layer that holds it (:class:`SnapshotRecord`).
"""

from __future__ import annotations

import contextlib
import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lamina.errors import LayerNotFound, StoreCorrupt


class LayerState(enum.StrEnum):
    """Where a layer is in its life; only ``READY`` layers are visible.

    The values are what ``meta.db`` holds, so they never change.
    """

    #: being made, or re-filled by an apply: the maker holds the layer's lock; a record
    #: in this state whose lock is free is what a crash left (cleanup drops it)
    CREATING = "creating"
    #: complete: visible to exists, ls and every operation
    READY = "ready"
    #: marked for removal, content possibly half deleted (cleanup finishes the job)
    REMOVING = "removing"


#: the schema, one list of statements per version: a database at version N gets the
#: lists after N applied in order, so a new table is a new step, never an edit of an
#: old one (an old store opened by a newer lamina is upgraded in place)
_STEPS: list[list[str]] = [
    [
        f"""CREATE TABLE IF NOT EXISTS layers (
            id          TEXT PRIMARY KEY,
            parent      TEXT,
            rw          INTEGER NOT NULL,
            state       TEXT NOT NULL CHECK (state IN ({", ".join(repr(s.value) for s in LayerState)})),
            created     REAL NOT NULL,
            size        INTEGER,
            mount_label TEXT NOT NULL DEFAULT '',
            size_limit  INTEGER,
            tarsplit    INTEGER NOT NULL DEFAULT 0,
            diff_id     TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent)",
        """CREATE TABLE IF NOT EXISTS mounts (
            id      TEXT PRIMARY KEY,
            path    TEXT NOT NULL,
            boot_id TEXT NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS refs (
            ref        INTEGER PRIMARY KEY AUTOINCREMENT,
            id         TEXT NOT NULL,
            pid        INTEGER NOT NULL,
            pid_start  TEXT NOT NULL,
            persistent INTEGER NOT NULL,
            boot_id    TEXT NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS refs_id ON refs(id)",
    ],
    [
        """CREATE TABLE IF NOT EXISTS snapshots (
            key          TEXT PRIMARY KEY,
            layer        TEXT NOT NULL UNIQUE,
            kind         TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
            parent       TEXT,
            labels       TEXT NOT NULL DEFAULT '{}',
            created_ns   INTEGER NOT NULL,
            updated_ns   INTEGER NOT NULL,
            usage_size   INTEGER,
            usage_inodes INTEGER
        )""",
        "CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent)",
    ],
]
SCHEMA_VERSION = len(_STEPS)


def steps_after(version: int) -> list[str]:
    """The statements that bring a database at ``version`` to :data:`SCHEMA_VERSION`.

    Steps are written to be no-ops where their tables exist already (a version-0 file
    may be a store from before versions were kept). A newer lamina's database (a higher
    version) gets nothing and keeps its version: its steps only ever add.
    """
    return [statement for step in _STEPS[version:] for statement in step]


@dataclass(frozen=True)
class LayerRecord:
    """What the store knows about one layer."""

    id: str
    parent: str | None
    rw: bool
    state: LayerState
    created: float
    size: int | None
    mount_label: str
    size_limit: int | None
    has_tarsplit: bool
    diff_id: str | None = None
    mount_count: int = 0

    @property
    def complete(self) -> bool:
        return self.state is LayerState.READY

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "parent": self.parent,
            "kind": "rw" if self.rw else "ro",
            "state": self.state.value,
            "created": self.created,
            "size": self.size,
            "size_limit": self.size_limit,
            "diff_id": self.diff_id,
            "mounts": self.mount_count,
        }


@dataclass(frozen=True)
class MountRef:
    """One mount reference: who took it (pid and start time), and in which boot."""

    ref: int
    layer: str
    pid: int
    pid_start: str
    persistent: bool
    boot_id: str


@dataclass(frozen=True)
class MountRecord:
    """Where a layer's view is mounted, and in which boot that happened."""

    layer: str
    path: str
    boot_id: str


@dataclass(frozen=True)
class SnapshotRecord:
    """A containerd snapshot: its key (or committed name) and the layer that holds it.

    containerd's keys (``default/12/extract-1234 sha256:...``) are free text and share one
    name space with committed names, so they are kept here, beside the layer, never
    turned into layer IDs. Times are integer nanoseconds (containerd compares them
    exactly); ``usage_*`` is what a commit measured, None while active.
    """

    key: str
    layer: str
    kind: str
    parent: str | None
    labels: dict[str, str]
    created_ns: int
    updated_ns: int
    usage_size: int | None = None
    usage_inodes: int | None = None


_SNAPSHOT_COLUMNS = ("SELECT key, layer, kind, parent, labels, created_ns, updated_ns, usage_size, usage_inodes"
                     " FROM snapshots")
_READY_LAYER = f"layer IN (SELECT id FROM layers WHERE state = '{LayerState.READY.value}')"

@dataclass(frozen=True)
class MountClaim:
    """What a get needs to know of a layer, read in one query: its state and kind, where
    its view is mounted (if recorded) and in which boot, and how many references it has."""

    state: LayerState
    rw: bool
    mount_label: str
    path: str | None
    boot_id: str | None
    refs: int


#: a layer and its ancestors, nearest first (?1 the layer, ?2 the most rows: a loop in
#: corrupt records would otherwise never end)
_CHAIN = ("WITH RECURSIVE up(id, parent, depth) AS ("
          " SELECT id, parent, 0 FROM layers WHERE id = ?1"
          " UNION ALL SELECT l.id, l.parent, up.depth + 1 FROM layers l JOIN up ON l.id = up.parent"
          " WHERE up.depth < ?2)"
          " SELECT id, parent FROM up ORDER BY depth")
#: far past any chain a driver can mount (the kernel stops at 500 lowers)
_MAX_CHAIN = 10_000

_LAYER_COLUMNS = ("SELECT id, parent, rw, state, created, size, mount_label, size_limit, tarsplit,"
                  " diff_id, (SELECT COUNT(*) FROM refs WHERE refs.id = layers.id) FROM layers")


class Reader:
    """The queries, inside one consistent snapshot (or inside a write transaction)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    # -- layers ---------------------------------------------------------------------

    def layer(self, layer_id: str) -> LayerRecord | None:
        row = self._db.execute(f"{_LAYER_COLUMNS} WHERE id = ?", (layer_id,)).fetchone()
        return _record(row) if row else None

    def layers(self) -> list[LayerRecord]:
        """Every record, in any state, oldest first."""
        return [_record(r) for r in self._db.execute(f"{_LAYER_COLUMNS} ORDER BY created, id")]

    def children(self, layer_id: str) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM layers WHERE parent = ? ORDER BY id", (layer_id,))]

    def chain(self, layer_id: str) -> list[str]:
        """The layer and its ancestors, nearest first; StoreCorrupt on a loop or a gap.

        One recursive query, not one per ancestor: a chain is read on every mount and
        every containerd Prepare and Mounts, and chains run to hundreds of layers."""
        rows = self._db.execute(_CHAIN, (layer_id, _MAX_CHAIN)).fetchall()
        if not rows:
            raise StoreCorrupt(f"layer {layer_id}: ancestor {layer_id} has no record")
        chain: list[str] = []
        seen: set[str] = set()
        for lid, _ in rows:
            if lid in seen:
                raise StoreCorrupt(f"layer {layer_id}: its parents form a loop at {lid}")
            seen.add(lid)
            chain.append(lid)
        gap = rows[-1][1]
        if gap is not None:
            raise StoreCorrupt(f"layer {layer_id}: ancestor {gap} has no record")
        return chain

    def count(self, state: LayerState) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM layers WHERE state = ?", (state.value,)).fetchone()[0])

    # -- mount references and mounts ------------------------------------------------

    def refcount(self, layer_id: str) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM refs WHERE id = ?", (layer_id,)).fetchone()[0])

    def refs(self) -> list[MountRef]:
        rows = self._db.execute("SELECT ref, id, pid, pid_start, persistent, boot_id FROM refs ORDER BY ref")
        return [MountRef(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]

    def mount(self, layer_id: str) -> MountRecord | None:
        row = self._db.execute("SELECT id, path, boot_id FROM mounts WHERE id = ?", (layer_id,)).fetchone()
        return MountRecord(*row) if row else None

    def mount_claim(self, layer_id: str) -> MountClaim | None:
        """The layer as a get sees it (None: no record), in one query: get sits on every
        container start."""
        row = self._db.execute(
            "SELECT l.state, l.rw, l.mount_label, m.path, m.boot_id,"
            " (SELECT COUNT(*) FROM refs WHERE refs.id = l.id)"
            " FROM layers l LEFT JOIN mounts m ON m.id = l.id WHERE l.id = ?", (layer_id,)).fetchone()
        if row is None:
            return None
        return MountClaim(LayerState(row[0]), bool(row[1]), row[2], row[3], row[4], row[5])

    def mounts(self) -> list[MountRecord]:
        return [MountRecord(*r) for r in self._db.execute("SELECT id, path, boot_id FROM mounts ORDER BY id")]

    # -- containerd snapshots -------------------------------------------------------

    def snapshot(self, key: str, *, ready_only: bool = True) -> SnapshotRecord | None:
        """The snapshot ``key``; with ``ready_only`` only if its layer is complete (one
        whose Prepare is still running, or whose removal was interrupted, is not there)."""
        where = " WHERE key = ?" + (f" AND {_READY_LAYER}" if ready_only else "")
        row = self._db.execute(_SNAPSHOT_COLUMNS + where, (key,)).fetchone()
        return _snapshot(row) if row else None

    def snapshots(self, *, ready_only: bool = True) -> list[SnapshotRecord]:
        where = f" WHERE {_READY_LAYER}" if ready_only else ""
        return [_snapshot(r) for r in self._db.execute(_SNAPSHOT_COLUMNS + where + " ORDER BY key")]

    def snapshot_of_layer(self, layer_id: str) -> SnapshotRecord | None:
        """The snapshot (in any state) whose layer is ``layer_id``, if any."""
        row = self._db.execute(_SNAPSHOT_COLUMNS + " WHERE layer = ?", (layer_id,)).fetchone()
        return _snapshot(row) if row else None

    def snapshot_keys(self) -> dict[str, str]:
        """layer ID -> the containerd key (or committed name) of every snapshot row."""
        return dict((r[0], r[1]) for r in self._db.execute("SELECT layer, key FROM snapshots"))

    def snapshot_children(self, key: str) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT key FROM snapshots WHERE parent = ? ORDER BY key", (key,))]


class Writer(Reader):
    """The changes, inside one ``BEGIN IMMEDIATE`` transaction (see :meth:`Records.write`)."""

    # -- layers ---------------------------------------------------------------------

    def insert_layer(self, layer_id: str, parent: str | None, *, rw: bool, mount_label: str = "",
                     size_limit: int | None = None) -> None:
        """A new record, :attr:`LayerState.CREATING`."""
        self._db.execute(
            "INSERT INTO layers (id, parent, rw, state, created, mount_label, size_limit)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (layer_id, parent, int(rw), LayerState.CREATING.value, time.time(), mount_label, size_limit),
        )

    def set_state(self, layer_id: str, state: LayerState) -> None:
        self._db.execute("UPDATE layers SET state = ? WHERE id = ?", (state.value, layer_id))

    def mark_ready(self, layer_id: str, *, size: int | None, has_tarsplit: bool, diff_id: str | None) -> None:
        """The last step of making a layer: what it holds, and visible from now on."""
        self._db.execute("UPDATE layers SET state = ?, size = ?, tarsplit = ?, diff_id = ? WHERE id = ?",
                         (LayerState.READY.value, size, int(has_tarsplit), diff_id, layer_id))

    def forget_tarsplit(self, layer_id: str) -> None:
        """The layer's tar-split is lost: its diff comes from its files from now on."""
        self._db.execute("UPDATE layers SET tarsplit = 0 WHERE id = ?", (layer_id,))

    def set_diff_id(self, layer_id: str, diff_id: str | None) -> None:
        self._db.execute("UPDATE layers SET diff_id = ? WHERE id = ?", (diff_id, layer_id))

    def delete_layer(self, layer_id: str, *, unless_ready: bool = False) -> None:
        """Drop the record (``unless_ready``: only if it is not complete)."""
        if unless_ready:
            self._db.execute("DELETE FROM layers WHERE id = ? AND state != ?", (layer_id, LayerState.READY.value))
        else:
            self._db.execute("DELETE FROM layers WHERE id = ?", (layer_id,))

    def seal(self, layer_id: str, *, size: int | None) -> None:
        """A ready read-write layer becomes read-only, content untouched (a containerd
        Commit: the same directory becomes an image layer)."""
        self._db.execute("UPDATE layers SET rw = 0, size = ? WHERE id = ? AND state = ? AND rw = 1",
                         (size, layer_id, LayerState.READY.value))

    # -- mount references -------------------------------------------------------------

    def add_ref(self, layer_id: str, *, pid: int, pid_start: str, persistent: bool, boot_id: str) -> None:
        self._db.execute("INSERT INTO refs (id, pid, pid_start, persistent, boot_id) VALUES (?, ?, ?, ?, ?)",
                         (layer_id, pid, pid_start, int(persistent), boot_id))

    def claim_mounted(self, layer_id: str, *, pid: int, pid_start: str, persistent: bool,
                      boot_id: str) -> str | None:
        """A get's quick case in one statement: add a reference to a complete layer whose
        view is mounted in this boot and referenced already, and return the view's
        recorded path; None (nothing written) in every other case, which the waiting
        get then sorts out (mount, error)."""
        row = self._db.execute(
            "INSERT INTO refs (id, pid, pid_start, persistent, boot_id)"
            " SELECT l.id, ?2, ?3, ?4, ?5 FROM layers l JOIN mounts m ON m.id = l.id"
            " WHERE l.id = ?1 AND l.state = 'ready' AND m.boot_id = ?5"
            " AND EXISTS (SELECT 1 FROM refs r WHERE r.id = ?1)"
            " RETURNING (SELECT path FROM mounts WHERE mounts.id = refs.id)",
            (layer_id, pid, pid_start, int(persistent), boot_id)).fetchone()
        return None if row is None else str(row[0])

    def release_not_last(self, layer_id: str, *, persistent: bool, pid: int, pid_start: str) -> bool:
        """A put's quick case in one statement: release the reference :meth:`pick_ref`
        would pick, if it is not the layer's last. False (nothing written) otherwise: no
        reference, or the last one, whose put unmounts."""
        return self._db.execute(
            f"DELETE FROM refs WHERE ref = (SELECT ref FROM refs WHERE id = ?1 {_put_order(persistent)} LIMIT 1)"
            " AND (SELECT COUNT(*) FROM refs WHERE id = ?1) > 1",
            _put_params(layer_id, persistent, pid, pid_start)).rowcount > 0

    def pick_ref(self, layer_id: str, *, persistent: bool, pid: int, pid_start: str) -> int | None:
        """The reference a put releases: with ``persistent`` a persistent one first, else
        this process's own first, then other non-persistent ones, oldest first."""
        row = self._db.execute(f"SELECT ref FROM refs WHERE id = ?1 {_put_order(persistent)} LIMIT 1",
                               _put_params(layer_id, persistent, pid, pid_start)).fetchone()
        return int(row[0]) if row else None

    def put_choice(self, layer_id: str, *, persistent: bool, pid: int,
                   pid_start: str) -> tuple[int | None, int] | None:
        """For a put, in one query: (the reference :meth:`pick_ref` would pick, how many
        references the layer has), or None if the layer has no record."""
        row = self._db.execute(
            f"SELECT (SELECT ref FROM refs WHERE id = ?1 {_put_order(persistent)} LIMIT 1),"
            " (SELECT COUNT(*) FROM refs WHERE id = ?1) FROM layers WHERE id = ?1",
            _put_params(layer_id, persistent, pid, pid_start)).fetchone()
        if row is None:
            return None
        return (None if row[0] is None else int(row[0])), int(row[1])

    def drop_ref(self, ref: int) -> bool:
        """Release one reference; False if it was already gone."""
        return self._db.execute("DELETE FROM refs WHERE ref = ?", (ref,)).rowcount > 0

    def drop_refs(self, layer_id: str) -> int:
        return self._db.execute("DELETE FROM refs WHERE id = ?", (layer_id,)).rowcount

    def drop_refs_of_other_boots(self, boot_id: str, layer_id: str | None = None) -> int:
        """References taken before this boot (their mounts went with the reboot)."""
        if layer_id is None:
            return self._db.execute("DELETE FROM refs WHERE boot_id != ?", (boot_id,)).rowcount
        return self._db.execute("DELETE FROM refs WHERE id = ? AND boot_id != ?", (layer_id, boot_id)).rowcount

    # -- mounts -------------------------------------------------------------------------

    def set_mount(self, layer_id: str, path: str, boot_id: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO mounts (id, path, boot_id) VALUES (?, ?, ?)",
                         (layer_id, path, boot_id))

    def drop_mount(self, layer_id: str) -> None:
        self._db.execute("DELETE FROM mounts WHERE id = ?", (layer_id,))

    def drop_mounts_of_other_boots(self, boot_id: str) -> int:
        return self._db.execute("DELETE FROM mounts WHERE boot_id != ?", (boot_id,)).rowcount

    # -- containerd snapshots -------------------------------------------------------

    def insert_snapshot(self, snap: SnapshotRecord) -> None:
        self._db.execute(
            "INSERT INTO snapshots (key, layer, kind, parent, labels, created_ns, updated_ns, usage_size,"
            " usage_inodes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (snap.key, snap.layer, snap.kind, snap.parent, json.dumps(snap.labels, sort_keys=True),
             snap.created_ns, snap.updated_ns, snap.usage_size, snap.usage_inodes))

    def commit_snapshot(self, key: str, name: str, labels: dict[str, str], now_ns: int,
                        usage: tuple[int, int]) -> None:
        """The active snapshot ``key`` becomes the committed ``name`` (same layer)."""
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = 'committed', labels = ?, created_ns = ?,"
            " updated_ns = ?, usage_size = ?, usage_inodes = ? WHERE key = ?",
            (name, json.dumps(labels, sort_keys=True), now_ns, now_ns, usage[0], usage[1], key))

    def set_snapshot_labels(self, key: str, labels: dict[str, str], now_ns: int) -> None:
        self._db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE key = ?",
                         (json.dumps(labels, sort_keys=True), now_ns, key))

    def delete_snapshot(self, key: str) -> None:
        self._db.execute("DELETE FROM snapshots WHERE key = ?", (key,))


def _put_order(persistent: bool) -> str:
    """ORDER BY of the reference a put picks (parameters ?2 pid, ?3 pid_start)."""
    if persistent:
        return "ORDER BY persistent DESC, ref"
    return "ORDER BY (persistent = 0 AND pid = ?2 AND pid_start = ?3) DESC, persistent, ref"


def _put_params(layer_id: str, persistent: bool, pid: int, pid_start: str) -> tuple[object, ...]:
    return (layer_id,) if persistent else (layer_id, pid, pid_start)


class _Busy(Exception):
    """A transaction could not begin without waiting (see :meth:`Records.try_write`)."""


class Records:
    """Thread-safe access to ``meta.db``: :meth:`read` and :meth:`write` blocks.

    Writes go through one connection, one thread at a time (an RLock queues the
    threads of this process fairly; SQLite's own lock, with its sleeping busy handler,
    is left to what other processes do). Reads use a connection of their own per
    thread: in WAL mode a reader never waits for a writer, so a read never queues behind
    another thread's write either (dockerd's Exists while a Get mounts).

    ``readonly=True`` opens an existing database for watching only (the crash harness
    reads states the API hides while a victim works): no schema step, no writes.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self._readonly = readonly
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._readers_lock = threading.Lock()
        self._db = self._connect()
        #: the connection's PRAGMA synchronous, switched only when a write asks otherwise
        self._durable = True
        if readonly:
            return
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._upgrade()

    def _connect(self) -> sqlite3.Connection:
        if self._readonly:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5,
                                 isolation_level=None, check_same_thread=False)
        else:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=60000")
        return db

    def _upgrade(self) -> None:
        with self._lock, self._transaction(self._durable):
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            for statement in steps_after(version):
                self._db.execute(statement)
            if version < SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @property
    def version(self) -> int:
        """The schema version of the database (``PRAGMA user_version``)."""
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextlib.contextmanager
    def write(self, *, durable: bool = True) -> Iterator[Writer]:
        """One atomic read-check-write step, serialised across threads and processes.

        ``durable=False`` skips the fsync at commit (still atomic, still crash-safe for a
        killed process). For mount references only: they belong to one boot and are reset
        after a reboot, so surviving a power loss would buy nothing, and get/put sit on
        every container start.
        """
        with self._lock, self._transaction(durable) as db:
            yield db

    @contextlib.contextmanager
    def try_write(self, *, durable: bool = True) -> Iterator[Writer | None]:
        """:meth:`write`, or None at once where it would wait: for another thread's
        transaction or another process's lock. For callers that must not block (the
        plugin's event loop); they do the work the waiting way when given None. Not for
        use inside another write of the same thread."""
        if not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            try:
                with self._transaction(durable, wait=False) as db:
                    yield db
            except _Busy:  # SQLITE_BUSY at BEGIN: another process writes
                yield None
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _transaction(self, durable: bool, *, wait: bool = True) -> Iterator[Writer]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception; the caller holds
        ``self._lock``. With ``wait=False`` a BEGIN that would wait for another process
        raises :class:`_Busy` at once instead."""
        if durable != self._durable:
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        if wait:
            self._db.execute("BEGIN IMMEDIATE")
        else:
            self._db.execute("PRAGMA busy_timeout=0")
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise _Busy from e
            finally:
                self._db.execute("PRAGMA busy_timeout=60000")
        try:
            yield Writer(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def ready(self, layer_id: str) -> LayerRecord:
        """The record of a complete layer; LayerNotFound if there is none (a layer still
        being made or being removed is not there)."""
        with self.read() as db:
            rec = db.layer(layer_id)
        if rec is None or not rec.complete:
            raise LayerNotFound(f"layer {layer_id} not found")
        return rec

    @contextlib.contextmanager
    def read(self) -> Iterator[Reader]:
        """A consistent snapshot for reading several rows, on this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            me = threading.current_thread()
            with self._readers_lock:  # not the writers' lock: a read never waits for a write
                # the connections of threads that have ended go (a pool's threads stay)
                for thread, old in [r for r in self._readers if not r[0].is_alive()]:
                    old.close()
                    self._readers.remove((thread, old))
                self._readers.append((me, db))
            self._local.db = db
        db.execute("BEGIN")
        try:
            yield Reader(db)
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock, self._readers_lock:
            for _, db in self._readers:
                db.close()
            self._readers.clear()
            self._db.close()


def _record(row: tuple) -> LayerRecord:  # type: ignore[type-arg]
    return LayerRecord(
        id=row[0], parent=row[1], rw=bool(row[2]), state=LayerState(row[3]), created=row[4], size=row[5],
        mount_label=row[6], size_limit=row[7], has_tarsplit=bool(row[8]), diff_id=row[9],
        mount_count=row[10],
    )


def _snapshot(row: tuple) -> SnapshotRecord:  # type: ignore[type-arg]
    return SnapshotRecord(
        key=row[0], layer=row[1], kind=row[2], parent=row[3], labels=json.loads(row[4]),
        created_ns=row[5], updated_ns=row[6], usage_size=row[7], usage_inodes=row[8],
    )
