"""What changed between two trees, Docker's way, and how big the changes are.

:func:`changes_dirs` is Docker's ``archive.ChangesDirs`` (pkg/archive/changes.go and
changes_linux.go), rule for rule:

- a name only in the new tree is an **Add**, and so is everything beneath it;
- a name only in the old tree is a **Delete**, reported for the top entry only;
- a name in both is a **Modify** when mode (type and permission bits), uid, gid or rdev
  differ, or the ``security.capability`` xattr bytes differ, or -- for anything that
  is not a directory -- size or mtime differ, where two mtimes are equal when they are
  identical or when their seconds match and either has no nanoseconds (a tar stores
  whole seconds). A directory is never modified by its size or mtime alone;
- a directory that is neither the root nor reported itself, with a change anywhere
  beneath it, is reported as a Modify, so an export carries its metadata;
- entries with the same inode on the same device in both trees (hardlinked copies,
  bind mounts) are skipped with everything beneath them, unread.

:func:`changes_overlay` gives the same answer for an overlay layer as
``changes_dirs(<mounted layer>, <mounted parent>)`` would, reading only the layer's upper
directory and looking up in the lower ones just the names the upper one holds, so its
cost follows the size of the change, not of the image.

The output is sorted by path (as bytes, Go's string order), then kind.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from lamina.archive.change import Change, ChangeKind

_MODIFY, _ADD, _DELETE = int(ChangeKind.MODIFY), int(ChangeKind.ADD), int(ChangeKind.DELETE)
_CAP = "security.capability"

# A raw change while walking: (absolute path inside the layer as bytes, kind)
_Raw = tuple[bytes, int]


def changes_dirs(new: Path, old: Path | None) -> list[Change]:
    """Docker's ``ChangesDirs(new, old)``; ``old=None`` compares against an empty tree
    (every entry of ``new`` is an Add)."""
    out: list[_Raw] = []
    new_b = os.fsencode(new).rstrip(b"/")
    old_b = os.fsencode(old).rstrip(b"/") if old is not None else b""
    walk = _Walk()
    try:
        new_fd = walk.open_root(new)
        if old is None:
            _add_subtree(walk, new_fd, b"", out)
            return _sorted(out)
        old_fd = walk.open_root(old)
        same_dev = os.fstat(new_fd).st_dev == os.fstat(old_fd).st_dev
        # Frames: ("open", rel, new parent fd, old parent fd, name, same_dev, reported)
        # is a directory pair still to open; ("close", rel, start, reported, fds...)
        # closes one once everything beneath it is compared, and adds the "changed
        # inside" Modify. Parents stay open until their close frame: at most two
        # descriptors per level are open.
        stack: list[tuple] = []
        frame: tuple | None = ("root", b"", new_fd, old_fd, same_dev, True)
        while frame is not None or stack:
            if frame is None:
                frame = stack.pop()
            if frame[0] == "close":
                _, rel, start, reported, *fds = frame
                walk.close(*fds)
                if not reported and len(out) > start:
                    out.append((rel, _MODIFY))
                frame = None
                continue
            if frame[0] == "open":
                _, rel, new_parent, old_parent, name, same_dev, reported = frame
                new_dir = walk.open_child(new_parent, name)
                old_dir = walk.open_child(old_parent, name)
                if new_dir < 0 or old_dir < 0:  # changed since it was seen (live tree)
                    walk.close(new_dir, old_dir)
                    frame = None
                    continue
            else:
                _, rel, new_dir, old_dir, same_dev, reported = frame
            frame = None
            stack.append(("close", rel, len(out), reported, new_dir, old_dir))
            old_entries = _scan(old_dir)
            for bname, ne in _scan(new_dir).items():
                path = rel + b"/" + bname
                oe = old_entries.pop(bname, None)
                if oe is None:
                    out.append((path, _ADD))
                    if ne.is_dir(follow_symlinks=False):
                        _add_child_subtree(walk, new_dir, ne.name, path, out)
                    continue
                if same_dev and ne.inode() == oe.inode():
                    continue  # the very same file in both trees: nothing beneath can differ
                try:
                    nst = os.lstat(ne.name, dir_fd=new_dir)
                except FileNotFoundError:  # gone since the scan (live tree)
                    out.append((path, _DELETE))
                    continue
                try:
                    ost = os.lstat(oe.name, dir_fd=old_dir)
                except FileNotFoundError:
                    out.append((path, _ADD))
                    if stat.S_ISDIR(nst.st_mode):
                        _add_child_subtree(walk, new_dir, ne.name, path, out)
                    continue
                changed = stat_different(ost, nst) or (
                    _capability(old_b + path) != _capability(new_b + path)
                )
                if changed:
                    out.append((path, _MODIFY))
                if stat.S_ISDIR(nst.st_mode):
                    if stat.S_ISDIR(ost.st_mode):
                        stack.append(("open", path, new_dir, old_dir, ne.name,
                                      nst.st_dev == ost.st_dev, changed))
                    else:  # a directory where a file was: all it holds is new
                        _add_child_subtree(walk, new_dir, ne.name, path, out)
            for bname in old_entries:
                out.append((rel + b"/" + bname, _DELETE))
        return _sorted(out)
    finally:
        walk.close_all()


def stat_different(old: os.stat_result, new: os.stat_result) -> bool:
    """Docker's ``statDifferent`` (unix).

    The "not a directory" test is Docker's ``mode & S_IFDIR != S_IFDIR``, which also
    treats block devices and sockets (whose type bits include S_IFDIR's) like
    directories: their size and mtime are not compared. Kept for identical answers.
    """
    if (
        old.st_mode != new.st_mode
        or old.st_uid != new.st_uid
        or old.st_gid != new.st_gid
        or old.st_rdev != new.st_rdev
    ):
        return True
    if old.st_mode & stat.S_IFDIR == stat.S_IFDIR:
        return False
    if old.st_size != new.st_size:
        return True
    a, b = old.st_mtime_ns, new.st_mtime_ns
    if a == b:
        return False
    sec_a, ns_a = divmod(a, 1_000_000_000)
    sec_b, ns_b = divmod(b, 1_000_000_000)
    return not (sec_a == sec_b and (ns_a == 0 or ns_b == 0))


# -- overlay ------------------------------------------------------------------------


def changes_overlay(
    upper: Path, lowers: Sequence[Path], *, opaque_xattr: str = "trusted.overlay.opaque"
) -> list[Change]:
    """The changes of an overlay layer, from its upper directory and its lower ones
    (nearest first), equal to ``changes_dirs(<merged view>, <view of the lowers>)``.

    In the upper directory a 0/0 character device is a whiteout: a Delete if the name
    is visible below, nothing otherwise. Any other entry is an Add if the name is not
    visible below, else a Modify if it differs from what is (a file copied up but left
    unchanged is no change). An opaque directory hides everything below it, so the
    names visible below it and absent from the upper one are Deletes, and the same holds
    for every directory beneath it. Lower layers are read as overlayfs reads them:
    whiteouts and opaque directories there hide what lies deeper still.

    The upper directory (live while a container runs) is walked by directory
    descriptors; the lower ones are read-only layers, looked up by path one verified
    directory at a time.
    """
    lower_roots = [os.fsencode(p) for p in lowers]
    upper_b = os.fsencode(upper).rstrip(b"/")
    out: list[_Raw] = []
    walk = _Walk()
    try:
        root_fd = walk.open_root(upper)
        # Frames: ("open", rel, parent fd, name, lower dirs, full, reported) is an upper
        # directory still to open; ("close", rel, start, reported, fd) closes one.
        # full = the upper directory hides every lower one (it or an ancestor is
        # opaque): names visible below but missing above are Deletes.
        stack: list[tuple] = []
        frame: tuple | None = ("root", b"", root_fd, lower_roots, False, True)
        while frame is not None or stack:
            if frame is None:
                frame = stack.pop()
            if frame[0] == "close":
                _, rel, start, reported, fd = frame
                walk.close(fd)
                if not reported and len(out) > start:
                    out.append((rel, _MODIFY))
                frame = None
                continue
            if frame[0] == "open":
                _, rel, parent, name, lower_dirs, full, reported = frame
                dir_fd = walk.open_child(parent, name)
                if dir_fd < 0:
                    frame = None
                    continue
            else:
                _, rel, dir_fd, lower_dirs, full, reported = frame
            frame = None
            stack.append(("close", rel, len(out), reported, dir_fd))
            seen: set[bytes] = set()
            for bname, ue in _scan(dir_fd).items():
                path = rel + b"/" + bname
                try:
                    ust = os.lstat(ue.name, dir_fd=dir_fd)
                except FileNotFoundError:
                    continue
                lower_st, lower_path, child_lowers = _lookup(lower_dirs, bname, opaque_xattr)
                if _is_whiteout(ust):
                    # under an opaque directory the name is reported (or not) with the
                    # lower listing below, as for any name the upper directory lacks
                    if lower_st is not None and not full:
                        out.append((path, _DELETE))
                    continue
                seen.add(bname)
                if lower_st is None:
                    out.append((path, _ADD))
                    if stat.S_ISDIR(ust.st_mode):
                        _add_child_subtree(walk, dir_fd, ue.name, path, out, skip_whiteouts=True)
                    continue
                changed = stat_different(lower_st, ust) or (
                    _capability(lower_path) != _capability(upper_b + path)
                )
                if changed:
                    out.append((path, _MODIFY))
                if stat.S_ISDIR(ust.st_mode):
                    if not stat.S_ISDIR(lower_st.st_mode):  # a directory where a file was
                        _add_child_subtree(walk, dir_fd, ue.name, path, out, skip_whiteouts=True)
                        continue
                    child_full = full or walk.is_opaque(dir_fd, ue.name, opaque_xattr)
                    stack.append(("open", path, dir_fd, ue.name, child_lowers, child_full, changed))
            if full:
                for bname in _lower_names(lower_dirs):
                    if bname in seen:
                        continue
                    if _lookup(lower_dirs, bname, opaque_xattr)[0] is not None:
                        out.append((rel + b"/" + bname, _DELETE))
        return _sorted(out)
    finally:
        walk.close_all()


def _lookup(
    lower_dirs: Sequence[bytes], name: bytes, opaque_xattr: str
) -> tuple[os.stat_result | None, bytes, list[bytes]]:
    """What the lower layers show at ``name`` inside a directory whose lower parts are
    ``lower_dirs`` (nearest first), as overlayfs's lookup finds it.

    Returns (stat of the visible entry or None, its path, the lower parts of it if it
    is a directory). The nearest layer holding the name decides: a whiteout hides it;
    a non-directory is it; a directory merges with directories at the same name in
    deeper layers until a layer holds a non-directory or whiteout there, or one of the
    directories is opaque.
    """
    found: os.stat_result | None = None
    found_path = b""
    parts: list[bytes] = []
    for lower in lower_dirs:
        p = lower + b"/" + name
        try:
            st = os.lstat(p)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if found is None:
            if _is_whiteout(st):
                return None, b"", []
            found, found_path = st, p
            if not stat.S_ISDIR(st.st_mode):
                return st, p, []
        elif not stat.S_ISDIR(st.st_mode):
            break
        parts.append(p)
        if _is_opaque(p, opaque_xattr):
            break
    return found, found_path, parts


def _lower_names(lower_dirs: Sequence[bytes]) -> set[bytes]:
    """Every name in any lower part of a directory (visible or not: see _lookup)."""
    names: set[bytes] = set()
    for d in lower_dirs:
        try:
            names.update(os.listdir(d))
        except FileNotFoundError:
            pass
    return names


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(target: bytes | int, opaque_xattr: str) -> bool:
    follow = {} if isinstance(target, int) else {"follow_symlinks": False}
    try:
        return os.getxattr(target, opaque_xattr, **follow) == b"y"
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOENT):
            return False
        raise


# -- sizes --------------------------------------------------------------------------


def changes_size(root: Path, changes: Iterable[Change]) -> int:
    """Docker's ``ChangesSize``: the lstat sizes of the non-directory entries that are
    added or modified, a multiply-linked inode counted once."""
    prefix = os.fsencode(root).rstrip(b"/")
    total = 0
    seen: set[tuple[int, int]] = set()
    for change in changes:
        if change.kind == ChangeKind.DELETE:
            continue
        try:
            st = os.lstat(prefix + os.fsencode(change.path))
        except FileNotFoundError:
            continue  # Docker logs and skips what vanished
        if stat.S_ISDIR(st.st_mode):
            continue
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
        total += st.st_size
    return total


def tree_size(root: Path) -> int:
    """overlay2's ``directory.Size``: the sizes of every non-directory beneath ``root``
    with a size above 0, each inode counted once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    walk = _Walk()
    try:
        fds = [walk.open_root(root)]
        while fds:
            dir_fd = fds.pop()
            for entry in _scan(dir_fd).values():
                if entry.is_dir(follow_symlinks=False):
                    child = walk.open_child(dir_fd, entry.name)
                    if child >= 0:
                        fds.append(child)
                    continue
                try:
                    st = os.lstat(entry.name, dir_fd=dir_fd)
                except FileNotFoundError:
                    continue  # vanished while walking
                if st.st_size <= 0:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                total += st.st_size
            walk.close(dir_fd)
        return total
    finally:
        walk.close_all()


# -- helpers ------------------------------------------------------------------------


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PROC_FD = os.path.isdir("/proc/self/fd")


class _Walk:
    """The directory descriptors of one walk, so every one is closed however the walk
    ends.

    Walking by descriptors (each directory opened with ``O_NOFOLLOW`` from its parent's)
    keeps a live tree that swaps a directory for a symlink from leading the walk
    outside the root; a directory that changed that way is treated as gone. The one
    read by path is the ``security.capability`` xattr of an entry whose stat matched
    (``lgetxattr`` has no directory-descriptor form, and going through /proc costs
    three times as much): a race there can only turn one answer into a Modify.
    """

    def __init__(self) -> None:
        self.open_fds: set[int] = set()

    def open_root(self, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.open_fds.add(fd)
        return fd

    def open_child(self, dir_fd: int, name: str) -> int:
        """Open subdirectory ``name`` of ``dir_fd``, or -1 if it is no longer one."""
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                return -1
            raise
        self.open_fds.add(fd)
        return fd

    def close(self, *fds: int) -> None:
        for fd in fds:
            if fd in self.open_fds:
                self.open_fds.discard(fd)
                os.close(fd)

    def close_all(self) -> None:
        self.close(*list(self.open_fds))

    @staticmethod
    def is_opaque(dir_fd: int, name: str, opaque_xattr: str) -> bool:
        if _PROC_FD:
            return _is_opaque(_at(dir_fd, name), opaque_xattr)
        fd = _open_plain(dir_fd, name)
        if fd < 0:
            return False
        try:
            return _is_opaque(fd, opaque_xattr)
        finally:
            os.close(fd)


def _at(dir_fd: int, name: str) -> bytes:
    """A path to entry ``name`` of ``dir_fd`` for the l*xattr calls, which take no
    directory descriptor: through /proc the directory is the one held open."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, os.fsencode(name))


def _open_plain(dir_fd: int, name: str) -> int:
    """Without /proc: open a regular file or directory to read its xattrs by fd, or -1
    for anything else (opening a device or fifo could have effects)."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return -1
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return -1


def _scan(dir_fd: int) -> dict[bytes, os.DirEntry[str]]:
    """A directory's entries by name (as bytes)."""
    fsencode = os.fsencode
    with os.scandir(dir_fd) as it:
        return {fsencode(e.name): e for e in it}


def _add_child_subtree(walk: _Walk, dir_fd: int, name: str, rel: bytes, out: list[_Raw], *,
                       skip_whiteouts: bool = False) -> None:
    """Report everything beneath subdirectory ``name`` of ``dir_fd`` as an Add."""
    child = walk.open_child(dir_fd, name)
    if child >= 0:
        _add_subtree(walk, child, rel, out, skip_whiteouts=skip_whiteouts)


def _add_subtree(walk: _Walk, dir_fd: int, rel: bytes, out: list[_Raw], *,
                 skip_whiteouts: bool = False) -> None:
    """Report everything beneath directory ``dir_fd`` (closed when done) as an Add. In
    an overlay upper directory (``skip_whiteouts``) whiteouts stand for nothing and are
    left out."""
    stack: list[tuple[int, bytes]] = [(dir_fd, rel)]
    while stack:
        fd, r = stack.pop()
        for bname, e in _scan(fd).items():
            is_dir = e.is_dir(follow_symlinks=False)
            if skip_whiteouts and not (is_dir or e.is_file(follow_symlinks=False) or e.is_symlink()):
                try:
                    if _is_whiteout(os.lstat(e.name, dir_fd=fd)):
                        continue
                except FileNotFoundError:
                    continue
            path = r + b"/" + bname
            out.append((path, _ADD))
            if is_dir:
                child = walk.open_child(fd, e.name)
                if child >= 0:
                    stack.append((child, path))
        walk.close(fd)


def _capability(target: bytes | int) -> bytes:
    """The ``security.capability`` xattr of a path (not followed) or an open fd, or b""
    (listing first: a miss raises no error)."""
    follow = {} if isinstance(target, int) else {"follow_symlinks": False}
    try:
        if _CAP not in os.listxattr(target, **follow):
            return b""
        return os.getxattr(target, _CAP, **follow)
    except OSError:
        return b""  # no xattr support, or vanished: Docker ignores the error too


def _sorted(raw: list[_Raw]) -> list[Change]:
    raw.sort()
    return [Change(os.fsdecode(p), ChangeKind(k)) for p, k in raw]
