"""The Windows layer tar format: backuptar's PAX records, names, times, raw headers.

Format only: no driver, no layer directories. What lives here and why:

* the names and values hcsshim and go-winio put in a layer tar (``Files/`` ``Hives/``
  ``UtilityVM/`` prefixes, ``MSWINDOWS.*`` / ``LIBARCHIVE.*`` records, attribute bits);
* PAX time strings and FILETIME arithmetic, done with integers, because a float cannot
  hold Windows' 100 ns steps at today's dates;
* a streaming tar reader that hands out each member's *raw* header bytes alongside the
  parsed header, so an importer can keep every record verbatim and rebuild the tar byte
  for byte (``tarfile`` hides the raw blocks and normalises records away);
* a header encoder that writes what go-winio's ``BasicInfoHeader`` writes (PAX format,
  mode with the file-type bits and no permission bits, records sorted by key), which
  ``tarfile`` cannot (it masks the mode to ``0o7777``);
* the hooks an importer needs to record the tar as Docker's tar-split does (raw
  segments, and name, size and CRC-64 per member), so the layer's tar can be rebuilt
  byte for byte from the stored files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntFlag
from typing import IO, Protocol

from lamina.archive.tar.crc64 import Crc64
from lamina.archive.tar.writer import (  # noqa: F401 - BLOCK, END_OF_ARCHIVE: part of this module's names
    BLKTYPE,
    BLOCK,
    CHRTYPE,
    DIRTYPE,
    END_OF_ARCHIVE,
    LNKTYPE,
    REGTYPE,
    SYMTYPE,
)
from lamina.errors import InvalidArchive

# -- layout -------------------------------------------------------------------------------

FILES = "Files"
HIVES = "Hives"
UTILITY_VM = "UtilityVM"
UTILITY_VM_FILES = "UtilityVM/Files"
WHITEOUT_PREFIX = ".wh."
#: what the AUFS opaque marker ``.wh..wh..opq`` deletes when read as hcsshim reads it:
#: a file literally named ``.wh..opq``, which never exists (Windows has no opaque folders)
OPAQUE_TARGET = ".wh..opq"

#: files that importing a UVM rewrites in place, and the name of their pristine copy in
#: the layer folder (moby/moby#26842); the getter serves the copies so the layer's tar
#: can still be rebuilt byte for byte
MUTATED_FILES: dict[str, str] = {
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD": "bcd.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG": "bcd.log.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG1": "bcd.log1.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG2": "bcd.log2.bak",
}

#: hives ProcessBaseLayer needs in every base layer (hcsshim converttobaselayer.go)
BASE_LAYER_HIVES = tuple(
    f"Files/Windows/System32/config/{name}" for name in ("DEFAULT", "SAM", "SECURITY", "SOFTWARE", "SYSTEM")
)
#: what a base layer with a utility VM must contain
UVM_BCD = "UtilityVM/Files/EFI/Microsoft/Boot/BCD"

# -- PAX record keys (go-winio backuptar) -----------------------------------------------------

FILEATTR = "MSWINDOWS.fileattr"
RAWSD = "MSWINDOWS.rawsd"
SDDL = "MSWINDOWS.sd"
MOUNTPOINT = "MSWINDOWS.mountpoint"
EA_PREFIX = "MSWINDOWS.xattr."
CREATIONTIME = "LIBARCHIVE.creationtime"
#: the record families an importer keeps per file, whatever their key
WINDOWS_RECORD_PREFIXES = ("MSWINDOWS.", "LIBARCHIVE.")


def windows_records(pax: Mapping[str, str]) -> dict[str, str]:
    """The ``MSWINDOWS.*`` and ``LIBARCHIVE.*`` records of a header, as given."""
    return {k: v for k, v in pax.items() if k.startswith(WINDOWS_RECORD_PREFIXES)}


class FileAttr(IntFlag):
    """Win32 ``FILE_ATTRIBUTE_*`` bits, as ``MSWINDOWS.fileattr`` carries them (decimal)."""

    READONLY = 0x1
    HIDDEN = 0x2
    SYSTEM = 0x4
    DIRECTORY = 0x10
    ARCHIVE = 0x20
    DEVICE = 0x40
    NORMAL = 0x80
    TEMPORARY = 0x100
    SPARSE_FILE = 0x200
    REPARSE_POINT = 0x400
    COMPRESSED = 0x800
    OFFLINE = 0x1000
    NOT_CONTENT_INDEXED = 0x2000
    ENCRYPTED = 0x4000
    INTEGRITY_STREAM = 0x8000
    VIRTUAL = 0x10000
    NO_SCRUB_DATA = 0x20000
    RECALL_ON_OPEN = 0x40000
    PINNED = 0x80000
    UNPINNED = 0x100000
    RECALL_ON_DATA_ACCESS = 0x400000


def attribute_names(value: int) -> list[str]:
    """``FILE_ATTRIBUTE_*`` names of the bits set in ``value``; unknown bits as hex."""
    names = [f"FILE_ATTRIBUTE_{flag.name}" for flag in FileAttr if value & flag]
    rest = value & ~sum(FileAttr)
    if rest:
        names.append(f"0x{rest:x}")
    return names


def parse_fileattr(value: str, entry: str) -> int:
    """``MSWINDOWS.fileattr`` as go-winio reads it: unsigned decimal, 32 bits."""
    if not value.isdigit() or int(value) >= 2**32:
        raise InvalidArchive(f"{FILEATTR}={value!r} is not an unsigned 32-bit decimal", entry)
    return int(value)


# -- times -------------------------------------------------------------------------------------

_NS = 1_000_000_000
#: FILETIME of 1970-01-01 (100 ns ticks since 1601-01-01)
FILETIME_UNIX_EPOCH = 116444736000000000


def format_pax_time(ns: int) -> str:
    """A PAX time string exactly as Go's archive/tar (and backuptar) writes it."""
    secs, nsecs = divmod(ns, _NS)
    if nsecs == 0:
        return str(secs)
    sign = ""
    if secs < 0:
        sign, secs, nsecs = "-", -(secs + 1), _NS - nsecs
    return f"{sign}{secs}.{nsecs:09d}".rstrip("0")


