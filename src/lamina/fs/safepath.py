"""Reach paths beneath a root directory without ever following a symlink.

Why: a layer tar (or a layer's own content) may plant a symlink such as ``etc ->
/host/etc`` and then name ``etc/passwd``. Joining strings and checking prefixes cannot
see that; only resolving one component at a time with ``openat(O_NOFOLLOW)`` from a
directory descriptor can. Every function here works from a directory fd that the
caller already trusts (the layer root) and only ever moves downwards from it.

Names are relative, slash-separated, and cleaned lexically first (``a/./b`` is
``a/b``, ``a/../b`` is ``b``); a name that is absolute, or whose ``..`` would climb
above the root, is refused. Refusals raise :class:`UnsafePath`, which callers turn into
their own typed error (``InvalidArchive`` for a tar entry, for instance).
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import stat
from collections.abc import Callable, Sequence

from lamina.fs import relax

#: flags for opening a directory component: never follow, never a controlling tty
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(ValueError):
    """A path that would leave the root, or go through a symlink or a non-directory.

    ``path`` is the name as given; ``reason`` says what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def clean_parts(name: str) -> list[str]:
    """Split a relative name into components, cleaned lexically.

    ``""``, ``"."`` and ``"./"`` give ``[]`` (the root itself). Absolute names and
    names whose ``..`` climbs above the root raise :class:`UnsafePath`.
    """
    if name.startswith("/"):
        raise UnsafePath(name, "absolute name")
    parts = name.split("/")
    if "" not in parts and "." not in parts and ".." not in parts:
        return parts
    out: list[str] = []
    for part in parts:
        if part == "" or part == ".":
            continue
        if part == "..":
            if not out:
                raise UnsafePath(name, "'..' climbs out of the root")
            out.pop()
        else:
            out.append(part)
    return out


