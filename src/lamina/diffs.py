"""Reading a layer's content: its diff, its changes, their size, its files by tar name.

Each read takes the cheapest way that gives the right answer, in this order:

1. **tar-split replay**: an unchanged imported layer, asked against its own parent,
   gives back the very tar it was made from (same DiffID), rebuilt from its tar-split
   (:mod:`lamina.tarsplits`) and its files;
2. **native**: a driver that can answer from its own layout (a
   :class:`~lamina.drivers.base.NativeDiff` and friends) does, unless it declines;
3. **naive**: mount and walk (:mod:`lamina.naive`).

While a layer is read it is *pinned*: its work lock is held shared, so ``remove`` and
``apply_diff`` (which take it exclusively) fail with LayerBusy instead of deleting the
files being read. A stream or getter holds its pins until it is closed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import IO

from lamina.archive.change import Change
from lamina.archive.tar.split import reassemble
from lamina.drivers.base import Capabilities, FileGetter
from lamina.fs.locks import KeyLock
from lamina.naive import Naive
from lamina.records import LayerRecord, Records
from lamina.streams import open_chunks
from lamina.tarsplits import TarSplits
from lamina.worklocks import WorkLocks


class Diffs:
    """The store's read operations on layer content (IDs already checked)."""

    def __init__(self, records: Records, work_locks: WorkLocks, tarsplits: TarSplits,
                 native: Capabilities, naive: Naive, *, own_chain: bool = False,
                 readable: Callable[[str], contextlib.AbstractContextManager[None]] | None = None) -> None:
        self._records = records
        #: the driver's Driver.readable: a pinned layer's files are readable to us until unpinned
        self._readable = readable
        #: the driver's diffs ignore the parent asked for (Driver.exports_against_own_chain)
        self._own_chain = own_chain
        self._locks = work_locks
        self._tarsplits = tarsplits
        self._native = native
        self._naive = naive

    # -- pins ---------------------------------------------------------------------------

    def pin(self, *layer_ids: str | None) -> Callable[[], None]:
        """Pin complete layers (None is skipped); return the function that lets go."""
        locks: list[KeyLock] = []
        readable = contextlib.ExitStack()

        def release() -> None:
            try:
                readable.close()
            finally:
                for lock in locks:
                    lock.release()

        try:
            for lid in layer_ids:
                if lid is None:
                    continue
                locks.append(self._locks.take(lid, shared=True, culprit=(
                    f"layer {lid} is being changed or removed by another operation")))
                self._records.ready(lid)  # it cannot go away now; make sure it had not already
                if self._readable is not None:
                    readable.enter_context(self._readable(lid))
        except BaseException:
            release()
            raise
        return release

    def _pin_against(self, layer_id: str, parent: str | None) -> tuple[LayerRecord, str | None, Callable[[], None]]:
        """Resolve ``parent`` (None: the recorded parent; "": nothing; else that complete
        layer) and pin both; returns the layer's record, the parent and the unpin."""
        rec = self._records.ready(layer_id)
        if parent is None:
            against = rec.parent
        elif parent == "":
            against = None
        else:
            self._records.ready(parent)
            against = parent
        return rec, against, self.pin(layer_id, against)

    @contextlib.contextmanager
    def _pinned(self, layer_id: str, parent: str | None) -> Iterator[str | None]:
        _, against, unpin = self._pin_against(layer_id, parent)
        try:
            yield against
        finally:
            unpin()

    # -- the reads ----------------------------------------------------------------------

    def diff(self, layer_id: str, parent: str | None) -> IO[bytes]:
        rec, against, unpin = self._pin_against(layer_id, parent)
        try:
            chunks, release = self._diff_chunks(rec, against)
        except BaseException:
            unpin()
            raise

        def done() -> None:
            try:
                if release is not None:
                    release()
            finally:
                unpin()

        return open_chunks(chunks, done)

    def _diff_chunks(self, rec: LayerRecord, against: str | None) -> tuple[Iterator[bytes], Callable[[], None] | None]:
        layer_id = rec.id
        if rec.has_tarsplit and not rec.rw and (against == rec.parent or self._own_chain):
            getter = self.file_getter(layer_id)
            try:
                ts = self._tarsplits.open(layer_id)
            except BaseException:
                getter.close()
                raise

            def done() -> None:
                try:
                    ts.close()
                finally:
                    getter.close()

            return reassemble(ts, getter), done
        if self._native.diff is not None:
            native = self._native.diff.diff(layer_id, against)
            if native is not None:
                return native, None
        return self._naive.diff(layer_id, against)

    def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        with self._pinned(layer_id, parent) as against:
            return self._changes(layer_id, against)

    def _changes(self, layer_id: str, against: str | None) -> list[Change]:
        if self._native.changes is not None:
            native = self._native.changes.changes(layer_id, against)
            if native is not None:
                return sorted(native)
        return self._naive.changes(layer_id, against)

    def diff_size(self, layer_id: str, parent: str | None) -> int:
        with self._pinned(layer_id, parent) as against:
            native = self.native_diff_size(layer_id, against)
            if native is not None:
                return native
            return self._naive.diff_size(layer_id, self._changes(layer_id, against))

    def native_diff_size(self, layer_id: str, against: str | None) -> int | None:
        """The driver's own answer, or None where it has none (no walking here)."""
        if self._native.diff_size is None:
            return None
        size = self._native.diff_size.diff_size(layer_id, against)
        return None if size is None else int(size)

    def file_getter(self, layer_id: str) -> FileGetter:
        self._records.ready(layer_id)
        unpin = self.pin(layer_id)
        try:
            if self._native.files is None:
                return self._naive.file_getter(layer_id, on_close=unpin)
            return _ClosingGetter(self._native.files.diff_getter(layer_id), unpin)
        except BaseException:
            unpin()
            raise


class _ClosingGetter(FileGetter):
    """A driver's getter that also lets go of the store's pin when closed."""

    def __init__(self, inner: FileGetter, on_close: Callable[[], None]) -> None:
        self._inner = inner
        self._on_close: Callable[[], None] | None = on_close

    def get(self, name: str) -> IO[bytes]:
        return self._inner.get(name)

    @property
    def dir_fd(self) -> Callable[[tuple[str, ...]], int] | None:
        """The inner getter's directory fds, if it hands them out (tar-split replay in C)."""
        return getattr(self._inner, "dir_fd", None)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            cb, self._on_close = self._on_close, None
            if cb is not None:
                cb()
