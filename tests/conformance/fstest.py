"""A port of the parts of continuity's ``fstest`` that containerd's snapshotter suite uses.

Appliers change a directory (create files and directories with exact modes, remove,
chown, hard-link, rename, set an extended attribute); :func:`check_directory_equal`
compares two trees by what continuity's manifests hold: each path's type, permission
bits (with setuid and friends), owner, content, link target, which paths share an inode,
and extended attributes. Times are not compared (the suite applies the same changes to
two trees at different moments), nor is the root directory itself (the suite compares a
``MkdirTemp`` directory with a snapshot).

Extended attributes: continuity's manifest records them, but its ``fstest`` comparison
leaves them out (a TODO in its ``compareResource``). They are compared here, being what
a layer store can lose on a copy-up, a commit or an export: the ``user.*`` namespace
(what applications set) and ``security.capability`` (file capabilities, a ping or a
newuidmap that stops working without them). ``trusted.*`` (overlay's own bookkeeping,
hidden by the mount anyway) and ``security.selinux`` (set by the host's policy, not by
the layer) are not.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

Applier = Callable[[Path], None]


def _at(root: Path, name: str) -> Path:
    return root / name.lstrip("/")


def create_file(name: str, data: bytes, perm: int) -> Applier:
    def apply(root: Path) -> None:
        p = _at(root, name)
        p.write_bytes(data)
        os.chmod(p, perm)
    return apply


def create_dir(name: str, perm: int) -> Applier:
    def apply(root: Path) -> None:
        p = _at(root, name)
        os.mkdir(p)
        os.chmod(p, perm)
    return apply


def remove_all(name: str) -> Applier:
    def apply(root: Path) -> None:
        p = _at(root, name)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()
    return apply


def chown(name: str, uid: int, gid: int) -> Applier:
    def apply(root: Path) -> None:
        os.lchown(_at(root, name), uid, gid)
    return apply


def link(old: str, new: str) -> Applier:
    def apply(root: Path) -> None:
        os.link(_at(root, old), _at(root, new))
    return apply


def rename(old: str, new: str) -> Applier:
    """os.rename; where overlay answers EXDEV (a directory of a lower layer, with
    redirect_dir off, as lamina mounts), do what mv(1) does: copy, then delete."""
    def apply(root: Path) -> None:
        src, dst = _at(root, old), _at(root, new)
        try:
            os.rename(src, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
            shutil.copystat(src, dst)
            st = os.lstat(src)
            os.lchown(dst, st.st_uid, st.st_gid)
            shutil.rmtree(src)
    return apply


def set_xattr(name: str, attr: str, value: bytes) -> Applier:
    def apply(root: Path) -> None:
        os.setxattr(_at(root, name), attr, value, follow_symlinks=False)
    return apply


def apply_all(*appliers: Applier) -> Applier:
    def apply(root: Path) -> None:
        for a in appliers:
            a(root)
    return apply


#: the extended attributes compared (see the module's docstring)
COMPARED_XATTR_PREFIXES = ("user.",)
COMPARED_XATTRS = ("security.capability",)


def xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    """The compared extended attributes of ``path`` (not followed), sorted."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    wanted = sorted(n for n in names if n.startswith(COMPARED_XATTR_PREFIXES) or n in COMPARED_XATTRS)
    return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in wanted)


def manifest(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, uid, gid, content digest or link target, xattrs, hard-link group)."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            body: object = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    body = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                body = st.st_rdev
            group = ""
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                group = inodes.setdefault((st.st_dev, st.st_ino), rel)
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, body, xattrs(p), group)
    return out


def check_directory_equal(a: Path, b: Path) -> None:
    """Raise AssertionError naming every path that differs between trees ``a`` and ``b``."""
    ma, mb = manifest(a), manifest(b)
    problems = []
    for path in sorted(set(ma) | set(mb)):
        if path not in mb:
            problems.append(f"{path}: only in {a}")
        elif path not in ma:
            problems.append(f"{path}: only in {b}")
        elif ma[path][:6] != mb[path][:6] or bool(ma[path][6]) != bool(mb[path][6]):
            problems.append(f"{path}: {ma[path]} != {mb[path]}")
    # hard links: the same paths must share an inode in both trees
    def groups(m: dict[str, tuple[object, ...]]) -> set[frozenset[str]]:
        by: dict[object, set[str]] = {}
        for path, entry in m.items():
            if entry[6]:
                by.setdefault(entry[6], set()).add(path)
        return {frozenset(g) for g in by.values()}
    if groups(ma) != groups(mb):
        problems.append(f"hard links differ: {sorted(map(sorted, groups(ma)))} != {sorted(map(sorted, groups(mb)))}")
    if problems:
        raise AssertionError("directories differ:\n  " + "\n  ".join(problems[:20]))
