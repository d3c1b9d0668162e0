"""Streams: chunk iterators as file objects, and readers that watch what they pass on.

The archive engine produces tars as iterators of byte chunks (easy to stream into an HTTP
response or stdout); the API hands users file objects (easy to pass to anything).
:class:`IterStream` is the bridge, and it runs a release callback exactly once when the
stream is closed or exhausted, which is how a diff gives back the mounts it took.

Every reader that counts or hashes what passes through it is one of the two here:
:class:`CountingReader` (progress bars) and :class:`HashingReader` (DiffIDs and blob
digests, checked while the data streams by, so nothing is read twice).
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import IO


class IterStream(io.RawIOBase):
    """A read-only binary stream over an iterator of ``bytes`` chunks."""

    def __init__(self, chunks: Iterable[bytes], on_close: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._it: Iterator[bytes] = iter(chunks)
        self._buf = memoryview(b"")
        self._on_close = on_close

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                chunk = next(self._it)
            except StopIteration:
                return 0
            self._buf = memoryview(chunk)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes; a whole chunk that fits is returned as it is,
        without a copy (large reads of a diff cost no more than the data itself)."""
        if size is None or size < 0:
            return self.readall()
        if not self._buf:
            try:
                chunk = next(self._it)
            except StopIteration:
                return b""
            if len(chunk) <= size:
                return chunk
            self._buf = memoryview(chunk)
        n = min(size, len(self._buf))
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return out

    def readall(self) -> bytes:
        return b"".join(self.chunks())

    def chunks(self) -> Iterator[bytes]:
        """Iterate the remaining data chunk by chunk (no copying into small reads)."""
        if self._buf:
            rest, self._buf = bytes(self._buf), memoryview(b"")
            yield rest
        yield from self._it

    def close(self) -> None:
        if self.closed:
            return
        try:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
        finally:
            cb, self._on_close = self._on_close, None
            try:
                if cb is not None:
                    cb()
            finally:
                super().close()


def open_chunks(chunks: Iterable[bytes], on_close: Callable[[], None] | None = None) -> IterStream:
    """A file object over ``chunks``; closing it runs ``on_close`` once.

    Not wrapped in a BufferedReader: that would copy every chunk once more, and the
    chunks are already large (the producers join small pieces).
    """
    return IterStream(chunks, on_close)


# -- readers that watch what passes through --------------------------------------------

_HASH_BATCH = 1 << 20  # bytes gathered before they are handed to the hashing thread


