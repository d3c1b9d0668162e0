"""Copying a layer tree, sharing blocks where the filesystem can (reflinks).

Why a walk of our own through directory descriptors, and no longer ``cp -a``: a layer
may hold paths longer than PATH_MAX (a tar may name a file 4,509 bytes deep, and apply,
which goes one ``openat`` at a time, takes it), and cp hands whole paths to the kernel,
so the layer could not be a parent ("File name too long"). And an unprivileged owner's
layer may hold directories of mode 0000, which cp cannot read; here the owner widens
them for the copy and puts their modes back (:mod:`lamina.fs.relax`), and the copy gets
the modes of the original. Refusing such paths at apply was the other way; it would
refuse what Docker's overlay2 and lamina's overlay take, and still leave 0000 dirs.

What is kept, as ``cp -a`` keeps it: file types, content (cloned with FICLONE where the
filesystem can, else copy_file_range with holes kept), owners (where the process may
set them), modes with setuid bits (set after chown, which clears them), xattrs (those
the process may set; others are skipped as cp skips them), hard links within the tree,
times (directories' after they are filled). A copy dies with its process: no child
process goes on writing into a half-made layer.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from lamina.fs.relax import DIR_FLAGS, READ_DIR, READ_FILE, open_at, restore

#: ioctl FICLONE (linux/fs.h _IOW(0x94, 9, int)): share all of a file's blocks
FICLONE = 0x40049409
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 30
#: xattr failures that mean "not allowed or not supported here", skipped as cp -a does
_XATTR_SKIP = frozenset({errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.ENOTSUP})


class CopyError(OSError):
    """A copy that could not be made; ``filename`` is the entry's path in the tree."""


def copy_tree(src: Path, dst: Path) -> None:
    """Copy directory ``src`` to the new path ``dst`` (which must not exist). Raises
    :class:`CopyError` naming the entry (relative to ``src``) that could not be copied;
    what was made of ``dst`` is then left for the caller to remove."""
    src = Path(os.path.abspath(src))
    parent = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.stat(src.name, dir_fd=parent, follow_symlinks=False)  # its mode before widening
        src_fd, src_old = open_at(src.name, DIR_FLAGS, parent, READ_DIR)
    finally:
        os.close(parent)
    try:
        os.mkdir(dst, 0o700)
        dst_fd = os.open(dst, DIR_FLAGS)
        try:
            _Copy(src_fd, dst_fd).run(st)
        finally:
            os.close(dst_fd)
    finally:
        restore(src_fd, src_old, READ_DIR)
        os.close(src_fd)


