"""Adapters between chunk iterators and file objects.

The archive engine produces tars as iterators of byte chunks (easy to stream into an HTTP
response or stdout); the API hands users file objects (easy to pass to anything). This
module is the bridge, and it runs a release callback exactly once when the stream is
closed or exhausted, which is how a diff gives back the mounts it took.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator


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
