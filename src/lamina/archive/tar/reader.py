"""A streaming tar reader that also hands out the raw bytes around each entry.

Why our own reader: ``tarfile`` in stream mode cannot give back a header's raw bytes,
and tar-split must record them (plus the padding between entries and whatever follows
the end-of-archive blocks) so that a layer's ``diff`` can reproduce the original tar
byte for byte. Parsing 512-byte blocks with ``struct`` is also cheaper per entry than
``tarfile``'s object machinery, and per-entry Python work is what makes applying a
layer slow.

What it reads: ustar (the prefix counts whenever the magic is ``ustar``, as in Go),
star (a 131-byte prefix), old GNU (its atime), PAX (local ``x`` records: ``path``,
``linkpath``, ``size``, ``mtime``, ``atime``, ``uid``, ``gid``, ``uname``, ``gname``,
``SCHILY.xattr.*``; global ``g`` headers are validated and surfaced as entries of type
``GLOBAL`` but not applied to later entries, as Go's ``archive/tar`` and so Docker do),
GNU long names and long link names (``L``/``K``), base-256 numbers. Which name wins when
several headers give one, and which conflicts are refused, is :mod:`.overrides`.
Entry types are handed on as they are (``NUL`` and ``7`` as regular files): what an
unknown type means is the caller's to decide (apply refuses it; the Windows importer
follows hcsshim). GNU sparse files (type ``S`` or ``GNU.sparse.*`` records) are refused:
their data is not the file's bytes, Docker's own tar writer never makes them and no
layer in the wild needs them.

The bytes side (one buffer, data handed out as slices of it) is
:class:`~lamina.archive.tar.buffer.BlockBuffer`; the block layout and numbers are
:mod:`~lamina.archive.tar.format`; PAX records :mod:`~lamina.archive.tar.pax`; the entry
:class:`~lamina.archive.tar.entry.TarEntry`.

Bounded memory: file data is handed out in slices of one reusable 1 MiB buffer; PAX and
GNU long-name data are capped at 1 MiB, as Go caps them. Anything malformed raises
:class:`~lamina.errors.InvalidArchive` naming the entry.

Usage::

    reader = TarReader(stream, record=True)
    for entry in reader:
        for chunk in reader.data():     # memoryviews, valid until the next call
            ...
    reader.end_raw                      # padding + end-of-archive blocks
    for chunk in reader.trailing():     # bytes after the end-of-archive blocks
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from lamina.archive.tar.buffer import BUFFER_SIZE, BlockBuffer
from lamina.archive.tar.entry import TarEntry
from lamina.archive.tar.format import (
    BLK,
    BLOCK,
    CHR,
    CONT,
    DIR,
    FIFO,
    GLOBAL,
    GNU_MAGIC,
    GNU_VERSION,
    HEADER,
    HEADER_ONLY,
    LNK,
    LONGLINK,
    MAX_ENTRY_SIZE,
    MAX_META_SIZE,
    META,
    NUM_PAD,
    OLD_REG,
    PAX,
    REG,
    SPARSE,
    STAR_PREFIX_SIZE,
    STAR_TRAILER,
    SYM,
    USTAR_MAGIC,
    ZERO_BLOCK,
    number,
    signed_sum,
)
from lamina.archive.tar.overrides import Overrides, apply_pax, decode
from lamina.errors import InvalidArchive

#: what may follow the end-of-archive blocks: the padding of a tar writer's last record
#: (GNU tar's is 10 KiB unless its blocking factor says more; this allows a factor of 2048)
MAX_TRAILING = 1 << 20

__all__ = [
    "BLK", "BUFFER_SIZE", "CHR", "DIR", "FIFO", "GLOBAL", "LNK", "MAX_TRAILING", "REG", "SYM",
    "TarEntry", "TarReader",
]


_decode = decode


def _number(field: bytes, what: str, name: str) -> int:
    try:
        return number(field)
    except ValueError:
        raise InvalidArchive(f"bad {what} field {field!r}", name) from None


def _size(field: bytes, name: bytes) -> int:
    try:
        return number(field)
    except ValueError:
        if field[0] & 0x80:
            raise InvalidArchive("absurd size (a base-256 number past 64 bits)", _decode(name)) from None
        raise InvalidArchive(f"bad size field {field!r}", _decode(name)) from None


def _prefixed(name: bytes, prefix: bytes, block: bytes | bytearray) -> bytes:
    """``name`` under a ustar header's prefix field (star's is 131 bytes, then times)."""
    if block[508:512] == STAR_TRAILER:
        prefix = prefix[:STAR_PREFIX_SIZE]
    prefix = prefix.partition(b"\0")[0]
    return prefix + b"/" + name if prefix else name


def _old_format(name: bytes, magic: bytes, version: bytes,
                block: bytes | bytearray) -> tuple[bytes, int | None]:
    """A header without the ustar magic: old GNU, or V7. Returns the name and the atime.

    Old GNU headers keep atime and ctime where ustar has its prefix; as in Go, fields
    that are no numbers there mean an old Go writer's prefix instead (golang/go#12594).
    A V7 header has no fields past the link name, and Go reads none, while other
    readers take a prefix, owner names or device numbers from there: a value in them is
    refused (zeros in the device fields, which some writers leave, are no value).
    """
    if magic == GNU_MAGIC and version == GNU_VERSION:
        atime, ctime = block[345:357], block[357:369]
        try:
            seconds = number(atime) if atime[0] else None
            if ctime[0]:
                number(ctime)
        except ValueError:
            prefix = bytes(block[345:500]).partition(b"\0")[0]
            return (prefix + b"/" + name if prefix and prefix.isascii() else name), None
        return name, None if seconds is None else seconds * 1_000_000_000
    fields = bytes(block[265:500])
    if fields[:64].strip(b"\0") or fields[64:80].strip(b"0 \0") or fields[80:].strip(b"\0"):
        raise InvalidArchive("a header without the ustar magic has bytes in the ustar-only "
                             "fields (names, devices, prefix): tar readers differ on whether "
                             "they count", _decode(name))
    return name, None


class TarReader(BlockBuffer):
    """Iterate over a tar stream's entries; see the module docstring.

    ``record=True`` keeps each entry's raw header bytes in ``entry.raw`` (for
    tar-split); without it no bytes are copied out of the buffer for headers.
    """

    def __init__(self, stream: IO[bytes], *, record: bool = False) -> None:
        super().__init__(stream)
        self._record = record
        #: padding after the current entry's data
        self._pad = 0
        self._done = False
        #: whether a header was read yet (a bad first block means: not a tar at all)
        self._seen = False
        #: raw bytes after the last entry: its padding and the end-of-archive blocks
        self.end_raw = b""

    def __iter__(self) -> Iterator[TarEntry]:
        while True:
            entry = self._next()
            if entry is None:
                return
            yield entry

    def next_entry(self) -> TarEntry | None:
        """The next entry (what iterating gives), or None at the end."""
        return self._next()

    # -- for a caller that consumes plain entries from the buffer itself ------------------

    def between_entries(self) -> tuple[bytearray, int, int, int] | None:
        """``(buffer, pos, end, pad)`` when the current entry's data is all consumed: the
        next entry starts at ``buffer[pos + pad]`` (``pad`` bytes of the previous entry's
        padding come first) and ``buffer[pos:end]`` is what is buffered. None otherwise.
        For the native fast path (:mod:`lamina.archive.fastapply`)."""
        if self._done or self._remaining:
            return None
        return self._buf, self._pos, self._end, self._pad

    def consumed(self, pos: int, pad: int, name: str) -> None:
        """Note whole entries taken from the buffer by the caller: the next one starts at
        ``pos`` (after ``pad`` bytes of padding); ``name`` was the last one's."""
        self._pos = pos
        self._pad = pad
        self._current = name
        self._seen = True

    def buffer_at_least(self, n: int) -> bool:
        """Make ``n`` bytes (at most the buffer size) available from the position of
        :meth:`between_entries`; False if the stream ends first."""
        return n <= BUFFER_SIZE and self._fill(n)

    # -- headers ----------------------------------------------------------------------

    def _next(self) -> TarEntry | None:
        """The next entry: skip what is left of this one, fold its meta headers in."""
        if self._done:
            return None
        if self._remaining:
            self.skip()
        record = self._record
        raw: list[bytes] = []
        if self._pad:
            if record:
                raw.append(self._take(self._pad, "padding"))
            else:
                self._skip(self._pad, "padding")
            self._pad = 0

        meta: Overrides | None = None
        while True:
            if not self._fill(BLOCK):
                if self._end == self._pos:  # a clean end of stream without end blocks (a
                    self._finish(raw)       # meta header left pending names nothing: Go too)
                    return None
                raise InvalidArchive("archive truncated in a header", self._after())
            pos = self._pos
            block = self._buf[pos:pos + BLOCK]
            if block == ZERO_BLOCK:
                self._end_of_archive(raw)
                return None
            (name, mode, uid, gid, size, mtime, chksum, typ, link, magic, version, uname, gname,
             devmajor, devminor, prefix) = HEADER.unpack_from(block)
            name = name.partition(b"\0")[0]
            try:  # the common case: plain octal text (the fallback explains errors)
                total = int(chksum.rstrip(NUM_PAD) or b"0", 8)
                size = int(size.rstrip(NUM_PAD) or b"0", 8)
            except ValueError:
                total = self._checksum_field(chksum, block, name)
                size = _size(size, name)
            if sum(block) - sum(chksum) + 256 != total and signed_sum(block) != total:
                self._not_a_header(block, name, "header checksum mismatch")
            if record:
                raw.append(bytes(block))
            self._pos = pos + BLOCK
            tflag = typ[0]
            atime: int | None = None
            if magic == USTAR_MAGIC:  # ustar and PAX (Go goes by the magic, not the version)
                if prefix[0]:
                    name = _prefixed(name, prefix, block)
            elif prefix[0] or prefix[12] or magic != GNU_MAGIC or version != GNU_VERSION:
                name, atime = _old_format(name, magic, version, block)  # GNU times, or V7
            if size < 0 or size > MAX_ENTRY_SIZE:
                raise InvalidArchive(f"absurd size {size}", _decode(name))
            if tflag in META:
                if meta is None:
                    meta = Overrides()
                if self._meta(tflag, name, size, raw, meta):
                    return self._global_entry(name, meta, raw)
                continue
            break

        linkname = link.partition(b"\0")[0]
        pax = None
        if meta is not None:
            name, linkname, pax = meta.fold(name, linkname)
        dname = self._current = name.decode("utf-8", "surrogateescape")
        if tflag == OLD_REG:
            tflag = DIR if name.endswith(b"/") else REG
        elif tflag == CONT:
            tflag = REG
        elif tflag == SPARSE:
            raise InvalidArchive("GNU sparse files are not supported", dname)
        entry = TarEntry()
        entry.name = dname
        entry.name_bytes = name
        entry.linkname = linkname.decode("utf-8", "surrogateescape") if linkname else ""
        entry.type = tflag
        try:
            entry.mode = int(mode.rstrip(NUM_PAD) or b"0", 8) & 0o7777
            entry.uid = int(uid.rstrip(NUM_PAD) or b"0", 8)
            entry.gid = int(gid.rstrip(NUM_PAD) or b"0", 8)
            entry.mtime_ns = int(mtime.rstrip(NUM_PAD) or b"0", 8) * 1_000_000_000
        except ValueError:
            entry.mode = _number(mode, "mode", dname) & 0o7777
            entry.uid = _number(uid, "uid", dname)
            entry.gid = _number(gid, "gid", dname)
            entry.mtime_ns = _number(mtime, "mtime", dname) * 1_000_000_000
        entry.atime_ns = atime
        entry.uname = uname.partition(b"\0")[0].decode("utf-8", "surrogateescape")
        entry.gname = gname.partition(b"\0")[0].decode("utf-8", "surrogateescape")
        if tflag == CHR or tflag == BLK:
            entry.devmajor = _number(devmajor, "devmajor", dname)
            entry.devminor = _number(devminor, "devminor", dname)
        else:
            entry.devmajor = entry.devminor = 0
        entry.xattrs = None
        entry.pax = pax
        if pax is not None:
            apply_pax(entry, pax)
            size = entry.size if "size" in pax else size
        if entry.uid < 0 or entry.gid < 0:
            raise InvalidArchive(f"negative owner (uid {entry.uid}, gid {entry.gid})", dname)
        if tflag in HEADER_ONLY:
            size = 0
        entry.size = size
        self._remaining = size
        self._pad = -size % BLOCK
        entry.raw = b"".join(raw) if record else None
        self._seen = True
        return entry

    def _checksum_field(self, field: bytes, block: bytes | bytearray, name: bytes) -> int:
        try:
            return number(field)
        except ValueError:
            self._not_a_header(block, name, f"bad checksum field {field!r}")
            raise  # not reached

    def _not_a_header(self, block: bytes | bytearray, name: bytes, why: str) -> None:
        """Refuse a block that is no tar header. A first block without a tar magic means
        the input is no tar at all, and saying so helps more than the field that broke."""
        if not self._seen and block[257:262] != b"ustar":
            raise InvalidArchive(f"not a tar archive: its first 512 bytes are no tar header "
                                 f"(they begin {bytes(block[:16])!r})")
        raise InvalidArchive(why, _decode(name))

    def _meta(self, tflag: int, name: bytes, size: int, raw: list[bytes], meta: Overrides) -> bool:
        """Read one meta header's data into ``meta`` (see :mod:`.overrides` for what is
        refused); True for a PAX global header, which is an entry of its own."""
        dname = self._current = _decode(name)
        self._seen = True
        if size > MAX_META_SIZE:
            raise InvalidArchive(f"meta header of {size} bytes is too large", dname)
        what = "a PAX header" if tflag == PAX or tflag == GLOBAL else "a GNU long name"
        data = self._take(size, what)
        if self._record:
            raw.append(data)
            raw.append(self._take(-size % BLOCK, what))
        else:
            self._skip(-size % BLOCK, what)
        if tflag == PAX:
            meta.local(data, dname)
        elif tflag == GLOBAL:
            return meta.global_(data, dname)
        else:
            meta.gnu(tflag == LONGLINK, data)
        return False

    def _global_entry(self, name: bytes, meta: Overrides, raw: list[bytes]) -> TarEntry:
        """A PAX global header, surfaced as its own entry (Go does the same)."""
        entry = TarEntry()
        entry.name = _decode(name)
        entry.name_bytes = name
        entry.linkname = ""
        entry.type = GLOBAL
        entry.mode = entry.uid = entry.gid = entry.size = 0
        entry.mtime_ns = 0
        entry.atime_ns = None
        entry.devmajor = entry.devminor = 0
        entry.uname = entry.gname = ""
        entry.xattrs = None
        entry.pax = meta.pax
        entry.raw = b"".join(raw) if self._record else None
        return entry

    # -- the end ------------------------------------------------------------------------

    def _after(self) -> str | None:
        return self._current or None

    def _end_of_archive(self, raw: list[bytes]) -> None:
        """At a zero block: a second one must follow (or the stream may end)."""
        if self._record:
            raw.append(ZERO_BLOCK)
        self._pos += BLOCK
        if self._fill(BLOCK):
            pos = self._pos
            if self._buf[pos:pos + BLOCK] != ZERO_BLOCK:
                raise InvalidArchive("a header follows a zero block", self._after())
            if self._record:
                raw.append(ZERO_BLOCK)
            self._pos += BLOCK
        elif self._end != self._pos:
            raise InvalidArchive("archive truncated in the end-of-archive blocks",
                                 self._after())
        self._finish(raw)

    def _finish(self, raw: list[bytes]) -> None:
        self._done = True
        self.end_raw = b"".join(raw)

    def trailing(self) -> Iterator[bytes]:
        """Read the stream to its end after the last entry, yielding what follows
        the end-of-archive blocks in chunks of at most the buffer size (bytes).

        At most :data:`MAX_TRAILING` bytes: a tar writer pads its archive to a whole
        record (GNU tar: 10 KiB by default), and Go's tar-split keeps that remainder, so
        it is kept here too; an archive followed by more (``cat x.tar /dev/zero``) is
        refused once the limit is passed, instead of read for ever into the tar-split.
        """
        for _ in self:
            pass
        total = 0
        for chunk in self._rest():
            total += len(chunk)
            if total > MAX_TRAILING:
                raise InvalidArchive(
                    f"more than {MAX_TRAILING >> 10} KiB follow the end-of-archive blocks: a "
                    "tar is padded to its record size at most (10 KiB for GNU tar)")
            yield chunk