def _refusal(dir_fd: int, part: str, shown: str) -> UnsafePath:
    """Why ``part`` in ``dir_fd`` cannot be entered as a directory."""
    try:
        st = os.stat(part, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return UnsafePath(shown, "cannot be opened as a directory")
    if stat.S_ISLNK(st.st_mode):
        return UnsafePath(shown, "is a symlink; paths are never followed through symlinks")
    return UnsafePath(shown, "is not a directory")


def open_child_dir(dir_fd: int, part: str, shown: str, *, create: bool = False,
                   mode: int = 0o755,
                   on_create: Callable[[int], None] | None = None,
                   before_create: Callable[[], None] | None = None) -> int:
    """Open directory ``part`` inside ``dir_fd`` without following a symlink.

    With ``create``, a missing directory is made with ``mode`` (umask applies):
    ``before_create()`` is called first (it may raise to refuse), ``on_create(fd)``
    after, with the new fd (to set its owner, say). ``shown`` names the path in errors.
    Raises :class:`UnsafePath` for a symlink or a non-directory, ``FileNotFoundError``
    when missing and not ``create``.
    """
    try:
        return os.open(part, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refusal(dir_fd, part, shown) from None
        raise
    if before_create is not None:
        before_create()
    try:
        os.mkdir(part, mode, dir_fd=dir_fd)
        made = True
    except FileExistsError:  # made meanwhile; opened below with the same checks
        made = False
    try:
        fd = os.open(part, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refusal(dir_fd, part, shown) from None
        raise
    if made and on_create is not None:
        try:
            on_create(fd)
        except BaseException:
            os.close(fd)
            raise
    return fd


def open_dir(root_fd: int, parts: Sequence[str], *, create: bool = False,
             mode: int = 0o755, on_create: Callable[[int], None] | None = None) -> int:
    """Open the directory ``parts`` beneath ``root_fd``; the caller closes the fd.

    ``parts`` must be cleaned (see :func:`clean_parts`). An empty ``parts`` gives a new
    fd for the root itself.
    """
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            nfd = open_child_dir(fd, part, "/".join(parts[:i + 1]), create=create,
                                 mode=mode, on_create=on_create)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(root_fd: int, name: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """Open the file ``name`` beneath ``root_fd`` with ``flags``, following no symlink.

    The last component is opened with ``O_NOFOLLOW`` too, so a symlink there gives
    ``ELOOP`` rather than its target. For the tar-split getter and the like.
    """
    parts = clean_parts(name)
    if not parts:
        raise UnsafePath(name, "names the root itself, not a file beneath it")
    dir_fd = open_dir(root_fd, parts[:-1])
    try:
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def remove_at(dir_fd: int, name: str) -> bool:
    """Remove entry ``name`` of ``dir_fd``, a whole tree if it is a directory.

    Symlinks are removed, never followed (``shutil.rmtree`` with ``dir_fd`` works from
    fds too). Returns False if there was nothing to remove.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        try:
            shutil.rmtree(name, dir_fd=dir_fd)
        except PermissionError:
            # a 0000 directory inside, met by its unprivileged owner: widened and removed
            relax.remove_at(dir_fd, name, name)
    else:
        os.unlink(name, dir_fd=dir_fd)
    return True


class DirCache:
    """Directory fds along the path of the directory currently being filled.

    A layer tar lists a directory's entries together, so the parent of the next entry
    is nearly always the parent of the last one, or a near relative. Keeping the fds of
    the current directory and its ancestors open turns most lookups into a list
    comparison, and a move to a sibling into one ``openat``. At most ``MAX_OPEN`` fds
    stay open; deeper ancestors are closed and reopened from the nearest open one when
    needed.

    Whoever removes or replaces a directory beneath the root must call
    :meth:`forget` with its path, so no stale fd is used afterwards.
    """

    MAX_OPEN = 64

    def __init__(self, root_fd: int, *, mode: int = 0o755,
                 on_create: Callable[[int], None] | None = None,
                 before_create: Callable[[list[str]], None] | None = None) -> None:
        self.root_fd = root_fd
        self._mode = mode
        self._on_create = on_create
        #: called with a missing directory's path before it is made; may raise
        self._before_create = before_create
        self._names: list[str] = []
        self._fds: list[int] = []  # _fds[i] is the fd of _names[:i+1]; -1 when closed
        self._open = 0
        #: called with each directory fd when it is opened (not created): lets the
        #: caller learn about existing directories (their setgid bit, say)
        self.on_open: Callable[[list[str], int], None] | None = None
        #: called as ``on_denied(parent_fd, name, path)`` when opening an existing
        #: directory is refused for want of permission: returns an fd it got another way
        #: (its owner widening the mode) or raises
        self.on_denied: Callable[[int, str, list[str]], int] | None = None

    def get(self, parts: Sequence[str], *, create: bool = True) -> int:
        """The fd of directory ``parts`` (cleaned), opening and creating as needed.

        The fd stays owned by the cache: do not close it.
        """
        names = self._names
        if len(parts) == len(names) and parts == names:
            return self._fds[-1] if names else self.root_fd
        common = 0
        limit = min(len(parts), len(names))
        while common < limit and names[common] == parts[common]:
            common += 1
        if common == len(parts):  # an ancestor of the current directory
            return self._fd_at(common)
        self._truncate(common)
        fd = self._fd_at(common)
        check = self._before_create
        for i in range(common, len(parts)):
            part = parts[i]
            before = None if check is None else functools.partial(check, list(parts[:i + 1]))
            nfd = self._open_dir(fd, list(parts[:i + 1]), create=create, before_create=before)
            names.append(part)
            self._fds.append(nfd)
            self._open += 1
            if self.on_open is not None:
                self.on_open(names, nfd)
            if self._open > self.MAX_OPEN:
                self._close_oldest()
            fd = nfd
        return fd

    def _open_dir(self, fd: int, path: list[str], *, create: bool = False,
              before_create: Callable[[], None] | None = None) -> int:
        """The fd of ``path``'s last directory, inside ``fd`` (its parent's), by
        :func:`open_child_dir`, or by :attr:`on_denied` if permission is refused."""
        try:
            return open_child_dir(fd, path[-1], "/".join(path), create=create, mode=self._mode,
                                  on_create=self._on_create, before_create=before_create)
        except PermissionError:
            if self.on_denied is None:
                raise
            return self.on_denied(fd, path[-1], path)

    def forget(self, parts: Sequence[str]) -> None:
        """Drop cached fds for ``parts`` and everything beneath it."""
        n = len(parts)
        if n <= len(self._names) and self._names[:n] == list(parts):
            self._truncate(n - 1 if n else 0)

    def close(self) -> None:
        self._truncate(0)

    def _truncate(self, keep: int) -> None:
        while len(self._names) > keep:
            self._names.pop()
            fd = self._fds.pop()
            if fd >= 0:
                os.close(fd)
                self._open -= 1

    def _fd_at(self, depth: int) -> int:
        """The fd of the first ``depth`` cached names, reopening closed ones."""
        if depth == 0:
            return self.root_fd
        fd = self._fds[depth - 1]
        if fd >= 0:
            return fd
        base = depth - 1
        while base > 0 and self._fds[base - 1] < 0:
            base -= 1
        fd = self._fds[base - 1] if base else self.root_fd
        for i in range(base, depth):
            nfd = self._open_dir(fd, self._names[:i + 1])
            self._fds[i] = nfd
            self._open += 1
            if self.on_open is not None:
                self.on_open(self._names[:i + 1], nfd)
            fd = nfd
        while self._open > self.MAX_OPEN and self._close_oldest(keep_from=depth):
            pass
        return fd

    def _close_oldest(self, keep_from: int | None = None) -> bool:
        """Close the shallowest open fd below the one in use; False if none."""
        stop = len(self._fds) if keep_from is None else keep_from
        for i in range(stop - 1):  # never the deepest one we are about to use
            if self._fds[i] >= 0:
                os.close(self._fds[i])
                self._fds[i] = -1
                self._open -= 1
                return True
        return False
