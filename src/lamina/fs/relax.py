"""Reaching into trees whose modes forbid it, as their owner; removing them whatever the modes.

Why: a layer may hold a directory of mode 0000 (the image says so, or a container ran
``chmod 000``). Root walks it anyway (CAP_DAC_OVERRIDE, as root of a user namespace
too); an unprivileged store owner (rootless vfs) cannot, but it owns every file of its
store, and an owner may always chmod. So where a walk is refused, the owner adds the
bits it needs, does its work and puts the mode back: directories when their walk is
done (a lookup inside needs search permission for as long as it goes on), files as soon
as they are open (an open file stays readable).

Every walk here goes through directory descriptors, one ``openat`` per component, so
paths longer than PATH_MAX (4096 bytes) are no obstacle and no symlink is followed.

A mode is put back only if it is still the one this module set (another process may
have put it back already, or changed it on purpose since). Two readers of the same tree
at once can therefore see a directory closed again under them: the later one is refused
(:class:`PermissionError`), never does a tree keep a widened mode. A process killed
between widening and restoring leaves the widened mode; ``lamina check`` reports it as a
metadata change of the layer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: what reading needs: a directory listed and searched, a file read
READ_DIR = 0o500
READ_FILE = 0o400
#: what removing needs: entries unlinked from a directory
WRITE_DIR = 0o700


def open_at(name: str, flags: int, dir_fd: int, need: int) -> tuple[int, int | None]:
    """``os.open(name, flags, dir_fd=dir_fd)``; if that is refused for want of
    permission and the entry is this process's own, add the owner bits ``need`` and
    open again. Returns the fd and the mode to put back (None if nothing was changed):
    the caller restores it with :func:`restore` when done."""
    try:
        return os.open(name, flags, dir_fd=dir_fd), None
    except PermissionError:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        old = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.geteuid() or stat.S_ISLNK(st.st_mode) or old & need == need:
            raise
        os.chmod(name, old | need, dir_fd=dir_fd, follow_symlinks=False)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.chmod(name, old, dir_fd=dir_fd, follow_symlinks=False)
        raise
    return fd, old


def widen(fd: int, need: int, st: os.stat_result | None = None) -> int | None:
    """Add the owner bits ``need`` to the open ``fd`` if this unprivileged process owns
    it and its mode lacks them (root needs no bits); return the mode to put back, or
    None if nothing was changed. ``st``: its ``fstat``, if the caller has it already."""
    euid = os.geteuid()
    if euid == 0:
        return None
    st = st or os.fstat(fd)
    old = stat.S_IMODE(st.st_mode)
    if st.st_uid != euid or old & need == need:
        return None
    os.fchmod(fd, old | need)
    return old


def restore(fd: int, old: int | None, need: int) -> None:
    """Put back the mode :func:`open_at` widened by ``need``, unless it changed meanwhile."""
    if old is None:
        return
    with contextlib.suppress(OSError):
        if stat.S_IMODE(os.fstat(fd).st_mode) == old | need:
            os.fchmod(fd, old)


def open_dir(path: Path, need: int = READ_DIR) -> tuple[int, int | None]:
    """A directory fd of ``path``, widened as :func:`open_at` does if its owner may."""
    parent = os.open(path.parent, DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        return open_at(path.name, DIR_FLAGS, parent, need)
    finally:
        os.close(parent)


# -- removing ---------------------------------------------------------------------------------


def force_rmtree(path: Path) -> None:
    """Remove ``path`` and everything beneath it, whatever the modes inside (the owner
    widens a directory to 0700 before emptying it), never following a symlink, at any
    depth and path length. Missing is fine. An entry that cannot go raises OSError with
    ``filename`` the full path of that entry."""
    path = Path(os.path.abspath(path))
    try:
        parent = os.open(path.parent, DIR_FLAGS & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        remove_at(parent, path.name, str(path))
    finally:
        os.close(parent)


def remove_at(parent: int, name: str, shown: str) -> None:
    """Remove ``name`` in directory fd ``parent`` (a tree, a file, a symlink); ``shown``
    names it in errors."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(parent, name, shown)
        return
    fd = _open_for_removal(parent, name, shown)
    # each level: (its parent's fd, its name, its fd, what it is shown as, subdirectories left)
    stack = [(parent, name, fd, shown, _empty_files(fd, shown))]
    try:
        while stack:
            pfd, dname, dfd, dshown, subdirs = stack[-1]
            if subdirs:
                sub = subdirs.pop()
                sshown = f"{dshown}/{sub}"
                try:
                    sfd = _open_for_removal(dfd, sub, sshown)
                except FileNotFoundError:
                    continue
                stack.append((dfd, sub, sfd, sshown, _empty_files(sfd, sshown)))
                continue
            stack.pop()
            os.close(dfd)
            try:
                os.rmdir(dname, dir_fd=pfd)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise _named(e, dshown) from None
    finally:
        for _, _, dfd, _, _ in stack:
            os.close(dfd)


