"""Cross-process locks with fcntl: per store for short metadata work, per layer for long.

Why fcntl (flock) and not a lock in SQLite alone: a layer import can take minutes and must
not stop unrelated layers from being read or made, and a killed process must release its
locks at once (the kernel drops flock locks when the last fd closes). Long work holds a
per-layer lock; cleanup uses a non-blocking try on that lock to tell a crashed import
(lock free) from one still running (lock held).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class FileLock:
    """An exclusive or shared flock on one file, created if missing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, shared: bool = False, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False if someone holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if not blocking:
            op |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, op)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked(path: Path, *, shared: bool = False) -> Iterator[FileLock]:
    """``with locked(p):`` holds an flock on ``p`` for the block."""
    lock = FileLock(path)
    lock.acquire(shared=shared)
    try:
        yield lock
    finally:
        lock.release()
