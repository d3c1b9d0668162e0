"""The per-layer lock of long work: one byte-range lock per layer in ``locks/layers.lock``.

Making, filling or removing a layer holds it exclusively for as long as the work takes;
reading a layer's content (a diff, its changes) holds it shared, so the layer cannot be
removed or re-applied from under the reader. Cleanup tells work that died (the lock is
free) from work still going on (held) by trying it without waiting: the kernel releases
the lock of a killed process at once. See :mod:`lamina.fs.locks` for why these are OFD
locks in one file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from lamina.errors import LayerBusy
from lamina.fs.locks import KeyLock


class WorkLocks:
    """The store's per-layer work locks."""

    def __init__(self, locks: Path) -> None:
        self._path = locks / "layers.lock"
        self._path.touch(mode=0o600)

    def lock(self, layer_id: str) -> KeyLock:
        return KeyLock(self._path, layer_id)

    @contextlib.contextmanager
    def busy(self, layer_id: str) -> Iterator[None]:
        """Hold the layer's lock for long work; LayerBusy at once if anyone has it."""
        lock = self.lock(layer_id)
        if not lock.acquire(blocking=False):
            raise LayerBusy(f"layer {layer_id} is in use by another operation (reading or changing it)")
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def idle(self, layer_id: str) -> Iterator[bool]:
        """Try the layer's lock without waiting; yields whether nobody was at work on it
        (and, for the block, nobody can start)."""
        lock = self.lock(layer_id)
        got = lock.acquire(blocking=False)
        try:
            yield got
        finally:
            if got:
                lock.release()

    def is_idle(self, layer_id: str) -> bool:
        with self.idle(layer_id) as free:
            return free
