"""The store's own metadata is private: files 0600, directories 0700, the root 0711.

Why: ``meta.db`` (and its WAL files), ``lamina.json``, overlay's ``l/`` links and the
tar-splits name every layer, its parent and where it is mounted; readable by every local
user they told anyone what images a machine runs. Nothing but the store reads them, and
the store runs as their owner.

Why the root stays 0711 (as Docker keeps ``/var/lib/docker``): execute without read lets
a process that was given a path below (a container runtime entering a view in a user
namespace) reach it without listing anything. Overlay views need no more than that: the
kernel reaches the lower and upper directories with the credentials of whoever mounted
them, and a container process, however unprivileged, only ever looks inside the view.

Modes are only ever narrowed here (bits beyond the wanted mode are taken away, none are
added), so a root a user made 0700 stays 0700; a store made by an older lamina is
narrowed when it is next opened.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
ROOT_MODE = 0o711


def narrow(path: Path, wanted: int) -> None:
    """Take away the mode bits of ``path`` beyond ``wanted``; nothing if it is missing
    or a symlink (a link's own mode means nothing, and it is never followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & ~wanted:
        with contextlib.suppress(FileNotFoundError):  # a WAL file checkpointed away
            os.chmod(path, mode & wanted, follow_symlinks=False)


def private_dir(path: Path) -> None:
    """Make (parents included) or narrow a directory of the store's own to 0700."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    narrow(path, PRIVATE_DIR)


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it is missing, else narrow it to 0600:
    so a file another library creates (SQLite's database, whose WAL files copy its
    mode) is born private rather than made private after a window of being readable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
    except FileExistsError:
        narrow(path, PRIVATE_FILE)
    else:
        os.close(fd)


__all__ = ["PRIVATE_DIR", "PRIVATE_FILE", "ROOT_MODE", "narrow", "private_dir", "private_file"]
