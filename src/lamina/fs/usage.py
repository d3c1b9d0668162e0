"""Disk usage of a tree as ``du`` counts it: allocated blocks and inodes, links once.

Why not :func:`lamina.archive.changes.tree_size`: that is overlay2's DiffSize, the
apparent size of regular files. containerd's snapshotter Usage is what the tree costs the
disk (``st_blocks`` in 512-byte units) and how many inodes it holds, the root included,
each inode once however many names it has.
"""

from __future__ import annotations

import os
from pathlib import Path


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) beneath and including ``root``; symlinks not followed.

    Entries that vanish while the walk runs are skipped (a container may be writing).
    """
    seen: set[tuple[int, int]] = set()
    size = 0
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return 0, 0
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    stack = [os.fspath(root)]
    while stack:
        top = stack.pop()
        try:
            it = os.scandir(top)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                try:
                    est = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                key = (est.st_dev, est.st_ino)
                if key not in seen:
                    seen.add(key)
                    size += est.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return size, len(seen)
