"""A streaming tar reader that also hands out the raw bytes around each entry.

Why our own reader: ``tarfile`` in stream mode cannot give back a header's raw bytes,
and tar-split must record them (plus the padding between entries and whatever follows
the end-of-archive blocks) so that a layer's ``diff`` can reproduce the original tar
byte for byte. Parsing 512-byte blocks with ``struct`` is also cheaper per entry than
``tarfile``'s object machinery, and per-entry Python work is what makes applying a
layer slow.

What it reads: ustar, PAX (local ``x`` records: ``path``, ``linkpath``, ``size``,
``mtime``, ``atime``, ``uid``, ``gid``, ``uname``, ``gname``, ``SCHILY.xattr.*``;
global ``g`` headers are validated and surfaced as entries of type ``GLOBAL`` but not
applied to later entries, as Go's ``archive/tar`` and so Docker do), GNU long names and
long link names (``L``/``K``), the GNU atime field, star's prefix, base-256 numbers.
GNU sparse files (type ``S`` or ``GNU.sparse.*`` records) are refused: Docker's own tar
writer never makes them and no layer in the wild needs them.

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

import struct
from collections.abc import Iterator
from typing import IO

from lamina.errors import InvalidArchive

BLOCK = 512
#: size of the reusable read buffer; also the largest data slice handed out
BUFFER_SIZE = 1 << 20
#: PAX and GNU long-name data larger than this is refused (Go's limit too)
MAX_META_SIZE = 1 << 20
#: a size no real entry can have (Go's int64 limit); larger ones are hostile
MAX_ENTRY_SIZE = (1 << 63) - 1

# Entry types, as the integer value of the typeflag byte.
REG = ord("0")
LNK = ord("1")
SYM = ord("2")
CHR = ord("3")
BLK = ord("4")
DIR = ord("5")
FIFO = ord("6")
CONT = ord("7")
GLOBAL = ord("g")
_PAX = ord("x")
_GNU_LONGNAME = ord("L")
_GNU_LONGLINK = ord("K")
_GNU_SPARSE = ord("S")
_OLD_REG = 0  # a NUL typeflag: regular file (or a directory if the name ends in "/")

#: types that never carry data, whatever their size field says (as in Go)
_HEADER_ONLY = frozenset({LNK, SYM, CHR, BLK, DIR, FIFO})
_KNOWN = frozenset({REG, LNK, SYM, CHR, BLK, DIR, FIFO, CONT, GLOBAL})

_ZERO_BLOCK = bytes(BLOCK)
#: name mode uid gid size mtime chksum type linkname magic+version uname gname
#: devmajor devminor prefix(155) [12 unused]
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
_USTAR = b"ustar\x0000"
_GNU = b"ustar  \x00"


class TarEntry:
    """One real entry of the archive, with every meta header already folded in.

    ``name`` and ``linkname`` are the tar's bytes decoded as UTF-8 with
    ``surrogateescape`` (so ``os.fsencode`` gives the original bytes back);
    ``name_bytes`` is the name as raw bytes. ``size`` is the number of data bytes that
    follow the header (0 for types that carry none). Times are in nanoseconds;
    ``atime_ns`` is None unless the archive gave one. ``xattrs`` holds the
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


_PAD = b" \0"


def _signed_sum(block: bytes | bytearray) -> int:
    """The header sum with bytes read as signed, as some old tars computed it."""
    total = 256
    for i, b in enumerate(block):
        if not 148 <= i < 156:
            total += b - 256 if b > 127 else b
    return total


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _number(field: bytes, what: str, name: str) -> int:
    """Parse a numeric header field: octal text, or base-256 if the top bit is set."""
    if field[0] & 0x80:
        bits = 8 * len(field) - 1
        value = int.from_bytes(field, "big") & ((1 << bits) - 1)
        if value >> (bits - 1):  # two's complement sign bit
            value -= 1 << bits
        return value
    text = field.strip(b" \x00")
    if not text:
        return 0
    if not text.isdigit():
        raise InvalidArchive(f"bad {what} field {field!r}", name)
    try:
        return int(text, 8)
    except ValueError:
        raise InvalidArchive(f"bad {what} field {field!r}", name) from None