class _Copy:
    def __init__(self, src_root: int, dst_root: int) -> None:
        self.src_root = src_root
        self.dst_root = dst_root
        self.euid = os.geteuid()
        #: (dev, ino) of a source file with several links -> its first copy's path parts
        self.links: dict[tuple[int, int], tuple[str, ...]] = {}
        self.clone = True

    def run(self, st: os.stat_result) -> None:
        """Copy the tree; ``st`` is the source root's stat from before it was widened."""
        # each level: (src fd, dst fd, its path parts, src's widened mode, its stat, dirs left)
        stack = [(self.src_root, self.dst_root, (), None, st, self._files(self.src_root, self.dst_root, ()))]
        try:
            while stack:
                sfd, dfd, parts, old, st, subdirs = stack[-1]
                if subdirs:
                    name, sub_st = subdirs.pop()
                    sub_parts = (*parts, name)
                    try:
                        csfd, cold = open_at(name, DIR_FLAGS, sfd, READ_DIR)
                        try:
                            os.mkdir(name, 0o700, dir_fd=dfd)
                            cdfd = os.open(name, DIR_FLAGS, dir_fd=dfd)
                        except BaseException:
                            restore(csfd, cold, READ_DIR)
                            os.close(csfd)
                            raise
                    except OSError as e:
                        raise _error(e, sub_parts) from None
                    stack.append((csfd, cdfd, sub_parts, cold, sub_st,
                                  self._files(csfd, cdfd, sub_parts)))
                    continue
                stack.pop()
                try:
                    self._metadata(dfd, None, st, parts, is_dir=True, src=sfd)
                except OSError as e:
                    raise _error(e, parts or (".",)) from None
                finally:
                    if parts:
                        restore(sfd, old, READ_DIR)
                        os.close(sfd)
                        os.close(dfd)
        finally:
            for sfd, dfd, parts, old, _, _ in stack:
                if parts:
                    restore(sfd, old, READ_DIR)
                    os.close(sfd)
                    os.close(dfd)

    def _files(self, sfd: int, dfd: int, parts: tuple[str, ...]) -> list[tuple[str, os.stat_result]]:
        """Copy every entry of ``sfd`` that is no directory into ``dfd``; return the
        subdirectories with their stats."""
        with os.scandir(sfd) as it:
            entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        subdirs = []
        for name, st in entries:
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((name, st))
                continue
            try:
                self._entry(sfd, dfd, name, st, (*parts, name))
            except OSError as e:
                raise _error(e, (*parts, name)) from None
        return subdirs

    def _entry(self, sfd: int, dfd: int, name: str, st: os.stat_result, parts: tuple[str, ...]) -> None:
        kind = stat.S_IFMT(st.st_mode)
        if kind != stat.S_IFDIR and st.st_nlink > 1:
            first = self.links.get((st.st_dev, st.st_ino))
            if first is not None:
                self._link(first, dfd, name)
                return
            self.links[(st.st_dev, st.st_ino)] = parts
        if kind == stat.S_IFREG:
            self._file(sfd, dfd, name, st, parts)
        elif kind == stat.S_IFLNK:
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
            self._metadata(dfd, name, st, parts, is_dir=False, src=None, src_dir=sfd)
        else:  # fifo, device, socket
            os.mknod(name, st.st_mode, st.st_rdev, dir_fd=dfd)
            self._metadata(dfd, name, st, parts, is_dir=False, src=None, src_dir=sfd)

    def _link(self, first: tuple[str, ...], dfd: int, name: str) -> None:
        """A second name of an inode already copied: a hard link to that copy, reached
        one component at a time (its path may be longer than PATH_MAX)."""
        opened: list[tuple[int, int | None]] = []  # directories on the way, already made 0000 perhaps
        fd = self.dst_root
        try:
            for part in first[:-1]:
                fd, old = open_at(part, DIR_FLAGS, fd, READ_DIR)
                opened.append((fd, old))
            os.link(first[-1], name, src_dir_fd=fd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            for ofd, old in reversed(opened):
                restore(ofd, old, READ_DIR)
                os.close(ofd)

    def _file(self, sfd: int, dfd: int, name: str, st: os.stat_result, parts: tuple[str, ...]) -> None:
        src, old = open_at(name, _READ_FILE, sfd, READ_FILE)
        try:
            restore(src, old, READ_FILE)  # the open file stays readable
            dst = os.open(name, _NEW_FILE, 0o600, dir_fd=dfd)
            try:
                self._content(src, dst, st.st_size)
                self._metadata(dst, None, st, parts, is_dir=False, src=src)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _content(self, src: int, dst: int, size: int) -> None:
        if not size:
            return
        if self.clone:
            try:
                fcntl.ioctl(dst, FICLONE, src)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL):
                    raise
                self.clone = False  # the filesystem cannot: do not ask for every file
        offset = 0
        while offset < size:
            try:
                data = os.lseek(src, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            hole = os.lseek(src, data, os.SEEK_HOLE)
            pos = data
            while pos < hole:
                n = os.copy_file_range(src, dst, min(hole - pos, _CHUNK), pos, pos)
                if not n:
                    break
                pos += n
            offset = hole
        os.ftruncate(dst, size)

    def _metadata(self, fd: int, name: str | None, st: os.stat_result, parts: tuple[str, ...], *,
                  is_dir: bool, src: int | None, src_dir: int | None = None) -> None:
        """Owner, xattrs, mode, times of a copy: by ``fd`` (``name`` None) or by name in
        the directory ``fd`` (symlinks, fifos, devices: never followed)."""
        if name is None:
            target: int | str = fd
            src_target: int | str = src if src is not None else fd
        else:
            target = f"/proc/self/fd/{fd}/{name}"
            src_target = f"/proc/self/fd/{src_dir}/{name}"
        follow = name is None
        cur = os.stat(target, follow_symlinks=follow)
        if (cur.st_uid, cur.st_gid) != (st.st_uid, st.st_gid):
            try:
                os.chown(target, st.st_uid, st.st_gid, follow_symlinks=follow)
            except PermissionError:
                if self.euid == 0:
                    raise  # an unprivileged copy keeps its own owner, as cp -a does
        for attr in _listxattr(src_target, follow):
            try:
                os.setxattr(target, attr, os.getxattr(src_target, attr, follow_symlinks=follow),
                            follow_symlinks=follow)
            except OSError as e:
                if e.errno not in _XATTR_SKIP:
                    raise
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(target, stat.S_IMODE(st.st_mode), follow_symlinks=follow)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=follow)


def _listxattr(target: int | str, follow: bool) -> list[str]:
    try:
        return os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in _XATTR_SKIP:
            return []
        raise


def _error(e: OSError, parts: tuple[str, ...]) -> CopyError:
    if isinstance(e, CopyError):
        return e
    err = CopyError(e.errno, e.strerror or str(e))
    err.filename = "/".join(parts)
    return err
