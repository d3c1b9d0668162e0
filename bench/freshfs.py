"""A freshly made ext4 filesystem for one measurement (shared by the benches).

Why: on a filesystem where many files were just created and deleted, ext4's inode
allocator charges every later creator CPU time (seen here as five times the CPU for the
same image load), so a comparison measures the filesystem's history, not the tools. A
sparse image on a loop device gives each measurement a filesystem as new as the other's.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def available() -> bool:
    """Root, loop devices and mkfs.ext4 are there."""
    from lamina.fs.quota import loop_image_reason

    return os.geteuid() == 0 and loop_image_reason() is None


@contextlib.contextmanager
def fresh_fs(parent: Path | None = None, size: int = 6 << 30) -> Iterator[Path]:
    """Mount a new sparse ext4 image with about ``size`` bytes free; yield its mount point."""
    from lamina.fs.quota import create_image, unmount_image

    with tempfile.TemporaryDirectory(dir=parent, prefix="lamina-freshfs-") as tmp:
        mnt = Path(tmp) / "fs"
        mnt.mkdir()
        create_image(Path(tmp) / "fs.img", mnt, size)
        try:
            yield mnt
        finally:
            unmount_image(mnt)
