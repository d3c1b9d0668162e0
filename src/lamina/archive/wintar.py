"""The Windows layer tar format: what go-winio's backuptar and hcsshim put in a tar.

Windows semantics only; the tar itself is read and written by the one codec
(:mod:`lamina.archive.tar`). What lives here:

* the names and values of a Windows layer tar (``Files/`` ``Hives/`` ``UtilityVM/``
  prefixes, ``MSWINDOWS.*`` / ``LIBARCHIVE.*`` records, attribute bits, the files a
  utility VM import mutates);
* FILETIME arithmetic, done with integers, because a float cannot hold Windows' 100 ns
  steps at today's dates (PAX time strings are the codec's: :mod:`lamina.archive.tar.pax`);
* names as Windows reads them (``\\`` separates too, case-blind prefixes, ``file:stream``),
  and link targets between the Windows and the Linux form;
* a header encoder that writes what go-winio's ``BasicInfoHeader`` writes (PAX format,
  mode with the file-type bits and no permission bits, records sorted by key), which
  ``tarfile`` cannot (it masks the mode to ``0o7777``).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntFlag

from lamina.archive.tar import pax as paxrec
from lamina.archive.tar import writer as tw
from lamina.archive.tar.format import NAME_SIZE, REGTYPE, XHDTYPE, padding
from lamina.archive.tar.reader import TarEntry
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


def windows_records(pax: Mapping[str, bytes] | None) -> dict[str, str]:
    """The ``MSWINDOWS.*`` and ``LIBARCHIVE.*`` records of an entry, as given (as text)."""
    if not pax:
        return {}
    return {k: paxrec.decode_text(v) for k, v in pax.items() if k.startswith(WINDOWS_RECORD_PREFIXES)}


def text_record(entry: TarEntry, key: str) -> str | None:
    """One PAX record of an entry as text, None if the entry has none."""
    value = entry.pax.get(key) if entry.pax else None
    return None if value is None else paxrec.decode_text(value)


def time_record(entry: TarEntry, key: str) -> int | None:
    """A PAX time record (``atime``, ``ctime``, ``LIBARCHIVE.creationtime``) in ns."""
    value = entry.pax.get(key) if entry.pax else None
    if value is None:
        return None
    try:
        return paxrec.parse_time(value)
    except ValueError:
        raise InvalidArchive(f"{key}={paxrec.decode_text(value)!r} is not a PAX time", entry.name) from None


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


# -- link targets --------------------------------------------------------------------------


def linux_link_target(target: str) -> str:
    """A Windows link target as a Linux symlink target that resolves inside the view:
    ``C:\\a\\b`` (also ``\\??\\C:``/``\\\\?\\C:`` forms) becomes ``/a/b``, relative
    ``..\\a`` becomes ``../a``; other drives and UNC paths keep their text."""
    for prefix in ("\\??\\", "\\\\?\\"):
        if target.startswith(prefix):
            target = target[len(prefix):]
            break
    if len(target) >= 2 and target[1] == ":":
        if target[0] in "cC":
            return "/" + target[2:].replace("\\", "/").lstrip("/")
        return target
    if target.startswith("\\\\"):
        return target
    return target.replace("\\", "/")


def windows_link_target(target: str) -> str:
    """The Windows form of a Linux symlink target: ``/a/b`` -> ``C:\\a\\b``."""
    if target.startswith("/"):
        return "C:" + target.replace("/", "\\")
    return target.replace("/", "\\")


# -- header encode ------------------------------------------------------------------------

#: the mode go-winio writes: the file-type bits, no permission bits
MODE_DIR = 0o040000
MODE_REG = 0o100000
MODE_SYMLINK = 0o120000
_BIG = 8**11  # the first value a 12-byte octal field cannot hold


def _fits(text: str, width: int) -> bool:
    return text.isascii() and len(text) <= width


def _ustar(name: str, typeflag: bytes, size: int, mode: int, mtime: int, linkname: str) -> bytes:
    """One ustar block as go-winio's writer leaves it: uid, gid and devices 0, names cut
    to their field (a non-ASCII name as ``?`` marks, a non-ASCII link name left out:
    the PAX records carry both)."""
    field = name if name.isascii() else name.encode("ascii", "replace").decode()
    link = linkname if linkname.isascii() else ""
    return tw.ustar_block(field.encode()[:NAME_SIZE], mode, 0, 0, size, mtime, typeflag,
                          link.encode()[:NAME_SIZE])


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
    if not _fits(name, NAME_SIZE):
        pax["path"] = name
    if linkname and not _fits(linkname, NAME_SIZE):
        pax["linkpath"] = linkname
    if size >= _BIG:
        pax["size"] = str(size)
    secs = mtime_ns // _NS
    if mtime_ns % _NS or not 0 <= secs < _BIG:
        pax.setdefault("mtime", paxrec.format_time(mtime_ns))
    out = b""
    if pax:
        payload = paxrec.encode_text_records(pax)
        head, _, base = name.rstrip("/").rpartition("/")
        pax_name = f"{head}/PaxHeaders.0/{base}" if head else f"PaxHeaders.0/{base}"
        out = _ustar(pax_name, XHDTYPE, len(payload), 0, 0, "") + payload + padding(len(payload))
    ustar_mtime = secs if 0 <= secs < _BIG else 0
    return out + _ustar(name, typeflag, size if size < _BIG else 0, mode, ustar_mtime, linkname)


def whiteout_header(name: str) -> bytes:
    """A bare deletion marker as hcsshim writes it: only the name is set (Go then writes
    typeflag ``0``, mode/uid/gid/size/mtime zero, USTAR)."""
    if not _fits(name, NAME_SIZE):
        return encode_header(name, REGTYPE)
    return _ustar(name, REGTYPE, 0, 0, 0, "")