def _open_for_removal(parent: int, name: str, shown: str) -> int:
    try:
        fd, _ = open_at(name, DIR_FLAGS, parent, WRITE_DIR)
    except OSError as e:
        if e.errno == errno.ENOTDIR:  # replaced by a file meanwhile
            _unlink(parent, name, shown)
            raise FileNotFoundError(shown) from None
        raise _named(e, shown) from None
    try:
        widen(fd, WRITE_DIR)  # to unlink inside
    except BaseException:
        os.close(fd)
        raise
    return fd


def _empty_files(fd: int, shown: str) -> list[str]:
    """Unlink every non-directory in ``fd``; return the names of its subdirectories."""
    subdirs = []
    with os.scandir(fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in entries:
        if is_dir:
            subdirs.append(name)
        else:
            _unlink(fd, name, f"{shown}/{name}")
    return subdirs


def _unlink(parent: int, name: str, shown: str) -> None:
    try:
        os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _named(e, shown) from None


def _named(e: OSError, shown: str) -> OSError:
    out = OSError(e.errno, e.strerror or str(e))
    out.filename = shown
    return out


# -- reading a whole tree ------------------------------------------------------------------------

#: (st_dev, st_ino) -> the mode before widening, of every entry a :func:`readable_tree` of
#: this process holds widened: what a reader that reports modes (export) must report
_WIDENED: dict[tuple[int, int], int] = {}


def original_modes() -> Mapping[tuple[int, int], int]:
    """The true modes (permission bits) of the entries widened right now, by (dev, ino);
    empty unless an unprivileged reader is at work. Live: read it, do not keep a copy."""
    return _WIDENED



@contextlib.contextmanager
def readable_tree(root: Path) -> Iterator[None]:
    """For the duration, every directory and file of ``root`` that this process owns is
    readable to it (owner bits widened where they were missing), and afterwards as it
    was. Nothing to do, and no walk, for root. For readers that walk a tree through
    code of their own (diffs, changes, tar-split replay), which then need no care."""
    if os.geteuid() == 0:
        yield
        return
    widened: list[tuple[int, int, int]] = []  # (fd, old mode, bits added), in walk order
    try:
        try:
            fd, old = open_dir(Path(root))
        except FileNotFoundError:
            yield
            return
        if old is not None:
            _note(widened, fd, old, READ_DIR)
        _widen_below(fd, widened, keep=old is not None)
        yield
    finally:
        for fd, old, need in reversed(widened):  # children before their parents
            with contextlib.suppress(OSError):
                st = os.fstat(fd)
                _WIDENED.pop((st.st_dev, st.st_ino), None)
            restore(fd, old, need)
            os.close(fd)


def _widen_below(top: int, widened: list[tuple[int, int, int]], *, keep: bool) -> None:
    """Make every directory and regular file below ``top`` that this process owns
    readable, noting each widened one (its fd kept open) in ``widened``. Directory fds
    are open only along the path being walked, not for a whole level at once."""
    # each level: its fd, whether the fd is kept (widened), its subdirectories not yet walked
    stack = [(top, keep, _widen_files(top, widened))]
    while stack:
        dfd, kept, subdirs = stack[-1]
        if subdirs:
            fd, old = open_at(subdirs.pop(), DIR_FLAGS, dfd, READ_DIR)
            if old is not None:
                _note(widened, fd, old, READ_DIR)
            stack.append((fd, old is not None, _widen_files(fd, widened)))
            continue
        stack.pop()
        if not kept:
            os.close(dfd)


def _widen_files(dfd: int, widened: list[tuple[int, int, int]]) -> list[str]:
    """Widen the unreadable files of ``dfd`` that this process owns; return the names of
    its subdirectories that it owns (a stranger's cannot be widened: left as they are)."""
    euid = os.geteuid()
    with os.scandir(dfd) as it:
        entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
    subdirs = []
    for name, st in entries:
        if st.st_uid != euid:
            continue
        if stat.S_ISDIR(st.st_mode):
            subdirs.append(name)
        elif stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & READ_FILE != READ_FILE:
            fd, old = open_at(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dfd, READ_FILE)
            if old is None:
                os.close(fd)
            else:
                _note(widened, fd, old, READ_FILE)
    return subdirs


def _note(widened: list[tuple[int, int, int]], fd: int, old: int, need: int) -> None:
    widened.append((fd, old, need))
    st = os.fstat(fd)
    _WIDENED[(st.st_dev, st.st_ino)] = old


__all__ = ["DIR_FLAGS", "READ_DIR", "READ_FILE", "WRITE_DIR", "force_rmtree", "open_at", "open_dir",
           "original_modes", "readable_tree", "remove_at", "restore"]
