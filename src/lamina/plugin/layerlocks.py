"""Per-layer reader/writer locks for the requests one plugin process serves at once.

Why, when the store already locks: the store's own locks make a second writer *fail*
(``LayerBusy``) and hide a layer while it is made, which keeps the store whole; but a
request that merely arrives while another changes the same layer deserves to *wait* for
it, as dockerd's built-in drivers make it wait. And Remove's Docker-style release of
mounts dockerd left behind must never take away a mount that a Diff of this process is
still reading. So requests that use a layer (Get, Put, Diff for as long as its tar
streams, Changes, DiffSize, GetMetadata) share its lock, and requests that make or
delete it (Create, CreateReadWrite, ApplyDiff for as long as its body streams, Remove)
hold it alone. Waiting writers go first, so a stream of reads cannot starve a Remove.

The locks live on the event loop: they cost no thread while a request waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class _State:
    readers: int = 0
    writing: bool = False
    writers_waiting: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def idle(self) -> bool:
        return not (self.readers or self.writing or self.writers_waiting)


class LayerLocks:
    """Reader/writer locks keyed by layer ID; entries exist only while in use."""

    def __init__(self) -> None:
        self._states: dict[str, _State] = {}

    def _state(self, layer_id: str) -> _State:
        state = self._states.get(layer_id)
        if state is None:
            state = self._states[layer_id] = _State()
        return state

    def _forget_if_idle(self, layer_id: str, state: _State) -> None:
        if state.idle and self._states.get(layer_id) is state:
            del self._states[layer_id]

    @contextlib.asynccontextmanager
    async def using(self, layer_id: str) -> AsyncIterator[None]:
        """Shared: many requests may use a layer at once, none while it changes."""
        state = self._state(layer_id)
        if state.writing or state.writers_waiting:
            async with state.changed:
                await state.changed.wait_for(lambda: not state.writing and not state.writers_waiting)
                state.readers += 1
        else:  # the common case, settled without the condition: nothing awaits in between
            state.readers += 1
        try:
            yield
        finally:
            state.readers -= 1
            if state.writers_waiting:  # only a writer waits for readers to go
                async with state.changed:
                    state.changed.notify_all()
            self._forget_if_idle(layer_id, state)

    @contextlib.asynccontextmanager
    async def changing(self, layer_id: str) -> AsyncIterator[None]:
        """Exclusive: waits for every user and writer of the layer to finish."""
        state = self._state(layer_id)
        async with state.changed:
            state.writers_waiting += 1
            try:
                await state.changed.wait_for(lambda: not state.writing and not state.readers)
            except BaseException:  # cancelled while waiting: let the readers behind us in
                state.writers_waiting -= 1
                state.changed.notify_all()
                raise
            state.writers_waiting -= 1
            state.writing = True
        try:
            yield
        finally:
            async with state.changed:
                state.writing = False
                state.changed.notify_all()
            self._forget_if_idle(layer_id, state)

    def busy(self) -> list[str]:
        """IDs with a lock held or awaited (for tests and debugging)."""
        return sorted(self._states)
