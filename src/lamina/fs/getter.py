"""Opening a layer's files by tar name, never following a symlink out of the layer.

Used to rebuild a layer tar from tar-split: the tar-split lists names, the content comes
from the layer directory. A name is hostile input too (the tar-split came from a tar), so
each component is opened with O_NOFOLLOW beneath the layer root.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
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
    """Opens files under ``root`` by their tar name ("usr/bin/x", "./etc/y").

    Directory descriptors are kept open between calls (a tar lists a directory's files
    together), so rebuilding a tar of many small files costs one open per file instead
    of one per path component.
    """

    _KEEP = 64  # directory descriptors kept open at most

    def __init__(self, root: Path, on_close: Callable[[], object] | None = None) -> None:
        self.root = root
        self._on_close = on_close
        self._dirs: dict[tuple[str, ...], int] = {}

    def _dir(self, parts: tuple[str, ...]) -> int:
        fd = self._dirs.get(parts)
        if fd is not None:
            return fd
        if parts:
            parent = self._dir(parts[:-1])
            fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent)
        else:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if len(self._dirs) >= self._KEEP:
            self._drop_dirs()
        self._dirs[parts] = fd
        return fd

    def _drop_dirs(self) -> None:
        dirs, self._dirs = self._dirs, {}
        for fd in dirs.values():
            os.close(fd)

    def dir_fd(self, parts: tuple[str, ...]) -> int:
        """The fd of directory ``parts`` (clean names; () for the root), opened with
        O_NOFOLLOW per component and kept by the getter: valid until its next call.
        For tar-split replay in C (:mod:`lamina.archive.tar.replay`)."""
        if ".." in parts or "." in parts or "" in parts:
            raise FileNotFoundError(f"{'/'.join(parts)}: not a directory name inside the layer")
        return self._dir(tuple(parts))

    def get(self, name: str) -> IO[bytes]:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise FileNotFoundError(f"{name}: not a file name inside the layer")
        dfd = self._dir(tuple(parts[:-1]))
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        return os.fdopen(fd, "rb", buffering=0)

    def close(self) -> None:
        self._drop_dirs()
        cb, self._on_close = self._on_close, None
        if cb is not None:
            cb()
