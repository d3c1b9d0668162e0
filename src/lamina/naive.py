"""The naive way: mount the layer (and its parent) and walk the views.

What the store does for a driver that cannot answer from its own layout, or declines to
for the arguments at hand (containers/storage calls it ``NaiveDiffDriver``, in
``drivers/fsdiff.go``): apply by unpacking into the mounted view, diff and changes by
comparing the mounted layer with its mounted parent, file access for tar-split replay by
opening files in the view. Slow (it walks whole trees) but exact for every driver,
because it sees only what a container would see.

Every view is taken with an ordinary mount reference (:mod:`lamina.mounts`) and given
back when the work, or the stream it returns, is done. The caller has pinned the layers
(or, for apply, holds the layer's work lock).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from lamina.archive.apply import ApplyOptions, apply_tar
from lamina.archive.change import Change, ChangeKind
from lamina.archive.changes import changes_dirs, changes_size
from lamina.archive.export import tar_changes, tar_tree
from lamina.drivers.base import DriverContext
from lamina.fs.getter import DirFileGetter, FileGetter
from lamina.mounts import Mounts


class Naive:
    """Mount-and-walk versions of the driver's optional operations."""

    def __init__(self, mounts: Mounts, ctx: DriverContext, *, drop_overlay_xattrs: bool = False) -> None:
        self._mounts = mounts
        self._ctx = ctx
        #: the driver shows layers through overlayfs: its own xattrs never come from a tar
        self._drop_overlay_xattrs = drop_overlay_xattrs

    @contextlib.contextmanager
    def _view(self, layer_id: str) -> Iterator[Path]:
        path = self._mounts.get(layer_id, persistent=False)
        try:
            yield path
        finally:
            self._mounts.put(layer_id, persistent=False)

    def apply(self, layer_id: str, stream: IO[bytes], tarsplit: IO[bytes]) -> int:
        """Unpack a layer tar into the view of the layer being made (its record still
        says creating: the caller holds its work lock)."""
        path = self._mounts.get(layer_id, persistent=False, complete_only=False)
        try:
            return apply_tar(path, stream, ApplyOptions(uid_map=self._ctx.uid_map, gid_map=self._ctx.gid_map,
                                                        tarsplit=tarsplit,
                                                        drop_overlay_xattrs=self._drop_overlay_xattrs))
        finally:
            self._mounts.put(layer_id, persistent=False)

    def diff(self, layer_id: str, against: str | None) -> tuple[Iterator[bytes], Callable[[], None]]:
        """The layer's changes against ``against`` as tar chunks, and the function that
        gives back the view once the chunks are read (or abandoned)."""
        path = self._mounts.get(layer_id, persistent=False)
        try:
            if against is None:
                chunks = tar_tree(path, uid_map=self._ctx.uid_map, gid_map=self._ctx.gid_map)
            else:
                with self._view(against) as ppath:
                    changes = changes_dirs(path, ppath)
                chunks = tar_changes(path, changes, uid_map=self._ctx.uid_map, gid_map=self._ctx.gid_map)
        except BaseException:
            self._mounts.put(layer_id, persistent=False)
            raise
        return chunks, lambda: self._mounts.put(layer_id, persistent=False)

    def changes(self, layer_id: str, against: str | None) -> list[Change]:
        with self._view(layer_id) as path:
            if against is None:
                return changes_dirs(path, None)
            with self._view(against) as ppath:
                return changes_dirs(path, ppath)

    def diff_size(self, layer_id: str, changes: list[Change]) -> int:
        """Bytes of the regular files among ``changes`` (deletions weigh nothing)."""
        with self._view(layer_id) as path:
            return changes_size(path, [c for c in changes if c.kind != ChangeKind.DELETE])

    def file_getter(self, layer_id: str, on_close: Callable[[], object]) -> FileGetter:
        """Open the layer's files in its view; closing gives the view back, then calls
        ``on_close``."""
        path = self._mounts.get(layer_id, persistent=False)

        def close() -> None:
            try:
                self._mounts.put(layer_id, persistent=False)
            finally:
                on_close()

        return DirFileGetter(path, on_close=close)
