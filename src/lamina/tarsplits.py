"""The store's tar-splits: ``ROOT/tarsplit/<id>.json.gz``, one per imported layer.

Why the store keeps them and no driver does: a tar-split is what makes ``diff`` of an
unchanged imported layer give back the very bytes it was made from (same DiffID), for
every driver alike; a driver only has to open its files by tar name
(:meth:`lamina.drivers.base.Driver.diff_getter`). One copy, one place, one rule for
crash safety: the record goes to ``tmp/`` while the tar is applied and is renamed into
place only after the layer's files are synced, just before the record says ready, so a
ready layer that says it has a tar-split has a whole one.
"""

from __future__ import annotations

import contextlib
import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lamina.fs import staging
from lamina.fs.private import PRIVATE_FILE

try:  # ISA-L's gzip: the same format, several times faster both ways (a pinned dependency)
    from isal import igzip as _gzip

    _GzipFile = _gzip.IGzipFile
except ImportError:  # pragma: no cover - isal is installed with lamina
    _gzip = gzip  # type: ignore[assignment]
    _GzipFile = gzip.GzipFile  # type: ignore[assignment,misc]

SUFFIX = ".json.gz"


class TarSplits:
    """The tar-split records under one store root."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "tarsplit"
        self._tmp = root / "tmp"

    def path(self, layer_id: str) -> Path:
        return self.dir / f"{layer_id}{SUFFIX}"

    def exists(self, layer_id: str) -> bool:
        return self.path(layer_id).exists()

    @contextlib.contextmanager
    def recording(self, layer_id: str) -> Iterator[IO[bytes]]:
        """A gzip stream to write ``layer_id``'s tar-split into; the partial file is
        deleted if the block fails, and kept aside for :meth:`keep` if it ends well."""
        partial = staging.tarsplit(self._tmp, layer_id)
        try:
            # born 0600: a tar-split names every file of the layer (lamina.fs.private)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE)
            with open(fd, "wb") as raw, _GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out:
                yield out  # type: ignore[misc]
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def discard(self, layer_id: str) -> None:
        """Delete a recorded tar-split that will not be kept (its layer failed after the
        recording ended, or its recorder was killed)."""
        staging.tarsplit(self._tmp, layer_id).unlink(missing_ok=True)

    def keep(self, layer_id: str) -> None:
        """Put the recorded tar-split in place (after the layer's files are synced)."""
        os.replace(staging.tarsplit(self._tmp, layer_id), self.path(layer_id))

    def open(self, layer_id: str) -> IO[bytes]:
        return _gzip.open(self.path(layer_id), "rb")  # type: ignore[return-value]

    def remove(self, layer_id: str) -> None:
        self.path(layer_id).unlink(missing_ok=True)

    def names(self) -> list[str]:
        """The file names in ``tarsplit/``, sorted."""
        return sorted(p.name for p in self.dir.iterdir())

    @staticmethod
    def owner(name: str) -> str:
        """The layer a file name of :meth:`names` belongs to."""
        return name.removesuffix(SUFFIX)