def parse_pax_time(text: str) -> int:
    """Nanoseconds from a PAX time string, with Go's rules (fraction padded or cut to 9
    digits, sign-magnitude negatives); ValueError if it is not one."""
    whole, dot, frac = text.partition(".")
    digits = whole[1:] if whole.startswith("-") else whole
    if not digits.isdigit() or (dot and not frac.isdigit()):
        raise ValueError(f"invalid PAX time {text!r}")
    secs = int(whole)
    nsecs = int((frac + "000000000")[:9]) if dot else 0
    if whole.startswith("-"):
        return secs * _NS - nsecs
    return secs * _NS + nsecs


def ns_to_filetime(ns: int) -> int:
    """FILETIME ticks for Unix nanoseconds (Go truncates the division toward zero)."""
    ticks = abs(ns) // 100
    return (ticks if ns >= 0 else -ticks) + FILETIME_UNIX_EPOCH


def filetime_to_ns(ft: int) -> int:
    return (ft - FILETIME_UNIX_EPOCH) * 100


# -- names -------------------------------------------------------------------------------------


def split_name(name: str) -> list[str]:
    """The components of a tar name, Windows style (``/`` and ``\\`` both separate);
    ``.`` and empty parts dropped. InvalidArchive for absolute names and ``..``."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise InvalidArchive("absolute name in a layer tar", name)
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArchive("'..' in a layer tar name", name)
    if not parts:
        raise InvalidArchive("empty name in a layer tar", name)
    if "\0" in name:
        raise InvalidArchive("NUL in a layer tar name", name)
    return parts


def has_prefix(parts: list[str], prefix: str) -> bool:
    """Whether ``parts`` is ``prefix`` or below it (case-blind, as NTFS compares)."""
    want = prefix.split("/")
    return len(parts) >= len(want) and [p.casefold() for p in parts[: len(want)]] == [
        w.casefold() for w in want
    ]


def stream_split(last: str) -> tuple[str, str] | None:
    """``("file", "stream")`` for an alternate-data-stream name ``file:stream`` (``:``
    cannot appear in an NTFS file name, so it always means a stream), else None."""
    base, colon, stream = last.partition(":")
    if not colon or not base:
        return None
    return base, stream


# -- PAX records -------------------------------------------------------------------------------


def parse_pax_records(data: bytes, entry: str = "") -> dict[str, str]:
    """Decode a PAX extended header payload (``"%d %s=%s\\n"`` records)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # trailing NUL padding some writers leave
            break
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            raise InvalidArchive("malformed PAX record length", entry)
        length = int(data[pos:space])
        end = pos + length
        if length < 5 or end > len(data) or data[end - 1] != 0x0A:
            raise InvalidArchive("malformed PAX record", entry)
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise InvalidArchive("PAX record without '='", entry)
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def encode_pax_records(records: Mapping[str, str]) -> bytes:
    """Encode records sorted by key (as Go does), each ``"%d key=value\\n"``."""
    out = bytearray()
    for key in sorted(records):
        body = f" {key}={records[key]}\n".encode("utf-8", "surrogateescape")
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length = len(str(length)) + len(body)
        out += str(length).encode() + body
    return bytes(out)


