"""The byte side of the tar reader: one reusable buffer over the stream, and the current
entry's data handed out as slices of it.

Kept apart from header parsing (:mod:`.reader`, which subclasses :class:`BlockBuffer`, so
the hot attributes stay on one object and cost no extra lookup) because the two change
for different reasons: this is about system calls and copies, that about the format.

Why one buffer: small entries (a header, a few KiB of data, padding) then cost no read
call of their own and no copy; a file's data is handed out as ``memoryview`` slices of
the buffer, valid until the next call on the reader.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from lamina.errors import InvalidArchive

#: size of the reusable read buffer; also the largest data slice handed out
BUFFER_SIZE = 1 << 20
#: file data still to come from which on a big file's data bypasses the buffer
_DIRECT = BUFFER_SIZE // 2


class BlockBuffer:
    """A stream read into one buffer; ``_pos``/``_end`` delimit what is not consumed."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._readinto = getattr(stream, "readinto", None)
        self._buf = bytearray(BUFFER_SIZE)
        self._mv = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self._eof = False
        #: data bytes of the current entry not yet handed out or skipped
        self._remaining = 0
        #: the entry named in errors about truncation
        self._current = ""

    # -- the buffer -------------------------------------------------------------------

    def _read_more(self) -> int:
        """Read into the free tail of the buffer; 0 at end of stream."""
        if self._eof:
            return 0
        view = self._mv[self._end:]
        if self._readinto is not None:
            n = self._readinto(view) or 0
        else:
            chunk = self._stream.read(len(view))
            n = len(chunk)
            view[:n] = chunk
        if n == 0:
            self._eof = True
        self._end += n
        return n

    def _fill(self, need: int) -> bool:
        """Make ``need`` bytes (<= the buffer size) available at ``_pos``."""
        avail = self._end - self._pos
        if avail >= need:
            return True
        if self._pos + need > BUFFER_SIZE:
            self._buf[:avail] = bytes(self._mv[self._pos:self._end])
            self._pos = 0
            self._end = avail
        while self._end - self._pos < need:
            if not self._read_more():
                return False
        return True

    def _take(self, n: int, what: str) -> bytes:
        """Take ``n`` bytes (any size up to MAX_META_SIZE + a block) as a copy."""
        if n <= BUFFER_SIZE:
            if not self._fill(n):
                raise InvalidArchive(f"archive truncated in {what}", self._current)
            out = bytes(self._mv[self._pos:self._pos + n])
            self._pos += n
            return out
        parts = []
        while n:
            k = min(n, BUFFER_SIZE)
            parts.append(self._take(k, what))
            n -= k
        return b"".join(parts)

    def _skip(self, n: int, what: str) -> None:
        while n:
            avail = self._end - self._pos
            if not avail:
                self._pos = self._end = 0
                if not self._read_more():
                    raise InvalidArchive(f"archive truncated in {what}", self._current)
                avail = self._end
            k = avail if avail < n else n
            self._pos += k
            n -= k

    # -- data of the current entry ----------------------------------------------------

    @property
    def remaining(self) -> int:
        """Data bytes of the current entry not yet read or skipped."""
        return self._remaining

    def buffered(self) -> memoryview | None:
        """All of the current entry's remaining data as one slice, if it is already in
        the buffer (the common case for small files: no generator needed), else None.
        The slice is valid until the next call on the reader."""
        rem = self._remaining
        start = self._pos
        if rem and self._end - start >= rem:
            self._pos = start + rem
            self._remaining = 0
            return self._mv[start:start + rem]
        return None

    def data(self) -> Iterator[memoryview]:
        """Yield the current entry's data as slices of the internal buffer.

        Each slice is only valid until the generator is resumed. Once the buffer is
        empty, a big file's data is read in chunks of their own instead, handed out as
        they come: no copy into the buffer (a hashing stream hashes them as they are).
        """
        rem = self._remaining
        while rem:
            avail = self._end - self._pos
            if not avail:
                self._pos = self._end = 0
                if rem >= _DIRECT and not self._eof:
                    chunk = self._stream.read(min(rem, BUFFER_SIZE))
                    if not chunk:
                        self._eof = True
                        raise InvalidArchive("archive truncated in file data", self._current)
                    rem -= len(chunk)
                    self._remaining = rem
                    yield memoryview(chunk)
                    continue
                if not self._read_more():
                    raise InvalidArchive("archive truncated in file data", self._current)
                avail = self._end
            k = avail if avail < rem else rem
            start = self._pos
            self._pos = start + k
            rem -= k
            self._remaining = rem
            yield self._mv[start:start + k]

    def skip(self) -> None:
        """Skip what is left of the current entry's data."""
        rem = self._remaining
        self._remaining = 0
        self._skip(rem, "file data")

    def _rest(self) -> Iterator[bytes]:
        """Everything left in the stream, in chunks of at most the buffer size."""
        if self._pos < self._end:
            yield bytes(self._mv[self._pos:self._end])
        self._pos = self._end = 0
        while self._read_more():
            yield bytes(self._mv[:self._end])
            self._pos = self._end = 0
