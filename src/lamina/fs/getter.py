"""Opening a layer's files by tar name, never following a symlink out of the layer.

Used to rebuild a layer tar from tar-split: the tar-split lists names, the content comes
from the layer directory. A name is hostile input too (the tar-split came from a tar), so
each component is opened with O_NOFOLLOW beneath the layer root.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import IO


class FileGetter(abc.ABC):
    """Opens a layer's files by their name in the layer tar (tar-split reassembly)."""

    @abc.abstractmethod
    def get(self, name: str) -> IO[bytes]:
        """Open the file the tar called ``name`` (no leading "/")."""

    def close(self) -> None:  # noqa: B027 - optional hook: most getters hold nothing
        """Release whatever the getter holds (a mount, open files)."""

    def __enter__(self) -> FileGetter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirFileGetter(FileGetter):
    """Opens files under ``root`` by their tar name ("usr/bin/x", "./etc/y")."""

    def __init__(self, root: Path, on_close=None) -> None:  # type: ignore[no-untyped-def]
        self.root = root
        self._on_close = on_close

    def get(self, name: str) -> IO[bytes]:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise FileNotFoundError(f"{name}: not a file name inside the layer")
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                os.close(dfd)
                dfd = nfd
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            os.close(dfd)
        return os.fdopen(fd, "rb", buffering=1 << 20)

    def close(self) -> None:
        cb, self._on_close = self._on_close, None
        if cb is not None:
            cb()
