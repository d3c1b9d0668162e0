"""The store: the one public face of a layer store (``lamina.open``), over its rooms.

Everything a driver should not have to think about lives behind this facade, once for
every driver: checking IDs before they touch the disk, refusing to remove a layer with
children or mounts, counting mounts across processes, tar-split for byte-exact diffs,
the naive (mount-and-walk) diff operations for drivers that have no native ones, and
crash recovery. Each of those is a room of its own; this module checks IDs, takes the
locks in the right order and calls them:

===========================  ==========================================================
:mod:`lamina.records`        every SQL statement, behind typed operations
:mod:`lamina.lifecycle`      making and removing layers crash-safely (record first)
:mod:`lamina.worklocks`      the per-layer lock of long work, and pins of readers
:mod:`lamina.mounts`         mount references counted across processes
:mod:`lamina.tarsplits`      the tar-split of every imported layer
:mod:`lamina.naive`          mount-and-walk diffs for drivers without native ones
:mod:`lamina.recovery`       scan and repair: ``cleanup`` and ``lamina check``
===========================  ==========================================================

Lock order, outermost first: a layer's work lock, its mount lock, a records
transaction. Nothing takes them the other way round, and no kernel mount, unmount or
long work ever runs inside a transaction.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from lamina.archive.change import Change
from lamina.diffs import Diffs
from lamina.drivers.base import (
    Capabilities,
    CreateOptions,
    Driver,
    DriverContext,
    FileGetter,
    MountSpec,
    refuse_unknown,
)
from lamina.drivers.registry import driver_class
from lamina.errors import (
    DiffIDMismatch,
    DriverUnavailable,
    LaminaError,
    LayerBusy,
    LayerExists,
    LayerHasChildren,
    LayerNotFound,
)
from lamina.fs.durable import EarlyWriteback, syncfs
from lamina.fs.private import PRIVATE_FILE, ROOT_MODE, narrow, private_dir, private_file
from lamina.ids import check_id, parse_size
from lamina.lifecycle import Lifecycle, raise_no_space
from lamina.mounts import Mounts
from lamina.naive import Naive
from lamina.records import LayerRecord, LayerState, Records, Writer
from lamina.storeconfig import CONFIG_NAME, settle_driver
from lamina.streams import HashingReader
from lamina.tarsplits import TarSplits
from lamina.worklocks import WorkLocks

if TYPE_CHECKING:  # imported where used: a CLI verb that needs neither starts faster
    from lamina.chainapply import ChainApply, SerialChain

log = logging.getLogger(__name__)



def default_root() -> Path:
    """``/var/lib/lamina`` for root, ``$XDG_DATA_HOME/lamina`` (``~/.local/share``) otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/lamina")
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "lamina"


def open(  # noqa: A001 - the natural name: lamina.open(root)
    root: str | os.PathLike[str] | None = None,
    driver: str | None = None,
    options: dict[str, str] | None = None,
    *,
    uid_map: list[tuple[int, int, int]] | None = None,
    gid_map: list[tuple[int, int, int]] | None = None,
) -> Store:
    """Open (creating if needed) the store at ``root`` with ``driver``.

    A new store records the driver it was made with; opening it later with another one
    raises :class:`DriverMismatch`, because the layers on disk are in that driver's shape.
    """
    return Store(Path(root) if root is not None else default_root(), driver, options or {},
                 uid_map=uid_map or [], gid_map=gid_map or [])