# -- header encode -----------------------------------------------------------------------------

# the tar block and type names the Windows code uses, defined once in the tar writer
TYPE_REG = REGTYPE
TYPE_LINK = LNKTYPE
TYPE_SYMLINK = SYMTYPE
TYPE_DIR = DIRTYPE
MODE_DIR = 0o040000
MODE_REG = 0o100000
MODE_SYMLINK = 0o120000
_HEADER_ONLY = (TYPE_LINK, TYPE_SYMLINK, CHRTYPE, BLKTYPE, TYPE_DIR, b"6")


def padding(size: int) -> bytes:
    """Zeros that bring ``size`` bytes of member data to a block boundary."""
    return bytes(-size % BLOCK)


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def _field(text: str, width: int) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    return raw[:width].ljust(width, b"\0")


def _fits(text: str, width: int) -> bool:
    return text.isascii() and len(text) <= width


def _ustar(name: str, typeflag: bytes, size: int, mode: int, mtime: int, linkname: str) -> bytes:
    """One USTAR header block (Go's layout: ``ustar\\0`` magic, version ``00``)."""
    hdr = bytearray(BLOCK)
    hdr[0:100] = _field(name if name.isascii() else name.encode("ascii", "replace").decode(), 100)
    hdr[100:108] = _octal(mode, 8)
    hdr[108:116] = _octal(0, 8)
    hdr[116:124] = _octal(0, 8)
    hdr[124:136] = _octal(size, 12)
    hdr[136:148] = _octal(mtime, 12)
    hdr[148:156] = b" " * 8
    hdr[156:157] = typeflag
    hdr[157:257] = _field(linkname if linkname.isascii() else "", 100)
    hdr[257:265] = b"ustar\x0000"
    hdr[329:337] = _octal(0, 8)
    hdr[337:345] = _octal(0, 8)
    hdr[148:156] = f"{sum(hdr):06o}".encode() + b"\0 "
    return bytes(hdr)


def encode_header(
    name: str,
    typeflag: bytes,
    *,
    size: int = 0,
    mode: int = 0,
    mtime_ns: int = 0,
    linkname: str = "",
    records: Mapping[str, str] | None = None,
) -> bytes:
    """The header blocks of one PAX-format member: an ``x`` extended header (if any
    record is needed) and the USTAR block.

    ``records`` are written as given; ``path``, ``linkpath``, ``size`` and ``mtime`` are
    added when the USTAR fields cannot hold the value exactly.
    """
    pax = dict(records or {})
    if not _fits(name, 100):
        pax["path"] = name
    if linkname and not _fits(linkname, 100):
        pax["linkpath"] = linkname
    if size >= 8**11:
        pax["size"] = str(size)
    secs = mtime_ns // _NS
    if mtime_ns % _NS or not 0 <= secs < 8**11:
        pax.setdefault("mtime", format_pax_time(mtime_ns))
    out = b""
    if pax:
        payload = encode_pax_records(pax)
        head, _, base = name.rstrip("/").rpartition("/")
        pax_name = f"{head}/PaxHeaders.0/{base}" if head else f"PaxHeaders.0/{base}"
        out = _ustar(pax_name, b"x", len(payload), 0, 0, "") + payload + padding(len(payload))
    ustar_mtime = secs if 0 <= secs < 8**11 else 0
    return out + _ustar(name, typeflag, size if size < 8**11 else 0, mode, ustar_mtime, linkname)


