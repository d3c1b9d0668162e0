"""containerd's snapshotter semantics on a lamina store, with no gRPC in sight.

The words are containerd's (``core/snapshots/snapshotter.go``): a *key* names an active
snapshot or a view, a *name* a committed one, and both share one space. Prepare makes an
active snapshot over a committed parent; View a read-only one; Commit turns an active
snapshot into a committed one under a new name (the key is gone after); Remove drops
any snapshot without children. Mounts are described, never performed: containerd mounts
them.

How a snapshot lives in the store: each is one layer, with a random ID, and one row in
the store's snapshot records mapping the key to that layer with its kind, parent, labels
and times (:class:`lamina.records.SnapshotRecord`). An active snapshot is a read-write
layer, a view a read-only layer over the parent, a committed snapshot a read-only
layer: Commit *seals* the active layer in place (:meth:`lamina.store.Store.seal`),
renaming the row in the same transaction, so nothing is copied and a crash leaves the
snapshot either active under its key or committed under its name. ``lamina ls`` and
``lamina check`` see them all as ordinary layers.

Crash safety follows the store's protocol. Prepare writes the row in the same
transaction as the layer's first (``creating``) record, then the layer is made (itself
crash-safe); Remove removes the layer first, then the row. A row counts only while its
layer is complete, so what a crash leaves is a row that no call sees, and
:meth:`SnapshotService.recover` (at start-up, and in Cleanup) forgets it once the
store's cleanup has dropped the half-made layer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from lamina.drivers import registry
from lamina.drivers.base import MountDescriber, MountSpec, UsageMeter
from lamina.errors import LayerNotFound
from lamina.records import Reader, SnapshotRecord, Writer
from lamina.snapshotter.errors import (
    FailedPrecondition,
    InvalidArgument,
    SnapshotExists,
    SnapshotNotFound,
    SnapshotterClosed,
)
from lamina.snapshotter.filters import parse_all
from lamina.store import Store

log = logging.getLogger(__name__)

ACTIVE, VIEW, COMMITTED = "active", "view", "committed"
#: containerd's metadata store refuses a label whose key and value exceed this together
MAX_LABEL_BYTES = 4096
P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def serving_drivers() -> tuple[str, ...]:
    """The registered drivers that can serve containerd: those that describe a layer's
    mounts for another program to perform and measure a layer's own usage (the
    driver registry decides; no list to keep in step here)."""
    return tuple(name for name in registry.names()
                 if issubclass(registry.driver_class(name), MountDescriber)
                 and issubclass(registry.driver_class(name), UsageMeter))


def _while_open(method: Callable[P, R]) -> Callable[P, R]:
    """Run a call only while the service is open, and let :meth:`SnapshotService.close`
    wait for it: a closed service refuses with :class:`SnapshotterClosed` instead of
    failing somewhere inside a closed store."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        self = args[0]
        assert isinstance(self, SnapshotService)
        with self._calling():
            return method(*args, **kwargs)

    return call


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


