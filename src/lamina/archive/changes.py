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
    new_b = os.fsencode(new)
    new_st = os.lstat(new_b)
    out: list[_Raw] = []
    if old is None:
        _add_subtree(new_b, b"", out)
        return _sorted(out)
    old_b = os.fsencode(old)
    old_st = os.lstat(old_b)
    # Stack of directory pairs to compare, and of markers that close a directory once
    # everything beneath it has been compared (for the "changed inside" Modify).
    stack: list[tuple] = [("dir", b"", new_b, old_b, new_st.st_dev == old_st.st_dev, True)]
    while stack:
        frame = stack.pop()
        if frame[0] == "close":
            _, rel, start, reported = frame
            if not reported and len(out) > start:
                out.append((rel, _MODIFY))
            continue
        _, rel, new_dir, old_dir, same_dev, reported = frame
        stack.append(("close", rel, len(out), reported))
        old_entries = _scan(old_dir)
        for name, ne in _scan(new_dir).items():
            path = rel + b"/" + name
            oe = old_entries.pop(name, None)
            if oe is None:
                out.append((path, _ADD))
                if ne.is_dir(follow_symlinks=False):
                    _add_subtree(ne.path, path, out)
                continue
            if same_dev and ne.inode() == oe.inode():
                continue  # the very same file in both trees: nothing beneath can differ
            try:
                nst = ne.stat(follow_symlinks=False)
            except FileNotFoundError:  # gone since the scan (live tree)
                out.append((path, _DELETE))
                continue
            try:
                ost = oe.stat(follow_symlinks=False)
            except FileNotFoundError:
                out.append((path, _ADD))
                if stat.S_ISDIR(nst.st_mode):
                    _add_subtree(ne.path, path, out)
                continue
            changed = stat_different(ost, nst) or _capability(oe.path) != _capability(ne.path)
            if changed:
                out.append((path, _MODIFY))
            if stat.S_ISDIR(nst.st_mode):
                if stat.S_ISDIR(ost.st_mode):
                    stack.append(("dir", path, ne.path, oe.path, nst.st_dev == ost.st_dev, changed))
                else:  # a directory where a file was: all it holds is new
                    _add_subtree(ne.path, path, out)
        for name in old_entries:
            out.append((rel + b"/" + name, _DELETE))
    return _sorted(out)


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
    """
    upper_b = os.fsencode(upper)
    lower_roots = [os.fsencode(p) for p in lowers]
    opaque_name = opaque_xattr
    out: list[_Raw] = []
    # frame: ("dir", rel, upper dir, lower dirs (nearest first) or None, full, reported)
    # full = the upper directory hides every lower one (it or an ancestor is opaque):
    # names visible below but missing above are Deletes.
    stack: list[tuple] = [("dir", b"", upper_b, lower_roots, False, True)]
    while stack:
        frame = stack.pop()
        if frame[0] == "close":
            _, rel, start, reported = frame
            if not reported and len(out) > start:
                out.append((rel, _MODIFY))
            continue
        _, rel, upper_dir, lower_dirs, full, reported = frame
        stack.append(("close", rel, len(out), reported))
        seen: set[bytes] = set()
        for name, ue in _scan(upper_dir).items():
            path = rel + b"/" + name
            seen.add(name)
            try:
                ust = ue.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            lower_st, lower_path, child_lowers = _lookup(lower_dirs, name, opaque_name)
            if _is_whiteout(ust):
                if lower_st is not None and not full:
                    out.append((path, _DELETE))
                # under an opaque directory the name is reported (or not) with the lower
                # listing below, as for any name the upper directory lacks
                seen.discard(name)
                continue
            if lower_st is None:
                out.append((path, _ADD))
                if stat.S_ISDIR(ust.st_mode):
                    _add_subtree(ue.path, path, out, skip_whiteouts=True)
                continue
            changed = stat_different(lower_st, ust) or _capability(lower_path) != _capability(ue.path)
            if changed:
                out.append((path, _MODIFY))
            if stat.S_ISDIR(ust.st_mode):
                if not stat.S_ISDIR(lower_st.st_mode):  # a directory where a file was
                    _add_subtree(ue.path, path, out, skip_whiteouts=True)
                    continue
                child_full = full or _is_opaque(ue.path, opaque_name)
                stack.append(("dir", path, ue.path, child_lowers, child_full, changed))
        if full:
            for name in _lower_names(lower_dirs):
                if name in seen:
                    continue
                if _lookup(lower_dirs, name, opaque_name)[0] is not None:
                    out.append((rel + b"/" + name, _DELETE))
    return _sorted(out)


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


def _is_opaque(path: bytes, opaque_xattr: str) -> bool:
    try:
        return os.getxattr(path, opaque_xattr, follow_symlinks=False) == b"y"
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
    dirs = [os.fsencode(root)]
    while dirs:
        try:
            it = os.scandir(dirs.pop())
        except FileNotFoundError:
            continue  # vanished while walking
        with it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(entry.path)
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_size <= 0:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                total += st.st_size
    return total


# -- helpers ------------------------------------------------------------------------


def _scan(path: bytes) -> dict[bytes, os.DirEntry[bytes]]:
    """A directory's entries by name; an empty dict if it vanished."""
    try:
        with os.scandir(path) as it:
            return {e.name: e for e in it}
    except FileNotFoundError:
        return {}


def _add_subtree(abs_dir: bytes, rel: bytes, out: list[_Raw], *, skip_whiteouts: bool = False) -> None:
    """Report everything beneath ``abs_dir`` as an Add. In an overlay upper directory
    (``skip_whiteouts``) whiteouts stand for nothing and are left out."""
    stack = [(abs_dir, rel)]
    while stack:
        d, r = stack.pop()
        for name, e in _scan(d).items():
            if skip_whiteouts and not (e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)
                                       or e.is_symlink()):
                try:
                    if _is_whiteout(e.stat(follow_symlinks=False)):
                        continue
                except FileNotFoundError:
                    continue
            path = r + b"/" + name
            out.append((path, _ADD))
            if e.is_dir(follow_symlinks=False):
                stack.append((e.path, path))


def _capability(path: bytes) -> bytes:
    """The ``security.capability`` xattr, or b"" (listing first: a miss raises no error)."""
    try:
        if _CAP not in os.listxattr(path, follow_symlinks=False):
            return b""
        return os.getxattr(path, _CAP, follow_symlinks=False)
    except OSError:
        return b""  # no xattr support, or vanished: Docker ignores the error too


def _sorted(raw: list[_Raw]) -> list[Change]:
    raw.sort()
    return [Change(os.fsdecode(p), ChangeKind(k)) for p, k in raw]