class Store:
    """A layer store rooted at one directory. Safe to share between threads."""

    def __init__(self, root: Path, driver: str | None, options: dict[str, str], *,
                 uid_map: list[tuple[int, int, int]], gid_map: list[tuple[int, int, int]]) -> None:
        self.root = root.absolute()
        # the store's own metadata is private, and a store made before that is narrowed
        # now (lamina.fs.private says why the root keeps o+x)
        self.root.mkdir(parents=True, exist_ok=True, mode=ROOT_MODE)
        narrow(self.root, ROOT_MODE)
        for sub in ("layers", "tmp", "locks", "tarsplit"):
            private_dir(self.root / sub)
        self.work_locks = WorkLocks(self.root / "locks")
        name = settle_driver(self.root, driver)
        narrow(self.root / CONFIG_NAME, PRIVATE_FILE)
        cls = driver_class(name)
        reason = cls.unavailable_reason(self.root)
        if reason:
            raise DriverUnavailable(f"driver {name} cannot run here: {reason}")
        private_file(self.root / "meta.db")  # SQLite gives its WAL files the same mode
        self.records = Records(self.root / "meta.db")
        for wal in ("meta.db-wal", "meta.db-shm"):
            narrow(self.root / wal, PRIVATE_FILE)
        self.driver: Driver = cls(DriverContext(self.root, dict(options), uid_map, gid_map))
        self.mounts = Mounts(self.records, self.driver, self.root / "locks")
        self.tarsplits = TarSplits(self.root)
        self.lifecycle = Lifecycle(self.root, self.records, self.driver, self.mounts, self.tarsplits)
        self.native = Capabilities.of(self.driver)
        self.naive = Naive(self.mounts, self.driver.ctx,
                           drop_overlay_xattrs=self.driver.shows_through_overlayfs)
        self.diffs = Diffs(self.records, self.work_locks, self.tarsplits, self.native, self.naive,
                           own_chain=self.driver.exports_against_own_chain, readable=self.driver.readable)

    # -- small helpers ----------------------------------------------------------------

    def _ready(self, layer_id: str) -> LayerRecord:
        check_id(layer_id)
        return self.records.ready(layer_id)

    # -- making layers ------------------------------------------------------------------

    def create(self, layer_id: str, parent: str | None = None, *, size: str | int | None = None,
               storage_opt: dict[str, str] | None = None, mount_label: str = "",
               record: Callable[[Writer], None] | None = None) -> None:
        """Make an empty read-only layer over ``parent`` [Create].

        ``record(db)`` runs in the transaction that writes the layer's first record, so a
        face can file what the layer is to it atomically with the layer's existence (the
        containerd snapshotter's key): a crash leaves both or neither.
        """
        self._create(layer_id, parent, rw=False, size=size, storage_opt=storage_opt, mount_label=mount_label,
                     record=record)

    def create_rw(self, layer_id: str, parent: str | None = None, *, size: str | int | None = None,
                  storage_opt: dict[str, str] | None = None, mount_label: str = "",
                  record: Callable[[Writer], None] | None = None) -> None:
        """Make an empty read-write (container) layer over ``parent`` [CreateReadWrite].

        ``size`` (or ``storage_opt["size"]``) caps what it can hold, in Docker's units.
        ``record`` as for :meth:`create`.
        """
        self._create(layer_id, parent, rw=True, size=size, storage_opt=storage_opt, mount_label=mount_label,
                     record=record)

    def _create(self, layer_id: str, parent: str | None, *, rw: bool, size: str | int | None,
                storage_opt: dict[str, str] | None, mount_label: str,
                record: Callable[[Writer], None] | None = None) -> None:
        check_id(layer_id)
        if parent:
            check_id(parent, "parent ID")
        opts = self._create_options(size, storage_opt, mount_label)
        with self.work_locks.busy(layer_id):
            self.lifecycle.begin(layer_id, parent, rw=rw, opts=opts, record=record)
            self.lifecycle.build(layer_id, parent, rw=rw, opts=opts)
            self.lifecycle.commit(layer_id, size=0 if parent is None else None)

    def _create_options(self, size: str | int | None, storage_opt: dict[str, str] | None,
                        mount_label: str) -> CreateOptions:
        """Refuse storage options the driver does not know (keys case-blind, as
        overlay2); ``size`` (or a ``size`` storage option) becomes the limit."""
        sopt = dict(storage_opt or {})
        refuse_unknown(sopt, self.driver.storage_opt_keys, "storage option", self.driver.name)
        if size is None:
            size = next((v for k, v in sopt.items() if k.lower() == "size"), None)
        limit = parse_size(size) if size not in (None, "", 0) else None
        return CreateOptions(size=limit or None, mount_label=mount_label, storage_opt=sopt)

    def apply_diff(self, layer_id: str, parent: str | None, stream: IO[bytes], *,
                   expected_diff_id: str | None = None) -> int:
        """Fill layer ``layer_id`` from an uncompressed layer tar; return the bytes applied.

        If the layer does not exist it is made (read-only, over ``parent``); if it exists
        (Docker calls Create first) it must be empty of children and mounts. Either way a
        failure or crash leaves no layer behind. The tar's headers are kept (tar-split) so
        that :meth:`diff` gives back the same bytes. The DiffID (sha256 of the whole
        stream) is recorded; with ``expected_diff_id`` a tar that hashes otherwise raises
        :class:`DiffIDMismatch` before the layer is ever ready, and is not kept.
        """
        check_id(layer_id)
        if parent:
            check_id(parent, "parent ID")
        with self.work_locks.busy(layer_id):
            if not self.lifecycle.reopen(layer_id):
                self.lifecycle.begin(layer_id, parent, rw=False, opts=CreateOptions())
                self.lifecycle.build(layer_id, parent, rw=False, opts=CreateOptions(), sync=False)
            hashed = HashingReader(stream)
            try:
                size = self._apply_into(layer_id, hashed)
                hashed.drain()
                diff_id = hashed.digest()
                if expected_diff_id is not None and diff_id != expected_diff_id:
                    raise DiffIDMismatch(layer_id, expected_diff_id, diff_id)
            except BaseException as e:
                hashed.close()
                self.lifecycle.abandon(layer_id)
                raise_no_space(layer_id, e)
                if isinstance(e, OSError):  # it names a file; say whose
                    e.add_note(f"layer {layer_id} not made")
                raise
            self.lifecycle.commit(layer_id, size=size, has_tarsplit=True, diff_id=diff_id)
            return size

    def chain_apply(self, jobs: int | None = None, *,
                    sizes: Sequence[int] | None = None) -> ChainApply | SerialChain:
        """Make the layers of one chain from their tars, bottom up, up to ``jobs`` of them
        side by side where the driver allows it (None: one per CPU), each made ready
        only after its parent; ``sizes``: about how many bytes each layer to come holds,
        if known. See :mod:`lamina.chainapply`."""
        from lamina.chainapply import open_chain

        return open_chain(self, jobs, sizes)

    def _apply_into(self, layer_id: str, stream: HashingReader) -> int:
        with self.records.read() as db:
            rec = db.layer(layer_id)
            assert rec is not None
            chain = db.chain(layer_id)
        with self.tarsplits.recording(layer_id) as ts, EarlyWriteback(self.root):
            size = None
            if self.native.apply is not None:
                size = self.native.apply.apply_diff(layer_id, rec.parent, chain, stream, tarsplit=ts)
            if size is None:
                size = self.naive.apply(layer_id, stream, ts)
        syncfs(self.root)
        self.tarsplits.keep(layer_id)
        return int(size)

    # -- mounting -----------------------------------------------------------------------

    def get(self, layer_id: str, mount_label: str = "", *, persistent: bool = False) -> Path:
        """Mount the union view of the layer's chain and return its path [Get].

        Counted across processes: the first reference mounts, later ones return the same
        path. ``persistent=True`` takes a reference owned by no process (the CLI's
        ``mount``), released only by a persistent :meth:`put` or ``cleanup(unmount_all)``.
        """
        check_id(layer_id)
        return self.mounts.get(layer_id, persistent=persistent, mount_label=mount_label)

    def put(self, layer_id: str, *, persistent: bool = False) -> bool:
        """Release one reference [Put]; the last one unmounts. False if none was held.

        The reference released is this process's own if it has one (or a persistent one
        for ``persistent=True``), else the oldest: dockerd puts what a plugin process
        that has since restarted got.
        """
        check_id(layer_id)
        return self.mounts.put(layer_id, persistent=persistent)

    def try_get(self, layer_id: str, *, persistent: bool = False) -> Path | None:
        """:meth:`get` if it can be done at once, else None (then call :meth:`get`): the
        view is mounted already and nobody else is counting references of the layer.
        For the plugin's event loop, which must not wait for a mount or a lock."""
        check_id(layer_id)
        return self.mounts.try_get(layer_id, persistent=persistent)

    def try_put(self, layer_id: str, *, persistent: bool = False) -> bool | None:
        """:meth:`put` if it can be done at once (not the last reference, nobody else
        counting), else None (then call :meth:`put`)."""
        check_id(layer_id)
        return self.mounts.try_put(layer_id, persistent=persistent)

    @contextlib.contextmanager
    def mounted(self, layer_id: str, mount_label: str = "") -> Iterator[Path]:
        """``with store.mounted(id) as path:`` pairs :meth:`get` and :meth:`put`."""
        path = self.get(layer_id, mount_label)
        try:
            yield path
        finally:
            self.put(layer_id)

    # -- reading --------------------------------------------------------------------------

    def exists(self, layer_id: str) -> bool:
        """True if a complete layer has this ID [Exists]."""
        check_id(layer_id)
        with self.records.read() as db:
            rec = db.layer(layer_id)
        return rec is not None and rec.complete

    def layer(self, layer_id: str) -> LayerRecord:
        """The record of a complete layer."""
        return self._ready(layer_id)

    def layers(self) -> list[LayerRecord]:
        """Every complete layer, oldest first."""
        with self.records.read() as db:
            return [r for r in db.layers() if r.complete]

    def snapshot_keys(self) -> dict[str, str]:
        """layer ID -> containerd key (or committed name), for the layers that are
        containerd snapshots (``lamina ls`` tells them apart by it)."""
        with self.records.read() as db:
            return db.snapshot_keys()

    def children(self, layer_id: str) -> list[str]:
        self._ready(layer_id)
        with self.records.read() as db:
            return db.children(layer_id)

    def chain(self, layer_id: str) -> list[str]:
        """The layer and its ancestors, nearest first."""
        self._ready(layer_id)
        with self.records.read() as db:
            return db.chain(layer_id)

    def status(self) -> list[tuple[str, str]]:
        """Docker's Status pairs: the driver's own, after the store's."""
        with self.records.read() as db:
            n = db.count(LayerState.READY)
        return [("Driver", self.driver.name), ("Root", str(self.root)), ("Layers", str(n)),
                *self.driver.status()]

    def metadata(self, layer_id: str) -> dict[str, str]:
        """Docker's GetMetadata for one layer."""
        self._ready(layer_id)
        return self.driver.metadata(layer_id)

    def mount_specs(self, layer_id: str) -> list[MountSpec]:
        """The mounts that show the layer's view, for another program to perform
        (containerd mounts what its snapshotter returns). Writable for a read-write
        layer, read-only otherwise. No reference is taken: the store does not see these
        mounts, so the caller must not remove a layer it still has mounted."""
        check_id(layer_id)
        with self.records.read() as db:  # the record and its chain in one read
            rec = db.layer(layer_id)
            if rec is None or not rec.complete:
                raise LayerNotFound(f"layer {layer_id} not found")
            chain = db.chain(layer_id)
        if self.native.mount_specs is None:
            raise DriverUnavailable(f"driver {self.driver.name} cannot describe its mounts for another program")
        return list(self.native.mount_specs.mount_specs(layer_id, chain, writable=rec.rw))

    def disk_usage(self, layer_id: str) -> tuple[int, int]:
        """(bytes, inodes) the layer's own content takes on disk, as ``du`` counts."""
        self._ready(layer_id)
        if self.native.usage is None:
            raise DriverUnavailable(f"driver {self.driver.name} cannot measure a layer's disk usage")
        return self.native.usage.disk_usage(layer_id)

    def seal(self, layer_id: str, *, then: Callable[[Writer], None] | None = None) -> None:
        """Make a read-write layer read-only, its content as it is, nothing copied.

        This is a containerd Commit: the container's (or unpack's) directory becomes an
        image layer in place. Refused for a layer that is not read-write, has children,
        or is mounted through the store. ``then(db)`` runs inside the same transaction,
        so a face can record what the seal means to it (the snapshot's new name)
        atomically with it: a crash leaves both or neither.
        """
        check_id(layer_id)
        with self.work_locks.busy(layer_id):
            rec = self._ready(layer_id)
            size = None
            if rec.rw:
                size = self.diffs.native_diff_size(layer_id, rec.parent)
            with self.mounts.settled(layer_id), self.records.write() as db:
                rec = db.layer(layer_id)
                if rec is None or not rec.complete:
                    raise LayerNotFound(f"layer {layer_id} not found")
                if not rec.rw:
                    raise LayerExists(f"layer {layer_id} is already read-only")
                if db.children(layer_id):
                    raise LayerHasChildren(f"layer {layer_id} has children; a read-write layer with "
                                           "children cannot be sealed")
                if db.refcount(layer_id):
                    raise LayerBusy(f"layer {layer_id} is mounted through lamina; unmount it first")
                db.seal(layer_id, size=size)
                if then is not None:
                    then(db)

    # -- removing -------------------------------------------------------------------------

    def remove(self, layer_id: str, *, record: Callable[[Writer], None] | None = None,
               snapshot: str | None = None) -> None:
        """Remove a layer, crash-safely [Remove].

        Refused with :class:`LayerHasChildren` or :class:`LayerBusy` (mounted, or being
        changed by another process), and with :class:`LayerNamedBySnapshot` for a layer
        that a containerd snapshot holds, unless ``snapshot`` names that snapshot's key
        (the snapshotter's own Remove). The record is marked ``removing`` before
        anything is deleted, so an interrupted removal is finished by ``cleanup``.
        ``record(db)`` runs in the transaction that drops the layer's record (a face
        forgetting its own name for the layer); after a crash, cleanup finishes the
        removal without it.
        """
        check_id(layer_id)
        with self.work_locks.busy(layer_id):
            self.lifecycle.mark_removing(layer_id, snapshot=snapshot)
            self.lifecycle.finish_remove(layer_id, record=record)

    # -- recovery -------------------------------------------------------------------------

    def cleanup(self, *, unmount_all: bool = False) -> list[str]:
        """Mend what crashes and reboots left [Cleanup]; one line per thing mended.

        Drops half-made layers whose maker is gone, finishes interrupted removals,
        releases references of dead processes and of earlier boots (unmounting where
        that was the last), unmounts leaks, removes orphan files, and lets the driver
        tidy its own: every repairable problem :func:`lamina.recovery.scan` finds. With
        ``unmount_all`` every mount is released (dockerd's Cleanup at shutdown).
        """
        from lamina import recovery

        return recovery.cleanup(self, unmount_all=unmount_all)

    # -- reading content --------------------------------------------------------------------

    def diff(self, layer_id: str, parent: str | None = None) -> IO[bytes]:
        """The layer's changes against ``parent`` as an uncompressed tar [Diff].

        ``parent=None`` means the layer's own parent, ``""`` means against nothing. For an
        unchanged layer made by :meth:`apply_diff`, the bytes are those it was made from.
        Close the stream: that releases the mounts and locks it holds.
        """
        check_id(layer_id)
        return self.diffs.diff(layer_id, parent)

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        """What changed in the layer against ``parent``, sorted by path [Changes]."""
        check_id(layer_id)
        return self.diffs.changes(layer_id, parent)

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        """Bytes of regular-file content changed against ``parent`` [DiffSize]."""
        check_id(layer_id)
        return self.diffs.diff_size(layer_id, parent)

    def diff_getter(self, layer_id: str) -> FileGetter:
        """Open the layer's files by tar name [DiffGetter]; close it when done."""
        check_id(layer_id)
        return self.diffs.file_getter(layer_id)

    def close(self) -> None:
        """Release this process's handles; mounts and persistent references stay."""
        self.driver.close()
        self.records.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Store", "open", "default_root", "LaminaError"]
