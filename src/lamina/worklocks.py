"""The per-layer lock of long work: one byte-range lock per layer in ``locks/layers.lock``.

Making, filling or removing a layer holds it exclusively for as long as the work takes;
reading a layer's content (a diff, its changes) holds it shared, so the layer cannot be
removed or re-applied from under the reader. See :mod:`lamina.fs.locks` for why these
are OFD locks in one file.

Cleanup must tell work that died (the lock is free: the kernel releases the lock of a
killed process at once) from work still going on (held), and must sometimes hold a
layer for a moment while it tidies (releases a size-limit image, removes what a crash
left). Neither may make real work fail, which refuses a layer somebody holds rather
than wait behind work that can last minutes:

- looking (:meth:`WorkLocks.is_idle`) asks the kernel which lock is there (``F_OFD_GETLK``)
  and takes none, so it never stands in anybody's way;
- tidying (:meth:`WorkLocks.idle`) first marks the layer on a second byte of its own
  (the *tidy mark*), then takes the lock. Work that finds the lock taken and the mark
  set waits for the tidying to end (it is short) instead of failing.

Why this matters: containerd runs its garbage collector, and with it the snapshotter's
Cleanup, in the background after every removal; a Commit that met Cleanup's hold on
its layer failed with "in use by another operation".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from lamina.errors import LayerBusy
from lamina.fs.locks import KeyLock, lock_conflicts

#: How long work waits for cleanup to finish tidying a layer before it gives up.
TIDY_WAIT = 30.0


def _mark(layer_id: str) -> str:
    """The key of a layer's tidy mark (a NUL never appears in a layer ID)."""
    return layer_id + "\0tidy"


class WorkLocks:
    """The store's per-layer work locks."""

    def __init__(self, locks: Path, *, tidy_wait: float = TIDY_WAIT) -> None:
        self._path = locks / "layers.lock"
        self._path.touch(mode=0o600)
        self._tidy_wait = tidy_wait

    def _lock(self, layer_id: str) -> KeyLock:
        return KeyLock(self._path, layer_id)

    def take(self, layer_id: str, *, shared: bool = False, culprit: str = "") -> KeyLock:
        """The layer's lock, held (shared for reading): LayerBusy at once if other work
        holds it, after a wait if cleanup is tidying it. ``culprit`` replaces the
        error's default wording."""
        lock = self._lock(layer_id)
        deadline: float | None = None
        pause = 0.001
        while not lock.acquire(shared=shared, blocking=False):
            if not lock_conflicts(self._path, _mark(layer_id)):
                # no tidying: work holds it, unless the tidying ended just now
                if lock.acquire(shared=shared, blocking=False):
                    break
                raise LayerBusy(culprit or f"layer {layer_id} is in use by another operation "
                                "(reading or changing it)")
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + self._tidy_wait
            if now >= deadline:
                raise LayerBusy(f"layer {layer_id} is being tidied by a cleanup that took over "
                                f"{self._tidy_wait:g} s; try again")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return lock

    @contextlib.contextmanager
    def busy(self, layer_id: str) -> Iterator[None]:
        """Hold the layer's lock for long work (see :meth:`take`)."""
        lock = self.take(layer_id)
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def idle(self, layer_id: str) -> Iterator[bool]:
        """Cleanup's hold: yields whether nobody was at work on the layer (and, for the
        block, nobody can start; work that tries waits for the block to end)."""
        mark = KeyLock(self._path, _mark(layer_id))
        if not mark.acquire(blocking=False):  # another cleanup tidies it
            yield False
            return
        try:
            lock = self._lock(layer_id)
            got = lock.acquire(blocking=False)
            try:
                yield got
            finally:
                if got:
                    lock.release()
        finally:
            mark.release()

    def is_idle(self, layer_id: str) -> bool:
        """Whether nobody holds the layer's lock, asked without taking it."""
        return not lock_conflicts(self._path, layer_id)

