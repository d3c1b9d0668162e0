"""What the faces above the store need of it, as one Protocol: :class:`LayerStore`.

Why a Protocol and not the class: the image code (load, save, remove, recover) uses a
slice of :class:`lamina.store.Store`, and naming that slice lets another implementation
stand in for the disk store, as dulwich's ``MemoryObjectStore`` stands in for its disk
object store: the tests of the image code run against an in-memory fake that satisfies
the same Protocol (``tests/images_support.MemoryStore``), so they test the image logic
alone, fast, and a test checks that both the fake and the real store satisfy it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO, Protocol, runtime_checkable


class LayerInfo(Protocol):
    """What a face reads from a layer's record (:class:`lamina.records.LayerRecord`)."""

    @property
    def id(self) -> str: ...

    @property
    def parent(self) -> str | None: ...

    @property
    def rw(self) -> bool: ...

    @property
    def diff_id(self) -> str | None: ...

    @property
    def size(self) -> int | None: ...


class ChainApplier(Protocol):
    """What :meth:`LayerStore.chain_apply` returns (:mod:`lamina.chainapply`): a context
    manager whose exit abandons every layer added and not finished."""

    #: layers that may be pending at once
    jobs: int

    def add(self, layer_id: str, parent: str | None, stream: IO[bytes], *,
            expected_diff_id: str | None = None, size_hint: int | None = None) -> None:
        """Start making ``layer_id`` over ``parent`` (the layer added last, if pending);
        ``size_hint``: about how many bytes ``stream`` holds."""

    def finish(self, layer_id: str) -> int:
        """Wait for the oldest pending layer and make it ready; its size, or its error."""

    def __enter__(self) -> ChainApplier: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class LayerStore(Protocol):
    """A store of layers as the image faces use it (see the module docstring)."""

    #: the store's root: faces keep their own records beside the layers (``images/``)
    root: Path

    def exists(self, layer_id: str, /) -> bool:
        """Whether a complete layer has this ID."""

    def layer(self, layer_id: str, /) -> LayerInfo:
        """The record of a complete layer (LayerNotFound if there is none)."""

    def children(self, layer_id: str, /) -> list[str]:
        """The IDs of the layers made on this one."""

    def create_rw(self, layer_id: str, parent: str | None = None, /) -> None:
        """A new, empty read-write layer over ``parent``."""

    def apply_diff(self, layer_id: str, parent: str | None, stream: IO[bytes], /, *,
                   expected_diff_id: str | None = None) -> int:
        """A new read-only layer from a layer tar; the DiffID must match when given,
        else nothing is kept (DiffIDMismatch). Returns the bytes of content applied."""

    def chain_apply(self, jobs: int | None = None, /, *, sizes: Sequence[int] | None = None) -> ChainApplier:
        """Layers of one chain from their tars, bottom up: ``add`` each, ``finish`` each
        in the same order (several may be unpacked side by side meanwhile); ``sizes``:
        about how many bytes each layer to come holds, if known."""

    def diff(self, layer_id: str, parent: str | None = None, /) -> IO[bytes]:
        """The layer's tar (for a layer made by apply_diff, the very bytes applied)."""

    def remove(self, layer_id: str, /) -> None:
        """Remove a layer that has no children and no mounts."""
