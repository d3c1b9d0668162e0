"""Which name an entry has when its headers give several, and what its PAX records set.

A tar entry's name can come from four places: the header's name field (with the ustar
prefix in front), a PAX ``path`` record, a GNU long-name (``L``) header, and for the link
name the header's field, PAX ``linkpath`` and a GNU ``K`` header. Tar readers do not
agree on which wins. Go's ``archive/tar``, which Docker and containerd apply layers
with, takes the header, then PAX, then GNU on top, ignores an empty value, keeps only
the last of repeated ``L``/``K``/``x`` headers, and applies a global ``g`` header to
nothing. Python's tarfile and libarchive let PAX win over GNU, take the first of
repeated headers, take an empty value as the name, and carry global records into the
entries after them.

lamina reads an entry Go's way where the sources agree, and refuses it where they do
not: a DiffID covers bytes, not meanings, so a tar whose entry is one file to Docker
and another to a scanner that reads it differently must not become a layer. No real
writer disagrees with itself, so nothing legitimate is lost; and since tar-split keeps
the raw headers, an accepted tar still comes back byte for byte.
"""

from __future__ import annotations

from lamina.archive.tar import pax as paxrec
from lamina.archive.tar.entry import TarEntry
from lamina.archive.tar.format import MAX_ENTRY_SIZE
from lamina.errors import InvalidArchive

#: records a PAX global header may not carry: readers differ on whether they apply to the
#: entries after it (Go: no; GNU tar and Python's tarfile: yes), and these change which
#: file an entry is or where the next header starts
_GLOBAL_REFUSED = ("path", "linkpath", "size")


def decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def cut(name: bytes) -> str:
    """A name quoted for an error message, cut to stay readable."""
    text = decode(name)
    return repr(text) if len(text) <= 60 else repr(text[:57] + "...")


def shown(value: bytes) -> str:
    """A record value for an error message: cut, so a 100,000-digit number stays one line."""
    return repr(value) if len(value) <= 40 else f"{value[:40]!r}... ({len(value)} bytes)"


