"""A comparable picture of a directory tree, for "these two views are equal" checks.

Records what a layer tar carries and a view must show: type, permission bits (with
setuid/setgid/sticky), owner, content, link target, device numbers, mtime in whole
seconds (tars keep no more), and which paths are hardlinks of each other.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def snapshot(root: Path, *, dir_mtimes: bool = True) -> dict[str, tuple]:
    """``{"/rel/path": (facts...)}`` for everything under ``root`` (not root itself).

    Hardlinks are recorded as groups of paths *in this view* sharing an inode, not as
    link counts: overlayfs shows a lower file's link count even when copy-up has split
    the other name off, which says nothing about the view.
    """
    pictures: dict[str, list[object]] = {}
    by_inode: dict[tuple[int, int], list[str]] = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = "/" + str(full.relative_to(root))
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            facts: list[object] = [oct(kind), oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid]
            if stat.S_ISREG(kind):
                facts.append(hashlib.sha256(full.read_bytes()).hexdigest())
                by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(kind):
                facts.append(os.readlink(full))
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                facts.append((os.major(st.st_rdev), os.minor(st.st_rdev)))
            if not stat.S_ISDIR(kind) or dir_mtimes:
                facts.append(int(st.st_mtime))
            pictures[rel] = facts
    for group in by_inode.values():
        if len(group) > 1:
            for rel in group:
                pictures[rel].append(("hardlinked-with", tuple(sorted(group))))
    return {rel: tuple(facts) for rel, facts in pictures.items()}


def only_paths(pictures: dict[str, tuple]) -> list[str]:
    return sorted(pictures)