def _read(src: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes from ``src`` as it gives them: its own ``read`` where it has
    one (no copy), else through ``readinto`` (a raw source with nothing else)."""
    read = getattr(src, "read", None)
    if read is not None:
        data = read(size)
        return data if type(data) is bytes else bytes(data)
    buf = bytearray(size)
    n = src.readinto(buf) or 0
    del buf[n:]
    return bytes(buf)


def _readinto(src: IO[bytes], b: bytearray | memoryview) -> int:
    readinto = getattr(src, "readinto", None)
    if readinto is not None:
        return readinto(b) or 0
    data = src.read(len(b))
    n = len(data)
    b[:n] = data
    return n


class CountingReader(io.RawIOBase):
    """A raw reader that counts what is read from ``src`` (``.count``) and tells
    ``on_read`` the size of each read (a progress bar's ``update``)."""

    def __init__(self, src: IO[bytes], on_read: Callable[[int], object] | None = None) -> None:
        super().__init__()
        self._src = src
        self._on_read = on_read
        #: bytes read so far
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = _readinto(self._src, b)
        if n:
            self.count += n
            if self._on_read is not None:
                self._on_read(n)
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes as the source gives them (a new object, no copy made
        here: the tar reader takes a big file's data this way)."""
        if size is None or size < 0:
            return self.readall()
        data = _read(self._src, size)
        if data:
            self.count += len(data)
            if self._on_read is not None:
                self._on_read(len(data))
        return data


class BackgroundHash:
    """A digest taken on a helper thread of the chunks handed to :meth:`update`.

    Why: hashlib releases the GIL while it hashes, so on the other core the hashing
    overlaps the work that produces or consumes the bytes (unpacking a layer, writing a
    diff) instead of adding to it. Chunks are hashed later, so they must not change:
    hand over ``bytes``, never a buffer that is reused. The thread starts with the first
    chunk of at least ``threshold`` bytes; what comes before it is hashed inline.
    """

    def __init__(self, algorithm: str = "sha256", *, threshold: int = _HASH_BATCH // 2,
                 name: str = "lamina-hash") -> None:
        self.algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self._threshold = threshold
        self._name = name
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._thread: threading.Thread | None = None
        self._done = False

    def update(self, data: bytes) -> None:
        if self._thread is None:
            if len(data) < self._threshold:
                self._hash.update(data)
                return
            self._thread = threading.Thread(target=self._worker, name=self._name, daemon=True)
            self._thread.start()
        self._queue.put(data)

    def _worker(self) -> None:
        while (data := self._queue.get()) is not None:
            self._hash.update(data)

    def hexdigest(self) -> str:
        """Wait for what is queued and return the hex digest (then no more updates)."""
        self.stop()
        return self._hash.hexdigest()

    def stop(self) -> None:
        """Stop the helper thread after what is queued (for a digest no longer wanted)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class HashingReader(CountingReader):
    """A raw reader that hashes (and counts) every byte read from ``src``;
    :meth:`digest` is ``<algorithm>:<hex>`` of all of it.

    Why a second thread (:class:`BackgroundHash`): a layer's DiffID is the sha256 of its
    tar, taken while the tar is applied so the tar is read once, and on the other core
    the DiffID of a 200 MB layer is nearly free instead of adding half the unpack time.
    The caller's buffer is reused, so the thread gets a copy: of a large read as it is,
    of small reads gathered into batches of 1 MiB first (a stream read only in small
    pieces and smaller than one batch never starts the thread).
    """

    def __init__(self, src: IO[bytes], algorithm: str = "sha256",
                 on_read: Callable[[int], object] | None = None) -> None:
        super().__init__(src, on_read)
        self.algorithm = algorithm
        self._hash = BackgroundHash(algorithm, name="lamina-diffid")
        self._pending = bytearray()
        self._result: str | None = None

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = super().readinto(b)
        if n:
            if n >= _HASH_BATCH // 2 and not self._pending:  # one copy, not two
                self._hash.update(bytes(memoryview(b)[:n]))
                return n
            self._pending += memoryview(b)[:n]
            if len(self._pending) >= _HASH_BATCH:
                self._hash.update(bytes(self._pending))
                self._pending.clear()
        return n

    def read(self, size: int | None = -1) -> bytes:
        """:meth:`CountingReader.read`, hashed: a large read goes to the hashing thread
        as it is (bytes do not change), with no copy at all."""
        data = super().read(size)
        if data:
            if self._pending:
                self._pending += data
                if len(self._pending) >= _HASH_BATCH:
                    self._hash.update(bytes(self._pending))
                    self._pending.clear()
            elif len(data) >= _HASH_BATCH // 2:
                self._hash.update(data)
            else:
                self._pending += data
        return data

    def drain(self, chunk: int = 1 << 20) -> int:
        """Read (and hash) everything left in ``src``, so the digest covers bytes the
        consumer left unread; return how many bytes that was."""
        buf = bytearray(chunk)
        extra = 0
        while n := self.readinto(buf):
            extra += n
        return extra

    def digest(self) -> str:
        """Finish hashing (waiting for the helper thread) and return the digest."""
        if self._result is None:
            self._hash.update(bytes(self._pending))
            self._pending.clear()
            self._result = f"{self.algorithm}:{self._hash.hexdigest()}"
        return self._result

    def close(self) -> None:
        """Stop the helper thread (an apply that failed needs no digest)."""
        self._hash.stop()
        super().close()