def _pax_int(value: bytes, key: str, name: str) -> int:
    if not value.isdigit():
        raise InvalidArchive(f"bad PAX {key} record {value!r}", name)
    return int(value)


def _pax_time_ns(value: bytes, key: str, name: str) -> int:
    """PAX times are decimal seconds with an optional sign and fraction."""
    text = value
    negative = text.startswith(b"-")
    if negative:
        text = text[1:]
    whole, dot, frac = text.partition(b".")
    if not whole.isdigit() or (dot and frac and not frac.isdigit()):
        raise InvalidArchive(f"bad PAX {key} record {value!r}", name)
    ns = int(whole) * 1_000_000_000 + int((frac[:9] or b"0").ljust(9, b"0"))
    return -ns if negative else ns


def parse_pax(data: bytes, name: str) -> dict[str, bytes]:
    """Split PAX extended-header data into records (``"LEN KEY=VALUE\\n"`` each).

    Keys are decoded as UTF-8; values stay bytes (xattr values are binary).
    ``name`` is only used to name the culprit in errors.
    """
    records: dict[str, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos] == 0 and not data[pos:].strip(b"\0"):
            break  # NUL padding after the last record, as some writers leave
        space = data.find(b" ", pos, pos + 24)
        if space < 0 or not data[pos:space].isdigit():
            raise InvalidArchive("malformed PAX record (no length)", name)
        length = int(data[pos:space])
        stop = pos + length
        if length <= space - pos + 1 or stop > end or data[stop - 1] != 0x0A:
            raise InvalidArchive("malformed PAX record (bad length)", name)
        key, eq, value = data[space + 1:stop - 1].partition(b"=")
        if not eq or not key:
            raise InvalidArchive("malformed PAX record (no key)", name)
        try:
            records[key.decode("utf-8")] = value
        except UnicodeDecodeError:
            raise InvalidArchive("malformed PAX record (key not UTF-8)", name) from None
        pos = stop
    return records