def _labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Checked labels; an empty value means "no such label", as in containerd."""
    out = {}
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"label key and value greater than maximum size ({MAX_LABEL_BYTES} bytes), key: {k[:64]}")
        if v != "":
            out[k] = v
    return out


class SnapshotService:
    """The ten snapshotter calls over one store. Thread-safe; calls run concurrently."""

    def __init__(self, store: Store) -> None:
        if store.driver.name not in serving_drivers():
            raise InvalidArgument(f"driver {store.driver.name} cannot serve containerd snapshots; "
                                  f"use one of {', '.join(serving_drivers())}")
        self.store = store
        self._state = threading.Condition()
        self._calls = 0
        self._closed = False

    # -- closing -----------------------------------------------------------------------

    def close(self) -> None:
        """containerd's Snapshotter.Close: no call is taken after it (each raises
        :class:`SnapshotterClosed`), calls under way finish first, then the store is
        closed. Closing again does nothing, as containerd's suite requires (CloseTwice)."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            while self._calls:
                self._state.wait()
        self.store.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        with self._state:
            if self._closed:
                raise SnapshotterClosed("the snapshotter is closed")
            self._calls += 1
        try:
            yield
        finally:
            with self._state:
                self._calls -= 1
                if not self._calls:
                    self._state.notify_all()

    # -- start-up and Cleanup ----------------------------------------------------------

    @_while_open
    def recover(self) -> list[str]:
        """Finish what a crash left: the store's own cleanup, whose recovery engine also
        forgets snapshot rows whose layer is gone (:mod:`lamina.recovery`, the same
        that ``lamina check --repair`` runs). One line per thing mended."""
        return self.store.cleanup()

    @_while_open
    def cleanup(self) -> list[str]:
        """containerd's Cleanup, called after its garbage collector has removed what it
        no longer references: nothing is deleted that a snapshot still names; what
        interrupted removals and creations left is finished off."""
        return self.recover()

    # -- reading -----------------------------------------------------------------------

    @_while_open
    def stat(self, key: str) -> SnapshotRecord:
        with self.store.records.read() as db:
            snap = db.snapshot(key)
        if snap is None:
            raise SnapshotNotFound(f"snapshot {key}: not found")
        return snap

    @_while_open
    def list(self, filters: Sequence[str] = ()) -> Iterator[SnapshotRecord]:
        """Every snapshot that matches any of ``filters`` (all when there are none)."""
        flt = parse_all(filters)
        with self.store.records.read() as db:
            snaps = db.snapshots()
        # read now, while the service is open, not when the caller iterates
        return iter([snap for snap in snaps if flt.matches(_fields(snap))])

    @_while_open
    def mounts(self, key: str) -> list[MountSpec]:
        snap = self.stat(key)
        if snap.kind not in (ACTIVE, VIEW):
            raise FailedPrecondition(f"requested snapshot {key} not active or view")
        return self.store.mount_specs(snap.layer)

    @_while_open
    def usage(self, key: str) -> Usage:
        """Of the snapshot alone, not its parents: measured now for an active snapshot,
        as measured at commit for a committed one, nothing for a view."""
        snap = self.stat(key)
        if snap.kind == ACTIVE:
            size, inodes = self.store.disk_usage(snap.layer)
            return Usage(size, inodes)
        return Usage(snap.usage_size or 0, snap.usage_inodes or 0)

    # -- making ------------------------------------------------------------------------

    @_while_open
    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[MountSpec]:
        return self._create(ACTIVE, key, parent, labels or {})

    @_while_open
    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[MountSpec]:
        return self._create(VIEW, key, parent, labels or {})

    def _create(self, kind: str, key: str, parent: str, labels: Mapping[str, str]) -> list[MountSpec]:
        if not key:
            raise InvalidArgument("a snapshot key must not be empty")
        checked = _labels(labels)
        layer = secrets.token_hex(16)
        now = time.time_ns()
        with self.store.records.read() as db:
            if db.snapshot(key, ready_only=False) is not None:
                raise SnapshotExists(f"snapshot {key}: already exists")
            parent_layer = self._parent_layer(db, parent)

        def record(db: Writer) -> None:
            # the row is written with the layer's first record, in one transaction
            if db.snapshot(key, ready_only=False) is not None:
                raise SnapshotExists(f"snapshot {key}: already exists")
            if self._parent_layer(db, parent) != parent_layer:
                raise SnapshotNotFound(f"parent snapshot {parent} does not exist: not found")
            db.insert_snapshot(SnapshotRecord(key=key, layer=layer, kind=kind, parent=parent or None,
                                              labels=checked, created_ns=now, updated_ns=now))

        made = False
        try:
            if kind == ACTIVE:
                self.store.create_rw(layer, parent_layer, record=record)
            else:
                self.store.create(layer, parent_layer, record=record)
            made = True
            # a chain whose mounts containerd could not perform is refused here
            return self.store.mount_specs(layer)
        except BaseException as e:
            self._roll_back(kind, key, layer, made, e)
            raise

    def _roll_back(self, kind: str, key: str, layer: str, made: bool, cause: BaseException) -> None:
        """Undo a failed Prepare or View. The caller re-raises ``cause``, the error the
        client must see: a failure here is logged and noted on it, never raised in its
        place. If the layer cannot be removed its row stays: the snapshot is then
        there for containerd's garbage collector (it removes what its metadata does not
        name) or for Cleanup, instead of a layer no key names."""
        try:
            if made:
                self.store.remove(layer, snapshot=key)
            with self.store.records.write() as db:
                cur = db.snapshot(key, ready_only=False)
                if cur is not None and cur.layer == layer:
                    db.delete_snapshot(key)
        except Exception as failure:  # noqa: BLE001 - reported, and the cause is what is raised
            log.error("%s %r failed (%s) and undoing it failed too: %s; its layer %s is left for "
                      "Cleanup or containerd's garbage collector", "view" if kind == VIEW else "prepare", key, cause,
                      failure, layer)
            cause.add_note(f"undoing it failed too: {failure!r} (layer {layer} left for cleanup)")

    @staticmethod
    def _parent_layer(db: Reader, parent: str) -> str | None:
        if not parent:
            return None
        prec = db.snapshot(parent)
        if prec is None:
            raise SnapshotNotFound(f"parent snapshot {parent} does not exist: not found")
        if prec.kind != COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not committed snapshot")
        return prec.layer

    @_while_open
    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """The active snapshot ``key`` becomes the committed snapshot ``name``, its layer
        sealed in place; its labels are those given here, its times now."""
        if not name:
            raise InvalidArgument("a committed snapshot's name must not be empty")
        checked = _labels(labels or {})
        with self.store.records.read() as db:
            if db.snapshot(name, ready_only=False) is not None:
                raise SnapshotExists(f"committed snapshot {name}: already exists")
            snap = db.snapshot(key)
        if snap is None:
            raise SnapshotNotFound(f"failed to get active snapshot {key!r}: not found")
        if snap.kind != ACTIVE:
            raise FailedPrecondition(f"snapshot {key!r} is not active")
        size, inodes = self.store.disk_usage(snap.layer)
        now = time.time_ns()

        def rename(db: Writer) -> None:
            if db.snapshot(name, ready_only=False) is not None:
                raise SnapshotExists(f"committed snapshot {name}: already exists")
            cur = db.snapshot(key)
            if cur is None or cur.layer != snap.layer or cur.kind != ACTIVE:
                raise SnapshotNotFound(f"failed to get active snapshot {key!r}: not found")
            db.commit_snapshot(key, name, checked, now, (size, inodes))

        self.store.seal(snap.layer, then=rename)

    @_while_open
    def update(self, key: str, labels: Mapping[str, str], paths: Sequence[str] = ()) -> SnapshotRecord:
        """Change a snapshot's labels: all of them (no paths, or ``labels``), or single
        ones (``labels.KEY``; a key missing from ``labels`` is removed). Any other path
        names an immutable field: InvalidArgument."""
        given = dict(labels)
        with self.store.records.write() as db:
            snap = db.snapshot(key)
            if snap is None:
                raise SnapshotNotFound(f"snapshot {key}: not found")
            new = dict(snap.labels)
            if not paths:
                new = dict(given)
            for path in paths:
                if path.startswith("labels."):
                    label = path.removeprefix("labels.")
                    new[label] = given.get(label, "")
                elif path == "labels":
                    new = dict(given)
                else:
                    raise InvalidArgument(f"cannot update {path!r} field on snapshot {key!r}")
            checked = _labels(new)
            db.set_snapshot_labels(key, checked, time.time_ns())
            snap = db.snapshot(key)
        assert snap is not None
        return snap

    @_while_open
    def remove(self, key: str) -> None:
        """Drop a snapshot and its layer; refused while other snapshots are built on it."""
        snap = self.stat(key)
        with self.store.records.read() as db:
            kids = db.snapshot_children(key)
        if kids:
            raise FailedPrecondition(f"cannot remove snapshot {key} with child ({kids[0]})")
        try:
            # the row goes in the transaction that drops the layer's record
            self.store.remove(snap.layer, record=lambda db: db.delete_snapshot(key), snapshot=key)
        except LayerNotFound:
            with self.store.records.write() as db:  # an earlier removal got this far
                db.delete_snapshot(key)


def _fields(snap: SnapshotRecord):  # type: ignore[no-untyped-def]
    """The filter fields of a snapshot: kind, name, parent, labels.KEY."""

    def field(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "kind":
            return snap.kind, True
        if head == "name":
            return snap.key, True
        if head == "parent":
            return snap.parent or "", True
        if head == "labels":
            if not snap.labels:
                return "", False
            label = ".".join(path[1:])
            return snap.labels.get(label, ""), label in snap.labels
        return "", False

    return field
