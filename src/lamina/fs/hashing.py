"""A reader that hashes what passes through it.

Why: the DiffID of a layer is the sha256 of its uncompressed tar. Computing it while the
tar is being applied costs one pass over bytes already in memory, instead of a second
read of the whole tar later; ``check`` compares it with the tar rebuilt from tar-split.
"""

from __future__ import annotations

import hashlib
from typing import IO


class HashingReader:
    """Wraps a binary stream; ``.digest()`` is ``sha256:<hex>`` of everything read."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._hash.update(data)
        self.count += len(data)
        return data

    def readinto(self, b: bytearray | memoryview) -> int:
        readinto = getattr(self._raw, "readinto", None)
        if readinto is None:
            data = self._raw.read(len(b))
            n = len(data)
            b[:n] = data
        else:
            n = readinto(b) or 0
        self._hash.update(memoryview(b)[:n])
        self.count += n
        return n

    def drain(self) -> None:
        """Read to the end, so the digest covers bytes the consumer left unread."""
        buf = bytearray(1 << 20)
        while self.readinto(buf):
            pass

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def readable(self) -> bool:
        return True