class TarReader:
    """Iterate over a tar stream's entries; see the module docstring.

    ``record=True`` keeps each entry's raw header bytes in ``entry.raw`` (for
    tar-split); without it no bytes are copied out of the buffer for headers.
    """

    def __init__(self, stream: IO[bytes], *, record: bool = False) -> None:
        self._stream = stream
        self._readinto = getattr(stream, "readinto", None)
        self._record = record
        self._buf = bytearray(BUFFER_SIZE)
        self._mv = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self._eof = False
        #: data bytes of the current entry not yet handed out or skipped
        self._remaining = 0
        #: padding after the current entry's data
        self._pad = 0
        self._current = ""
        self._done = False
        #: raw bytes after the last entry: its padding and the end-of-archive blocks
        self.end_raw = b""

    # -- buffer ---------------------------------------------------------------------

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

    # -- data of the current entry ----------------------------------------------

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

        Each slice is only valid until the generator is resumed.
        """
        rem = self._remaining
        while rem:
            avail = self._end - self._pos
            if not avail:
                self._pos = self._end = 0
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

    # -- headers ------------------------------------------------------------------

    def __iter__(self) -> Iterator[TarEntry]:
        while True:
            entry = self._next()
            if entry is None:
                return
            yield entry

    def _next(self) -> TarEntry | None:
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

        pax: dict[str, bytes] | None = None
        pax_error: InvalidArchive | None = None
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            if not self._fill(BLOCK):
                if self._end == self._pos:  # clean end of stream without end blocks
                    self._finish(raw)
                    return None
                raise InvalidArchive("archive truncated in a header", self._after())
            pos = self._pos
            block = self._buf[pos:pos + BLOCK]
            if block == _ZERO_BLOCK:
                self._end_of_archive(raw)
                return None
            (name, mode, uid, gid, size, mtime, chksum, typ, link, magic, uname, gname,
             devmajor, devminor, prefix) = _HEADER.unpack_from(block)
            name = name.partition(b"\0")[0]
            try:  # the common case: plain octal text (the fallback explains errors)
                total = int(chksum.rstrip(_PAD) or b"0", 8)
                size = int(size.rstrip(_PAD) or b"0", 8)
            except ValueError:
                total = _number(chksum, "checksum", _decode(name))
                size = _number(size, "size", _decode(name))
            if sum(block) - sum(chksum) + 256 != total and _signed_sum(block) != total:
                raise InvalidArchive("header checksum mismatch", _decode(name))
            if record:
                raw.append(bytes(block))
            self._pos = pos + BLOCK
            tflag = typ[0]
            if magic == _USTAR:
                if block[508:512] == b"tar\0":  # star: a shorter prefix, then times
                    prefix = prefix[:131]
                prefix = prefix.partition(b"\0")[0]
                if prefix:
                    name = prefix + b"/" + name
            if size < 0 or size > MAX_ENTRY_SIZE:
                raise InvalidArchive(f"absurd size {size}", _decode(name))
            if tflag == _PAX or tflag == GLOBAL or tflag == _GNU_LONGNAME or tflag == _GNU_LONGLINK:
                dname = self._current = _decode(name)
                if size > MAX_META_SIZE:
                    raise InvalidArchive(f"meta header of {size} bytes is too large", dname)
                if tflag == _GNU_LONGNAME or tflag == _GNU_LONGLINK:
                    data = self._take_meta(size, raw, "a GNU long name").partition(b"\0")[0]
                    if tflag == _GNU_LONGNAME:
                        long_name = data
                    else:
                        long_link = data
                    continue
                data = self._take_meta(size, raw, "a PAX header")
                try:
                    records = parse_pax(data, dname)
                except InvalidArchive as exc:
                    # Name the entry the records were for, if its header is readable.
                    pax_error = exc
                    continue
                if tflag == GLOBAL:
                    return self._global_entry(dname, name, records, raw)
                pax = records
                continue
            break

        if long_name is not None:
            name = long_name
        linkname = long_link if long_link is not None else link.partition(b"\0")[0]
        if pax is not None:
            value = pax.get("path")
            if value is not None:
                name = value
            value = pax.get("linkpath")
            if value is not None:
                linkname = value
        dname = self._current = name.decode("utf-8", "surrogateescape")
        if pax_error is not None:
            raise InvalidArchive(str(pax_error).split(": ", 1)[-1], dname)

        if tflag == _OLD_REG:
            tflag = DIR if name.endswith(b"/") else REG
        elif tflag == CONT:
            tflag = REG
        elif tflag == _GNU_SPARSE:
            raise InvalidArchive("GNU sparse files are not supported", dname)
        elif tflag not in _KNOWN:
            raise InvalidArchive(f"unsupported entry type {chr(tflag)!r}", dname)
        entry = TarEntry()
        entry.name = dname
        entry.name_bytes = name
        entry.linkname = linkname.decode("utf-8", "surrogateescape") if linkname else ""
        entry.type = tflag
        try:
            entry.mode = int(mode.rstrip(_PAD) or b"0", 8) & 0o7777
            entry.uid = int(uid.rstrip(_PAD) or b"0", 8)
            entry.gid = int(gid.rstrip(_PAD) or b"0", 8)
            entry.mtime_ns = int(mtime.rstrip(_PAD) or b"0", 8) * 1_000_000_000
        except ValueError:
            entry.mode = _number(mode, "mode", dname) & 0o7777
            entry.uid = _number(uid, "uid", dname)
            entry.gid = _number(gid, "gid", dname)
            entry.mtime_ns = _number(mtime, "mtime", dname) * 1_000_000_000
        entry.atime_ns = None
        entry.uname = uname.partition(b"\0")[0].decode("utf-8", "surrogateescape")
        entry.gname = gname.partition(b"\0")[0].decode("utf-8", "surrogateescape")
        if tflag == CHR or tflag == BLK:
            entry.devmajor = _number(devmajor, "devmajor", dname)
            entry.devminor = _number(devminor, "devminor", dname)
        else:
            entry.devmajor = entry.devminor = 0
        if magic == _GNU and prefix[:12].strip(b" \x00"):
            entry.atime_ns = _number(prefix[:12], "atime", dname) * 1_000_000_000
        entry.xattrs = None
        entry.pax = pax
        if pax is not None:
            self._apply_pax(entry, pax)
            size = entry.size if "size" in pax else size
        if entry.uid < 0 or entry.gid < 0:
            raise InvalidArchive(f"negative owner {entry.uid}:{entry.gid}", dname)
        if tflag in _HEADER_ONLY:
            size = 0
        entry.size = size
        self._remaining = size
        self._pad = -size % BLOCK
        entry.raw = b"".join(raw) if record else None
        return entry

    def _take_meta(self, size: int, raw: list[bytes], what: str) -> bytes:
        data = self._take(size, what)
        pad = -size % BLOCK
        if self._record:
            raw.append(data)
            raw.append(self._take(pad, what))
        else:
            self._skip(pad, what)
        return data

    def _apply_pax(self, entry: TarEntry, pax: dict[str, bytes]) -> None:
        name = entry.name
        for key, value in pax.items():
            if key.startswith("SCHILY.xattr."):
                attr = key[13:]
                if attr:
                    if entry.xattrs is None:
                        entry.xattrs = {}
                    entry.xattrs[attr] = value
            elif key == "size":
                entry.size = _pax_int(value, key, name)
                if entry.size > MAX_ENTRY_SIZE:
                    raise InvalidArchive(f"absurd size {entry.size}", name)
            elif key == "uid":
                entry.uid = _pax_int(value, key, name)
            elif key == "gid":
                entry.gid = _pax_int(value, key, name)
            elif key == "mtime":
                entry.mtime_ns = _pax_time_ns(value, key, name)
            elif key == "atime":
                entry.atime_ns = _pax_time_ns(value, key, name)
            elif key == "uname":
                entry.uname = _decode(value)
            elif key == "gname":
                entry.gname = _decode(value)
            elif key in ("path", "linkpath"):
                if b"\0" in value:
                    raise InvalidArchive(f"PAX {key} record holds a NUL byte", name)
            elif key.startswith("GNU.sparse."):
                raise InvalidArchive("GNU sparse files are not supported", name)

    def _global_entry(self, dname: str, name: bytes, records: dict[str, bytes],
                      raw: list[bytes]) -> TarEntry:
        """A PAX global header, surfaced as its own entry (Go does the same)."""
        entry = TarEntry()
        entry.name = dname
        entry.name_bytes = name
        entry.linkname = ""
        entry.type = GLOBAL
        entry.mode = entry.uid = entry.gid = entry.size = 0
        entry.mtime_ns = 0
        entry.atime_ns = None
        entry.devmajor = entry.devminor = 0
        entry.uname = entry.gname = ""
        entry.xattrs = None
        entry.pax = records
        entry.raw = b"".join(raw) if self._record else None
        return entry

    # -- the end ------------------------------------------------------------------

    def _after(self) -> str | None:
        return self._current or None

    def _end_of_archive(self, raw: list[bytes]) -> None:
        """At a zero block: a second one must follow (or the stream may end)."""
        if self._record:
            raw.append(_ZERO_BLOCK)
        self._pos += BLOCK
        if self._fill(BLOCK):
            pos = self._pos
            if self._buf[pos:pos + BLOCK] != _ZERO_BLOCK:
                raise InvalidArchive("a header follows a zero block", self._after())
            if self._record:
                raw.append(_ZERO_BLOCK)
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
        the end-of-archive blocks in chunks of at most the buffer size (bytes)."""
        for _ in self:
            pass
        if self._pos < self._end:
            yield bytes(self._mv[self._pos:self._end])
        self._pos = self._end = 0
        while self._read_more():
            yield bytes(self._mv[:self._end])
            self._pos = self._end = 0
