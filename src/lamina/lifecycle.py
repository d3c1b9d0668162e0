"""How a layer comes to be and goes, crash-safely: the record first, then the content.

Making (design §3): the record is written *creating* before any byte of the layer is,
under the layer's work lock (:mod:`lamina.worklocks`), which the making process holds
until the record says *ready*; the layer's files are made durable before that (one
``syncfs``, or the driver's fsyncs of the few names an empty layer is), and the
*ready* record is the one flushed to disk: it carries the *creating* one with it.
A crash leaves a creating record whose lock is free (a *half-made* layer), which
:meth:`Lifecycle.abandon` undoes: content, mount references, tar-split, record.

Removing is the same in reverse: *removing* first, then the driver deletes, then the
record goes (:meth:`Lifecycle.finish_remove`), so an interrupted removal is finished by
cleanup. Only ready layers are visible to ``exists``, ``ls`` and every operation.

Each step takes a ``record`` hook that runs inside the transaction writing or dropping
the layer's record, so a face can keep its own name for the layer (the containerd
snapshotter's key) atomically with the layer itself.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

from lamina.drivers.base import CreateOptions, Driver
from lamina.errors import (
    LayerBusy,
    LayerExists,
    LayerHasChildren,
    LayerNamedBySnapshot,
    LayerNotFound,
    NoSpace,
    ParentNotFound,
)
from lamina.liveness import boot_id
from lamina.mounts import Mounts
from lamina.records import LayerState, Records, Writer
from lamina.tarsplits import TarSplits

log = logging.getLogger(__name__)

#: a face's hook into the transaction that writes or drops a layer's record
RecordHook = Callable[[Writer], None]


class Lifecycle:
    """The steps of making and removing layers (callers hold the layer's work lock)."""

    def __init__(self, root: Path, records: Records, driver: Driver, mounts: Mounts,
                 tarsplits: TarSplits) -> None:
        self._root = root
        self._records = records
        self._driver = driver
        self._mounts = mounts
        self._tarsplits = tarsplits

    # -- making -------------------------------------------------------------------------

    def begin(self, layer_id: str, parent: str | None, *, rw: bool, opts: CreateOptions,
              record: RecordHook | None = None, parent_pending: bool = False) -> None:
        """Write the *creating* record; drop the remains of an earlier attempt that died.

        ``parent_pending``: the parent is still *creating*, made by this same caller,
        which holds its work lock and commits it before this layer (a chain unpacked
        side by side, :mod:`lamina.chainapply`); it must exist all the same.

        Not flushed to disk (atomic, and kept by a killed process, but not promised
        past a power loss): nothing is promised about the layer until :meth:`commit`,
        whose flush carries this record with it (SQLite's WAL keeps transactions in
        order). A power loss before that loses the record or keeps it; either way
        cleanup removes what was made (an orphan directory, or a half-made layer). One
        flush of the records per layer made, not two."""
        stale = False
        with self._records.write(durable=False) as db:
            old = db.layer(layer_id)
            if old is not None:
                if old.state is LayerState.READY:
                    raise LayerExists(f"layer {layer_id} already exists")
                if old.state is LayerState.REMOVING:
                    raise LayerBusy(f"layer {layer_id} is being removed")
                stale = True  # creating, and we hold its lock: a crashed earlier attempt
            if parent:
                prec = db.layer(parent)
                if prec is None or not (prec.complete or (
                        parent_pending and prec.state is LayerState.CREATING)):
                    raise ParentNotFound(f"parent layer {parent} of {layer_id} not found")
            if stale:
                db.delete_layer(layer_id)
            db.insert_layer(layer_id, parent or None, rw=rw, mount_label=opts.mount_label,
                            size_limit=opts.size)
            if record is not None:
                record(db)
        if stale:
            log.info("dropping the remains of an interrupted creation of %s", layer_id)
            self._driver.remove(layer_id)

    def reopen(self, layer_id: str) -> bool:
        """Mark an existing ready layer *creating* again, to be filled by an apply (Docker
        calls Create, then ApplyDiff); False if there is no ready layer of that ID. It
        must have no children and no mounts."""
        with self._mounts.settled(layer_id), self._records.write() as db:
            rec = db.layer(layer_id)
            if rec is None or rec.state is not LayerState.READY:
                return False
            if db.children(layer_id):
                raise LayerHasChildren(f"layer {layer_id} has children; cannot apply a diff into it")
            if rec.mount_count:
                raise LayerBusy(f"layer {layer_id} is mounted; cannot apply a diff into it")
            # from here on the layer is half-made until the apply finishes
            db.set_state(layer_id, LayerState.CREATING)
        return True

    def build(self, layer_id: str, parent: str | None, *, rw: bool, opts: CreateOptions,
              sync: bool = True) -> None:
        """Have the driver make the layer's empty content; on failure nothing is kept."""
        try:
            self._driver.create(layer_id, parent or None, rw=rw, opts=opts)
            if sync:
                self._driver.make_durable(layer_id, parent or None)
        except BaseException as e:
            self.abandon(layer_id)
            raise_no_space(layer_id, e)
            raise

    def commit(self, layer_id: str, *, size: int | None, has_tarsplit: bool = False,
               diff_id: str | None = None) -> None:
        """The layer is whole (and synced): make it visible."""
        with self._records.write() as db:
            db.mark_ready(layer_id, size=size, has_tarsplit=has_tarsplit, diff_id=diff_id)

    def abandon(self, layer_id: str) -> None:
        """Undo a failed or interrupted creation: content, references, tar-split, record."""
        try:
            self._mounts.release_all(layer_id)
            self._driver.remove(layer_id)
            self._tarsplits.remove(layer_id)
        finally:
            with self._records.write() as db:
                db.delete_layer(layer_id, unless_ready=True)

    # -- removing -----------------------------------------------------------------------

    def mark_removing(self, layer_id: str, *, snapshot: str | None = None) -> None:
        """The first step of a removal, refused for a layer with children or mounts, and
        for a layer a containerd snapshot names unless ``snapshot`` is that key (the
        snapshotter removing its own)."""
        with self._mounts.settled(layer_id), self._records.write() as db:
            rec = db.layer(layer_id)
            if rec is None:
                raise LayerNotFound(f"layer {layer_id} not found")
            owner = db.snapshot_of_layer(layer_id)
            if owner is not None and owner.key != snapshot:
                raise LayerNamedBySnapshot(layer_id, owner.key, owner.kind)
            kids = db.children(layer_id)
            if kids:
                more = f" and {len(kids) - 3} more" if len(kids) > 3 else ""
                raise LayerHasChildren(
                    f"layer {layer_id} has children ({', '.join(kids[:3])}{more}); remove them first")
            db.drop_refs_of_other_boots(boot_id(), layer_id)
            count = db.refcount(layer_id)
            if count and rec.complete:
                raise LayerBusy(f"layer {layer_id} is mounted ({count} reference{'s' * (count > 1)}); "
                                "unmount it first")
            db.set_state(layer_id, LayerState.REMOVING)

    def finish_remove(self, layer_id: str, *, record: RecordHook | None = None) -> None:
        """Delete what a *removing* layer has left, then its record."""
        self._mounts.release_all(layer_id)
        self._driver.remove(layer_id)
        self._tarsplits.remove(layer_id)
        with self._records.write() as db:
            db.delete_layer(layer_id)
            if record is not None:
                record(db)


def raise_no_space(layer_id: str, exc: BaseException) -> None:
    """Turn running out of space into one typed line naming the layer (the half-made layer
    is already gone when this is called)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        detail = exc.strerror if isinstance(exc, NoSpace) else os.strerror(exc.errno).lower()
        raise NoSpace(f"layer {layer_id}: {detail}; the layer was not kept", exc.errno) from None
