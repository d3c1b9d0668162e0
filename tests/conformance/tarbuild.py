"""Layer tars built in memory for the tests, entry by entry, with fixed times and owners.

Why by hand and not by tarring a directory: the tests need tars a directory cannot give
(whiteouts, opaque markers, entries in a chosen order, Go-style trailers) and bytes that
stay the same from run to run, so that "diff reproduces the input" means something.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

#: a fixed mtime for every entry (2021-01-01); whole seconds, like Docker's tars
MTIME = 1609459200


@dataclass(frozen=True)
class Entry:
    """One tar member: a TarInfo and, for a regular file, its content."""

    info: tarfile.TarInfo
    data: bytes | None = None


def _info(name: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = MTIME
    return info


def reg(name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    info = _info(name, tarfile.REGTYPE, mode, uid, gid)
    info.size = len(data)
    return Entry(info, data)


def dir_(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(_info(name.rstrip("/") + "/", tarfile.DIRTYPE, mode, uid, gid))


def symlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.SYMTYPE, 0o777, 0, 0)
    info.linkname = target
    return Entry(info)


def hardlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.LNKTYPE, 0o644, 0, 0)
    info.linkname = target
    return Entry(info)


def fifo(name: str, mode: int = 0o644) -> Entry:
    return Entry(_info(name, tarfile.FIFOTYPE, mode, 0, 0))


def whiteout(path: str) -> Entry:
    """``.wh.<name>`` beside ``path``: deletes ``path`` from the layers below. Written as
    Docker's ExportChanges writes it: an empty regular file with mode 0."""
    head, _, base = path.rstrip("/").rpartition("/")
    name = f"{head}/.wh.{base}" if head else f".wh.{base}"
    return Entry(_info(name, tarfile.REGTYPE, 0, 0, 0))


def opaque(directory: str) -> Entry:
    """``<dir>/.wh..wh..opq``: hides everything the layers below have in ``directory``."""
    return Entry(_info(f"{directory.rstrip('/')}/.wh..wh..opq", tarfile.REGTYPE, 0o755, 0, 0))


def build(entries: list[Entry], *, fmt: int = tarfile.PAX_FORMAT, go_trailer: bool = True) -> bytes:
    """The tar of ``entries`` in order.

    ``go_trailer``: end like Go's archive/tar (the two zero blocks only) rather than
    Python's padding to a 10 KiB record; Docker's tars end the Go way, and tar-split must
    reproduce either exactly.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            tf.addfile(e.info, io.BytesIO(e.data) if e.data is not None else None)
        end = tf.offset
    data = buf.getvalue()
    if go_trailer:
        data = data[:end] + b"\0" * 1024
    return data


def content_size(entries: list[Entry]) -> int:
    """Sum of regular-file sizes: what apply_diff must return for this tar."""
    return sum(len(e.data) for e in entries if e.data is not None)
