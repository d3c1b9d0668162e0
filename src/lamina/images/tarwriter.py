"""A small tar writer for image archives: members of known or unknown length.

Headers come from the one tar codec (:func:`lamina.archive.tar.writer.gnu_header`).
Why not :mod:`tarfile`'s ``addfile``: it needs the size before the data, and a layer's
diff is a stream whose length is known only at its end. On a seekable output (a file,
the usual ``-o FILE``) we write the header with size 0, stream the data, then go back and
rewrite the header: one pass over the layer. On a pipe the caller must give the size
(``save`` measures the layer first).

Headers are GNU-format 512-byte blocks (sizes past 8 GiB in base-256, as GNU tar and
Go's ``archive/tar`` read them), so the patched header never changes length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import IO

from lamina.archive.tar.format import DIRTYPE, END_OF_ARCHIVE, REGTYPE, SYMTYPE, padding
from lamina.archive.tar.writer import gnu_header
from lamina.errors import ImageError


def _header(name: str, *, size: int, mtime: int, kind: bytes = REGTYPE,
            mode: int = 0o644, linkname: str = "") -> bytes:
    return gnu_header(name.encode("utf-8", "surrogateescape"), size=size if kind == REGTYPE else 0,
                      mtime=mtime, typeflag=kind, mode=mode,
                      linkname=linkname.encode("utf-8", "surrogateescape"))


class TarWriter:
    """Writes tar members to ``out``; call :meth:`close` to end the archive."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        try:
            out.seek(0, 1)
            self.seekable = bool(out.seekable())
        except (OSError, AttributeError, ValueError):
            self.seekable = False
        self.bytes_written = 0

    def _write(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        self.bytes_written += len(data)

    def add_bytes(self, name: str, data: bytes, *, mtime: int = 0, mode: int = 0o644) -> None:
        self._write(_header(name, size=len(data), mtime=mtime, mode=mode))
        self._write(data)
        self._write(padding(len(data)))

    def add_dir(self, name: str, *, mtime: int = 0) -> None:
        self._write(_header(name.rstrip("/") + "/", size=0, mtime=mtime, kind=DIRTYPE, mode=0o755))

    def add_symlink(self, name: str, target: str, *, mtime: int = 0) -> None:
        self._write(_header(name, size=0, mtime=mtime, kind=SYMTYPE, mode=0o777, linkname=target))

    def add_stream(self, name: str, chunks: Iterable[bytes], *, mtime: int = 0,
                   size: int | None = None) -> tuple[str, int]:
        """Write a member from ``chunks``; return (``sha256:<hex>``, size) of its data.

        Without ``size`` the output must be seekable. With ``size`` the data must have
        exactly that length (it was measured before), else ImageError.
        """
        if size is None and not self.seekable:
            raise ValueError("add_stream without a size needs a seekable output")
        start = self._out.tell() if size is None else None
        self._write(_header(name, size=size or 0, mtime=mtime))
        digest = hashlib.sha256()
        n = 0
        for chunk in chunks:
            digest.update(chunk)
            n += len(chunk)
            self._write(chunk)
        if size is not None and n != size:
            raise ImageError(f"{name}: the data changed while it was written ({n} bytes, {size} expected)")
        self._write(padding(n))
        if start is not None:
            end = self._out.tell()
            self._out.seek(start)
            self._out.write(_header(name, size=n, mtime=mtime))
            self._out.seek(end)
        return "sha256:" + digest.hexdigest(), n

    def close(self) -> None:
        """Write the end-of-archive marker (two zero blocks, as Go's tar writer does)."""
        self._write(END_OF_ARCHIVE)
        self._out.flush()
