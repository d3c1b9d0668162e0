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
import hashlib
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path


class _FdLock:
    """A lock held by an open file description: closing it releases the lock, which is
    also what the kernel does when the process dies. Subclasses say how to lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def _lock(self, fd: int, *, shared: bool, blocking: bool) -> None:
        raise NotImplementedError

    def acquire(self, *, shared: bool = False, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False if someone holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._lock(fd, shared=shared, blocking=blocking)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
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

    def fileno(self) -> int:
        """The descriptor that holds the lock. A child process given it (``pass_fds``)
        shares the open file description, and with it the lock, until both have closed
        it: how a worker process keeps a layer busy for as long as it writes there."""
        if self._fd is None:
            raise ValueError(f"lock on {self.path} is not held")
        return self._fd

    def __enter__(self) -> _FdLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FileLock(_FdLock):
    """An exclusive or shared flock on one file, created if missing."""

    def _lock(self, fd: int, *, shared: bool, blocking: bool) -> None:
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        fcntl.flock(fd, op if blocking else op | fcntl.LOCK_NB)


@contextlib.contextmanager
def locked(path: Path, *, shared: bool = False) -> Iterator[FileLock]:
    """``with locked(p):`` holds an flock on ``p`` for the block."""
    lock = FileLock(path)
    lock.acquire(shared=shared)
    try:
        yield lock
    finally:
        lock.release()


_FLOCK = struct.Struct("hh4xqqi4x")  # struct flock on LP64 Linux (x86_64, aarch64)


def _key_offset(key: str) -> int:
    """A byte offset standing for ``key``: 62 bits of its hash, so collisions are negligible."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 2


class KeyLock(_FdLock):
    """An exclusive or shared lock on one key, as a one-byte open-file-description lock
    at the key's offset in a single shared lock file.

    Why not a lock file per key: a refused operation (bad parent, unknown layer) would
    still leave a file behind, and deleting lock files safely is a known race. Why OFD
    locks and not POSIX ``lockf``: POSIX record locks belong to the process, so two
    threads of the plugin server would both "hold" the same key, and closing any fd of
    the file drops them all; OFD locks belong to the open file, like flock.
    """

    def __init__(self, path: Path, key: str) -> None:
        super().__init__(path)
        self.key = key
        self._offset = _key_offset(key)

    def _lock(self, fd: int, *, shared: bool, blocking: bool) -> None:
        kind = fcntl.F_RDLCK if shared else fcntl.F_WRLCK
        cmd = fcntl.F_OFD_SETLKW if blocking else fcntl.F_OFD_SETLK
        fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, self._offset, 1, 0))


def lock_conflicts(path: Path, key: str) -> bool:
    """Whether anybody holds ``key`` in the lock file ``path`` (shared or exclusive),
    asked with ``F_OFD_GETLK``: nothing is taken, so the question never stands in the
    way of work that wants the lock at that moment, as a try-and-release would."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _key_offset(key), 1, 0))
    finally:
        os.close(fd)
    return _FLOCK.unpack(got)[0] != fcntl.F_UNLCK


class KeyLockTable:
    """The locks of :class:`KeyLock` for short, frequent holds: one open fd per thread,
    kept, instead of an open and a close per hold.

    Why: a mount reference is taken and given back on every container start (dockerd's
    Get and Put), under a per-layer lock held for microseconds; the open and close of the
    lock file were a good part of that. Each thread has its own open file description,
    so threads still exclude each other (OFD locks belong to the description); a forked
    child opens its own. A thread must not hold the same key twice: with one description
    the inner release would drop the outer hold, so that is refused.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    def _fd(self) -> int:
        pid = os.getpid()
        if getattr(self._local, "pid", None) != pid:
            self._local.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._local.pid = pid
            self._local.held = set()
        return int(self._local.fd)

    @contextlib.contextmanager
    def held(self, key: str, *, shared: bool = False) -> Iterator[None]:
        """Hold ``key`` for the block, waiting for others to let go."""
        self._acquire(key, shared=shared, blocking=True)
        try:
            yield
        finally:
            self.release(key)

    def try_acquire(self, key: str) -> bool:
        """Hold ``key`` exclusively if nobody else has it (then :meth:`release` it);
        whether it is held. Not a context manager, so that it costs no generator: the
        get and put of a mounted view sit on every container start."""
        return self._acquire(key, shared=False, blocking=False)

    def release(self, key: str) -> None:
        """Let go of ``key``, held by this thread."""
        self._local.held.discard(key)
        fcntl.fcntl(self._fd(), fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, _key_offset(key), 1, 0))

    def _acquire(self, key: str, *, shared: bool, blocking: bool) -> bool:
        fd = self._fd()
        held: set[str] = self._local.held
        if key in held:
            raise RuntimeError(f"lock {key!r} of {self.path} is already held by this thread")
        kind = fcntl.F_RDLCK if shared else fcntl.F_WRLCK
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if blocking else fcntl.F_OFD_SETLK,
                        _FLOCK.pack(kind, os.SEEK_SET, _key_offset(key), 1, 0))
        except OSError as e:
            if blocking or e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return False
        held.add(key)
        return True
