"""Mount references, counted across processes: the first reference mounts, the last unmounts.

Why a module of its own: counting is a protocol between processes (the CLI's ``mount``
and ``umount`` are two of them, the plugin serves Get and Put in threads), and the
kernel's part of it (an overlay or loop mount, tens of milliseconds; an unmount that may
wait for the filesystem) must never run inside a write transaction, where it would hold
``BEGIN IMMEDIATE`` against every process on the store. So each change is three steps:

1. **claim**, in one short transaction: check the layer, and if its view is mounted
   already (this boot, with references) take a reference and return: the common case,
   one transaction;
2. **mount** (or unmount) outside any transaction;
3. **record**, in another short transaction: the view's path and the new reference
   (or, after an unmount, that nothing is mounted).

Between the steps the records and the kernel disagree, so two locks keep anyone from
acting on the gap:

* a per-layer *mount lock* (``locks/mounts.lock``, one byte-range lock per layer) is held
  across all three steps by whoever gets, puts or releases that layer, and by the store
  while it decides a layer's fate from its count (``remove``, an ``apply_diff`` into an
  existing layer: :meth:`Mounts.settled`), so the count it reads cannot change under it;
* every kernel mount holds ``locks/mounting.lock`` shared, and the search for leaked
  mounts (views no record names) takes it exclusively (:meth:`Mounts.no_mount_in_flight`),
  so a mount made a moment ago and about to be recorded is never taken for a leak.

A crash between the steps leaves what cleanup already knows how to mend: a view mounted
with no record (a leaked mount), or a record with no reference (a mount with no
reference, unmounted). A reference is only ever written together with the mount it
stands for, so a crash can never leave a reference to nothing.

References carry the boot they were taken in and the process that took them (see
:mod:`lamina.liveness`); ``persistent`` ones (the CLI's ``mount``, dockerd's Get) belong
to no process and are released only by a persistent put or by cleanup.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from lamina import liveness
from lamina.drivers.base import Driver
from lamina.errors import LayerNotFound
from lamina.fs.locks import FileLock, KeyLockTable
from lamina.records import LayerState, MountRef, Records, Writer

T = TypeVar("T")


class Mounts:
    """The store's mount references and the driver mounts they stand for."""

    def __init__(self, records: Records, driver: Driver, locks: Path) -> None:
        self._records = records
        self._driver = driver
        (locks / "mounts.lock").touch(mode=0o600)
        self._layer_locks = KeyLockTable(locks / "mounts.lock")
        self._mounting = locks / "mounting.lock"
        #: the Path of each view path seen, so the common get makes no new object
        self._paths: dict[str, Path] = {}

    def settled(self, layer_id: str) -> contextlib.AbstractContextManager[None]:
        """Hold the layer's mount lock: no reference of it is taken or released, and no
        view of it mounted or unmounted, until the block ends."""
        return self._layer_locks.held(layer_id)

    @contextlib.contextmanager
    def no_mount_in_flight(self, timeout: float = 2.0) -> Iterator[bool]:
        """Hold off new kernel mounts for the block; yields False if mounts kept going
        for ``timeout`` seconds (then the caller must not judge the mount table)."""
        lock = FileLock(self._mounting)
        deadline = time.monotonic() + timeout
        while not lock.acquire(blocking=False):
            if time.monotonic() >= deadline:
                yield False
                return
            time.sleep(0.01)
        try:
            yield True
        finally:
            lock.release()

    # -- get and put ----------------------------------------------------------------

    def get(self, layer_id: str, *, persistent: bool, mount_label: str = "",
            complete_only: bool = True) -> Path:
        """Take a reference, mounting the view if it is the first; return the view.

        ``complete_only=False`` lets apply mount the layer it is filling (its record
        says creating; the caller holds the layer's lock).
        """
        pid, start = liveness.me()
        boot = liveness.boot_id()
        with self.settled(layer_id):
            with self._records.write(durable=False) as db:  # claim
                claim = db.mount_claim(layer_id)
                if claim is None or (complete_only and claim.state is not LayerState.READY):
                    raise LayerNotFound(f"layer {layer_id} not found")
                if claim.path is not None and claim.boot_id == boot and claim.refs:
                    # mounted in this boot: no reference of an earlier one is left for it
                    # (the get that mounted it dropped them)
                    db.add_ref(layer_id, pid=pid, pid_start=start, persistent=persistent, boot_id=boot)
                    return self._path(claim.path)
                db.drop_refs_of_other_boots(boot, layer_id)
                chain = db.chain(layer_id)
            in_flight = FileLock(self._mounting)
            in_flight.acquire(shared=True)
            try:
                path = self._driver.mount(layer_id, chain, rw=claim.rw,  # mount
                                          mount_label=mount_label or claim.mount_label)
                try:
                    with self._records.write(durable=False) as db:  # record
                        db.set_mount(layer_id, str(path), boot)
                        db.add_ref(layer_id, pid=pid, pid_start=start, persistent=persistent, boot_id=boot)
                except BaseException:
                    self._driver.unmount(layer_id)
                    raise
            finally:
                in_flight.release()
        return path

    def try_get(self, layer_id: str, *, persistent: bool) -> Path | None:
        """:meth:`get` of a view that is mounted already, never waiting and never
        mounting: None where it would have to (the view is not mounted, someone holds the
        layer's mount lock or the records); the caller then calls :meth:`get`.

        Why so terse: dockerd gets and puts a layer on every container start and exec,
        and through the plugin each is a call on its event loop; one statement under
        the layer's lock is what it costs."""
        pid, start = liveness.me()

        def claim(db: Writer) -> Path | None:
            path = db.claim_mounted(layer_id, pid=pid, pid_start=start, persistent=persistent,
                                    boot_id=liveness.boot_id())
            if path is not None:
                return self._path(path)
            claim = db.mount_claim(layer_id)  # not the quick case: no layer is an error at once
            if claim is None or claim.state is not LayerState.READY:
                raise LayerNotFound(f"layer {layer_id} not found")
            return None

        return self._at_once(layer_id, claim)

    def try_put(self, layer_id: str, *, persistent: bool) -> bool | None:
        """:meth:`put` of a reference that is not the last, never waiting and never
        unmounting: True if one was released, False if none was held, None where it
        would have to wait or unmount (a lock held elsewhere, the last reference); the
        caller then calls :meth:`put`. The quick case is one statement; the others ask
        again, as they lead to a mount, an unmount or an error anyway."""
        pid, start = liveness.me()

        def release(db: Writer) -> bool | None:
            if db.release_not_last(layer_id, persistent=persistent, pid=pid, pid_start=start):
                return True
            choice = db.put_choice(layer_id, persistent=persistent, pid=pid, pid_start=start)
            if choice is None:
                raise LayerNotFound(f"layer {layer_id} not found")
            return False if choice[0] is None else None  # none held; or the last: it unmounts

        return self._at_once(layer_id, release)

    def _at_once(self, layer_id: str, step: Callable[[Writer], T]) -> T | None:
        """``step`` under the layer's mount lock in a reference transaction, or None at
        once where either would have to wait (for :meth:`try_get` and :meth:`try_put`)."""
        locks = self._layer_locks
        if not locks.try_acquire(layer_id):
            return None
        try:
            with self._records.try_write(durable=False) as db:
                return None if db is None else step(db)
        finally:
            locks.release(layer_id)

    def put(self, layer_id: str, *, persistent: bool) -> bool:
        """Release one reference; the last one unmounts. False if none was held.

        The reference released is this process's own if it has one (or a persistent one
        for ``persistent=True``), else the oldest: dockerd puts what a plugin process
        that has since restarted got.
        """
        pid, start = liveness.me()
        with self.settled(layer_id):
            with self._records.write(durable=False) as db:  # claim
                choice = db.put_choice(layer_id, persistent=persistent, pid=pid, pid_start=start)
                if choice is None:
                    raise LayerNotFound(f"layer {layer_id} not found")
                ref, count = choice
                if ref is None:
                    return False
                db.drop_ref(ref)
                last = count == 1
            if last:
                self._unmount(layer_id)
        return True

    def _path(self, text: str) -> Path:
        path = self._paths.get(text)
        if path is None:
            path = self._paths[text] = Path(text)
        return path

    def _unmount(self, layer_id: str) -> None:
        """Unmount a view nobody references (caller holds the mount lock), then say so."""
        self._driver.unmount(layer_id)
        with self._records.write(durable=False) as db:
            db.drop_mount(layer_id)

    # -- releasing (removal, failures, recovery) ------------------------------------------

    def release_all(self, layer_id: str) -> None:
        """Drop every reference of a layer and unmount it (a layer being removed or
        abandoned: nobody may keep using it)."""
        with self.settled(layer_id):
            with self._records.read() as db:
                if not db.refcount(layer_id) and db.mount(layer_id) is None:
                    return  # nothing to release: spare two durable commits (a remove's common case)
            with self._records.write() as db:
                mounted = bool(db.refcount(layer_id)) or db.mount(layer_id) is not None
                db.drop_refs(layer_id)
            if mounted:
                self._driver.unmount(layer_id)
            with self._records.write() as db:
                db.drop_mount(layer_id)

    def drop_ref(self, ref: MountRef) -> bool:
        """Forget one given reference (a dead process's); False if it was gone already.
        Its view, if that was the last reference, is for :meth:`unmount_unreferenced`."""
        with self.settled(ref.layer), self._records.write(durable=False) as db:
            return db.drop_ref(ref.ref)

    def drop_every_reference(self) -> int:
        """Forget every reference (dockerd's Cleanup at shutdown: nothing is in use any
        more); the views go with :meth:`unmount_unreferenced`. Returns how many."""
        with self._records.write(durable=False) as db:
            refs = db.refs()
            for ref in refs:
                db.drop_ref(ref.ref)
        return len(refs)

    def unmount_unreferenced(self, layer_id: str) -> bool:
        """Unmount a view recorded as mounted that no reference holds; False if it has
        a reference (again) or no record by now."""
        with self.settled(layer_id):
            with self._records.read() as db:
                if db.refcount(layer_id) or db.mount(layer_id) is None:
                    return False
            self._unmount(layer_id)
        return True