def whiteout_header(name: str) -> bytes:
    """A bare deletion marker as hcsshim writes it: only the name is set (Go then writes
    typeflag ``0``, mode/uid/gid/size/mtime zero, USTAR)."""
    if not _fits(name, 100):
        return encode_header(name, TYPE_REG)
    return _ustar(name, TYPE_REG, 0, 0, 0, "")


# -- streaming reader ------------------------------------------------------------------------


@dataclass
class TarEntry:
    """One member, its header parsed and its raw header blocks kept."""

    name: str
    typeflag: bytes
    size: int
    linkname: str
    mode: int
    mtime_ns: int
    pax: dict[str, str] = field(default_factory=dict)
    #: the exact bytes of every header block of this member (PAX, GNU long names, USTAR)
    raw_header: bytes = b""

    def time_ns(self, key: str) -> int | None:
        """A PAX time record (``atime``, ``ctime``, ``LIBARCHIVE.creationtime``) in ns."""
        text = self.pax.get(key)
        if text is None:
            return None
        try:
            return parse_pax_time(text)
        except ValueError:
            raise InvalidArchive(f"{key}={text!r} is not a PAX time", self.name) from None


class TarRecorder(Protocol):
    """Where a reader sends what it reads (:class:`lamina.archive.tar.split.TarSplitWriter`
    fits): raw bytes as segments, each member as name, data size and CRC-64."""

    def segment(self, payload: bytes) -> None: ...

    def file(self, name: bytes, size: int, checksum: bytes | None) -> None: ...


