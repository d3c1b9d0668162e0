"""One entry of a tar, as the reader hands it out: every meta header folded in."""

from __future__ import annotations


class TarEntry:
    """One real entry of the archive, with every meta header already folded in.

    ``name`` and ``linkname`` are the tar's bytes decoded as UTF-8 with
    ``surrogateescape`` (so ``os.fsencode`` gives the original bytes back);
    ``name_bytes`` is the name as raw bytes. ``type`` is the type flag's byte value
    (``NUL`` and ``7`` already read as a regular file or directory). ``size`` is the
    number of data bytes that follow the header (0 for types that carry none). Times are
    in nanoseconds; ``atime_ns`` is None unless the archive gave one. ``xattrs`` holds the
    ``SCHILY.xattr.*`` records (name -> raw value) and ``pax`` every PAX record of the
    entry (None when there were none). ``raw`` (only when the reader records) is every
    byte of the archive from the end of the previous entry's data up to this entry's
    data: the previous entry's padding, meta headers and their data, and the header.
    """

    __slots__ = (
        "name", "name_bytes", "linkname", "type", "mode", "uid", "gid", "size",
        "mtime_ns", "atime_ns", "devmajor", "devminor", "uname", "gname", "xattrs",
        "pax", "raw",
    )

    name: str
    name_bytes: bytes
    linkname: str
    type: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int | None
    devmajor: int
    devminor: int
    uname: str
    gname: str
    xattrs: dict[str, bytes] | None
    pax: dict[str, bytes] | None
    raw: bytes | None

    def __repr__(self) -> str:
        return f"TarEntry({self.name!r}, type={chr(self.type)!r}, size={self.size})"