class Overrides:
    """The meta headers read before one entry: its PAX records and GNU long names."""

    __slots__ = ("pax", "error", "long_name", "long_link")

    def __init__(self) -> None:
        self.pax: dict[str, bytes] | None = None
        #: a malformed or conflicting PAX header, raised once the entry is named
        self.error: InvalidArchive | None = None
        self.long_name: bytes | None = None
        self.long_link: bytes | None = None

    def gnu(self, link: bool, data: bytes) -> None:
        """An ``L`` (``link`` False) or ``K`` header's data; a different second one is
        refused (Go takes the last, tarfile the first)."""
        data = data.partition(b"\0")[0]
        old = self.long_link if link else self.long_name
        if old is not None and old != data:
            raise InvalidArchive(f"two different GNU long {'link names' if link else 'names'} for one "
                                 f"entry ({cut(old)}, {cut(data)}): tar readers differ on which one "
                                 "wins", decode(data))
        if link:
            self.long_link = data
        else:
            self.long_name = data

    def local(self, data: bytes, header: str) -> None:
        """An ``x`` header's data. A malformed or a second, different one is refused when
        the entry it is for is read, so the error can name it."""
        try:
            records = paxrec.parse_records(data, header)
        except InvalidArchive as exc:
            self.error = exc
            return
        if self.pax is not None and self.pax != records and self.error is None:
            self.error = InvalidArchive("two different PAX headers for one entry: tar readers "
                                        "differ on which one wins")
        self.pax = records

    def global_(self, data: bytes, header: str) -> bool:
        """A ``g`` header's data; True if it is whole (the reader hands it out as an
        entry of its own, as Go does). Refused when meta headers wait for an entry
        (Go drops them) or when it sets a name or a size."""
        try:
            records = paxrec.parse_records(data, header)
        except InvalidArchive as exc:
            self.error = exc
            return False
        if self.pax is not None or self.long_name is not None or self.long_link is not None:
            raise InvalidArchive("a PAX global header between an entry's meta headers and the "
                                 "entry: tar readers differ on what they apply to", header)
        for key in _GLOBAL_REFUSED:
            if key in records:
                raise InvalidArchive(f"a PAX global header sets {key}: tar readers differ on "
                                     "whether it applies to later entries", header)
        self.pax = records
        return True

    def fold(self, name: bytes, linkname: bytes) -> tuple[bytes, bytes, dict[str, bytes] | None]:
        """The entry's name and link name after these headers, and its PAX records."""
        pax = self.pax
        if self.error is not None:
            error = self.error
            message = str(error) if error.entry is None else str(error)[len(error.entry) + 2:]
            raise InvalidArchive(message, self._shown_name(name))
        path = link = None
        if pax is not None:
            path = pax.get("path")
            link = pax.get("linkpath")
            if (path is not None and (not path or b"\0" in path)) or (
                    link is not None and (not link or b"\0" in link)) or pax.get("size") == b"":
                self._refuse(name, path, link)
        long_name = self.long_name
        long_link = self.long_link
        if long_name is not None:
            if not long_name or (path is not None and path != long_name):
                self._refuse(name, path, link)
            path = long_name
        if long_link is not None:
            if not long_link or (link is not None and link != long_link):
                self._refuse(name, path, link)
            link = long_link
        return path or name, link or linkname, pax

    def _shown_name(self, name: bytes) -> str:
        return decode(self.long_name or (self.pax or {}).get("path") or name)

    def _refuse(self, name: bytes, path: bytes | None, link: bytes | None) -> None:
        """Say which override of :meth:`fold` is refused."""
        entry = self._shown_name(name)
        for key, value in (("path", path), ("linkpath", link)):
            if value is not None and (not value or b"\0" in value):
                why = "is empty" if not value else "holds a NUL byte"
                raise InvalidArchive(f"PAX {key} record {why}", entry)
        if self.pax is not None and self.pax.get("size") == b"":
            raise InvalidArchive("PAX size record is empty", entry)
        for kind, gnu, value in (("name", self.long_name, path), ("link name", self.long_link, link)):
            if gnu is None:
                continue
            if not gnu:
                raise InvalidArchive(f"GNU long {kind} is empty", entry)
            if value is not None and value != gnu:
                raise InvalidArchive(f"GNU long {kind} {cut(gnu)} and PAX record {cut(value)} "
                                     "disagree: tar readers differ on which one wins", entry)
        raise AssertionError("no refused override found")  # pragma: no cover


def apply_pax(e: TarEntry, pax: dict[str, bytes]) -> None:
    """Set what an entry's PAX records say: xattrs, size, owner, times, owner names;
    refuse GNU sparse records. (Names are :meth:`Overrides.fold`'s.)"""
    name = e.name
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            attr = key[13:]
            if attr:
                if e.xattrs is None:
                    e.xattrs = {}
                e.xattrs[attr] = value
        elif key == "size":
            if value.isdigit() and len(value) > 19:  # past 64 bits: say what it is
                raise InvalidArchive(f"absurd size {shown(value)}", name)
            size = _number(value, key, name)
            if not 0 <= size <= MAX_ENTRY_SIZE:
                raise InvalidArchive(f"absurd size {size}", name)
            e.size = size
        elif key == "uid":
            e.uid = _number(value, key, name)
        elif key == "gid":
            e.gid = _number(value, key, name)
        elif key == "mtime" or key == "atime":
            try:
                ns = paxrec.parse_time(value)
            except ValueError:
                raise InvalidArchive(f"bad PAX {key} record {shown(value)}", name) from None
            if key == "mtime":
                e.mtime_ns = ns
            else:
                e.atime_ns = ns
        elif key == "uname":
            e.uname = decode(value)
        elif key == "gname":
            e.gname = decode(value)
        elif key.startswith("GNU.sparse."):
            raise InvalidArchive("GNU sparse files are not supported", name)


def _number(value: bytes, key: str, name: str) -> int:
    try:
        return paxrec.parse_int(value)
    except ValueError:
        raise InvalidArchive(f"bad PAX {key} record {shown(value)}", name) from None