class TarReader:
    """Reads a tar stream member by member, in bounded memory.

    With a ``recorder``, every byte read is accounted for as tar-split does it: raw
    segments (headers, padding, the end-of-archive blocks and whatever follows them),
    and one file record per member. Data copied out with :meth:`copy_data` is recorded
    by size and CRC-64 (it will be read back from the layer); data the caller skips is
    kept in the record as a raw segment, so the tar is rebuilt exactly either way.
    """

    def __init__(self, stream: IO[bytes], recorder: TarRecorder | None = None) -> None:
        self._stream = stream
        self._rec = recorder
        self._pending = bytearray()  # raw bytes not yet handed to the recorder
        self._remaining = 0  # unread data bytes of the current member
        self._pad = 0
        self._current: TarEntry | None = None
        self._filed = False  # whether the current member's file record is written
        self.done = False

    # -- low-level reads ------------------------------------------------------------

    def _read_exact(self, n: int, what: str) -> bytes:
        chunks = []
        left = n
        while left:
            chunk = self._stream.read(left)
            if not chunk:
                entry = self._current.name if self._current else None
                raise InvalidArchive(f"unexpected end of tar stream in {what}", entry)
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _segment(self, raw: bytes) -> None:
        if self._rec is not None:
            self._pending += raw
            if len(self._pending) >= 1 << 20:
                self._flush()

    def _flush(self) -> None:
        if self._rec is not None and self._pending:
            self._rec.segment(bytes(self._pending))
            self._pending.clear()

    def _file(self, size: int, checksum: bytes | None) -> None:
        if self._rec is not None and self._current is not None and not self._filed:
            self._flush()
            self._rec.file(self._current.name.encode("utf-8", "surrogateescape"), size, checksum)
        self._filed = True

    # -- members ----------------------------------------------------------------------

    def next(self) -> TarEntry | None:
        """The next member, skipping whatever of the current one was not read; None at
        the end of the archive."""
        if self.done:
            return None
        self._finish_current()
        raw = bytearray()
        pax: dict[str, str] = {}
        long_name: str | None = None
        long_link: str | None = None
        while True:
            block = self._read_block_or_eof()
            if block is None:
                # a stream that ends at a block boundary: Go's reader reports EOF too
                self.done = True
                if raw:
                    raise InvalidArchive("tar stream ends inside a member's headers")
                self._flush()
                return None
            if block == bytes(BLOCK):
                self._segment(block)
                self._copy_rest()
                self._flush()
                self.done = True
                return None
            raw += block
            hdr = _parse_ustar(block)
            kind = hdr["typeflag"]
            if kind in (b"x", b"g", b"L", b"K"):
                if hdr["size"] > 1 << 20:
                    raise InvalidArchive("extended header larger than 1 MiB", hdr["name"])
                payload = self._read_exact(hdr["size"], "an extended header")
                raw += payload + self._read_exact(-hdr["size"] % BLOCK, "padding")
                if kind == b"x":
                    pax.update(parse_pax_records(payload, hdr["name"]))
                elif kind == b"L":
                    long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
                elif kind == b"K":
                    long_link = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            break
        name = pax.get("path", long_name if long_name is not None else hdr["name"])
        linkname = pax.get("linkpath", long_link if long_link is not None else hdr["linkname"])
        size = hdr["size"]
        if "size" in pax:
            if not pax["size"].isdigit():
                raise InvalidArchive(f"size={pax['size']!r} is not a number", name)
            size = int(pax["size"])
        mtime_ns = hdr["mtime"] * _NS
        if "mtime" in pax:
            try:
                mtime_ns = parse_pax_time(pax["mtime"])
            except ValueError:
                raise InvalidArchive(f"mtime={pax['mtime']!r} is not a PAX time", name) from None
        typeflag = hdr["typeflag"]
        if typeflag == b"\0":
            typeflag = TYPE_DIR if name.endswith("/") else TYPE_REG
        # header-only types carry no data in Go's reader, whatever the size field says
        data_size = 0 if typeflag in _HEADER_ONLY else size
        self._segment(bytes(raw))
        entry = TarEntry(name, typeflag, size, linkname, hdr["mode"], mtime_ns, pax, bytes(raw))
        self._current = entry
        self._filed = False
        self._remaining = data_size
        self._pad = -data_size % BLOCK
        return entry

    @property
    def data_size(self) -> int:
        """Bytes of data the current member has left to read."""
        return self._remaining

    def copy_data(self, write: Callable[[bytes], object]) -> int:
        """Copy the current member's data to ``write``, recording it as content the
        layer will serve back. Returns the byte count."""
        crc = Crc64()
        total = 0
        while self._remaining:
            chunk = self._stream.read(min(self._remaining, 1 << 20))
            if not chunk:
                raise InvalidArchive("unexpected end of tar stream in file data",
                                     self._current.name if self._current else None)
            self._remaining -= len(chunk)
            total += len(chunk)
            crc.update(chunk)
            write(chunk)
        self._file(total, crc.digest() if total else None)
        return total

    def _finish_current(self) -> None:
        if self._current is None:
            return
        self._file(0, None)
        while self._remaining:
            chunk = self._read_exact(min(self._remaining, 1 << 20), "file data")
            self._remaining -= len(chunk)
            self._segment(chunk)
        if self._pad:
            self._segment(self._read_exact(self._pad, "padding"))
            self._pad = 0
        self._current = None

    def _read_block_or_eof(self) -> bytes | None:
        first = self._stream.read(BLOCK)
        if not first:
            return None
        if len(first) < BLOCK:
            first += self._read_exact(BLOCK - len(first), "a header")
        return first

    def _copy_rest(self) -> None:
        """Everything after the first zero block goes into the record as it is."""
        while True:
            chunk = self._stream.read(1 << 20)
            if not chunk:
                return
            self._segment(chunk)


def _number(raw: bytes, what: str) -> int:
    if raw and raw[0] & 0x80:  # base-256 (GNU) for values that overflow octal
        value = int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
        return value - (1 << (8 * len(raw) - 1)) if raw[0] & 0x40 else value
    text = raw.replace(b"\0", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise InvalidArchive(f"invalid number in tar header field {what}: {raw!r}") from None


def _parse_ustar(block: bytes) -> dict:  # type: ignore[type-arg]
    stored = _number(block[148:156], "chksum")
    unsigned = sum(block[:148]) + 256 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if stored not in (unsigned, signed):
        raise InvalidArchive("tar header checksum mismatch (not a tar stream?)", name or None)
    if block[257:263] == b"ustar\0":
        prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if prefix:
            name = prefix + "/" + name
    return {
        "name": name,
        "mode": _number(block[100:108], "mode"),
        "size": _number(block[124:136], "size"),
        "mtime": _number(block[136:148], "mtime"),
        "typeflag": block[156:157],
        "linkname": block[157:257].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
    }
