"""Making writes survive a crash: atomic small files, directory fsync, filesystem sync.

Why syncfs for layers and not fsync per file: a layer of 10,000 files fsynced one by one
costs seconds; one ``syncfs(2)`` on the store's filesystem before the record says
"complete" gives the same promise (everything written before it is on disk) in one call.
For the few names of an empty layer the other way round: :func:`fsync_all` of those
names costs about one flush and, unlike ``syncfs``, does not wait for everything else
being written to the filesystem meanwhile.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

from lamina.fs.libc import libc_name

_libc = ctypes.CDLL(libc_name(), use_errno=True)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: the threads of :func:`fsync_all` (made on first use; a forked child makes its own)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_all(paths: Sequence[Path]) -> None:
    """fsync each of ``paths`` (files or directories), all at once.

    Why at once: each fsync ends in a journal commit and a cache flush of the device,
    a millisecond or more each, one after another. Issued together, the filesystem
    folds them into one commit (ext4's jbd2 and xfs's log both batch the waiters of a
    commit) and the block layer merges their flushes, so a handful costs about one;
    unlike ``syncfs`` they never wait for the dirty pages of other writers. A path
    that is gone is an error, as for :func:`os.fsync`."""
    global _pool
    if len(paths) == 1:
        _fsync_path(paths[0])
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
        pool = _pool
    for done in [pool.submit(_fsync_path, p) for p in paths]:
        done.result()


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half.

    temp file in the same directory, fsync, rename over, fsync the directory.
    """
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def syncfs(path: Path) -> None:
    """Flush every dirty page of the filesystem holding ``path`` (syncfs(2))."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class _Periodic:
    """Runs ``flush`` on a helper thread every ``interval`` seconds for the length of a
    ``with`` block (best effort: the first OSError ends it). The flushes release the
    GIL, so the work of the block goes on meanwhile."""

    def __init__(self, flush: Callable[[], object], interval: float, name: str) -> None:
        self.interval = interval
        self._flush = flush
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._flush()
            except OSError:
                return  # best effort only

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class FileWriteback(_Periodic):
    """While a big file is written, flush it to disk in the background.

    ``with FileWriteback(fd): write()`` runs ``fdatasync(fd)`` every ``interval``
    seconds, so the disk works while the file is written and the ``fsync`` that must
    follow only waits for the tail. Like :class:`EarlyWriteback` it promises nothing by
    itself.
    """

    def __init__(self, fd: int, interval: float = 0.05) -> None:
        super().__init__(lambda: os.fdatasync(fd), interval, "lamina-filewriteback")
        self.fd = fd


class EarlyWriteback(_Periodic):
    """While long work writes files, keep the disk busy flushing them in the background.

    ``with EarlyWriteback(root): unpack()`` runs ``syncfs`` every ``interval`` seconds;
    the final ``syncfs`` after the work then only waits for the tail instead of the whole
    layer. It promises nothing by itself: durability still comes from that final call.
    """

    def __init__(self, path: Path, interval: float = 0.05) -> None:
        super().__init__(lambda: syncfs(path), interval, "lamina-writeback")
        self.path = path
