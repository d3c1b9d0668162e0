"""An independent writer and checker of Windows layer tars, for the tests only.

Independent on purpose: it uses Python's ``tarfile`` and ``struct`` and nothing of
lamina, and follows the reference note's checklist (windows-layer-format.md §6) rather
than lamina's exporter, so a test that imports one of these tars and compares checks
lamina against the format, not against itself.

Checklist points this writer follows: PAX format; ``Files`` and ``Hives`` directory
entries first; parents before children; per entry ``MSWINDOWS.fileattr`` (decimal, 0x10
on directories, 0x20 on files, 0x400 on reparse points), ``LIBARCHIVE.creationtime``,
``mtime``/``atime``/``ctime`` as exact PAX time strings, ``MSWINDOWS.rawsd`` (base64 of a
self-relative descriptor packed here by hand); symlinks as typeflag 2 with the Windows
target, ``MSWINDOWS.mountpoint=1`` for junctions; hard links with the full ``Files/...``
target; deletions as ``dir/.wh.name``; alternate data streams as ``file:stream``
entries right after their file; registry changes as ``Hives/<Name>_Delta``.
"""

from __future__ import annotations

import base64
import io
import struct
import tarfile
from dataclasses import dataclass, field

FILE_ATTRIBUTE_READONLY = 0x1
FILE_ATTRIBUTE_HIDDEN = 0x2
FILE_ATTRIBUTE_SYSTEM = 0x4
FILE_ATTRIBUTE_DIRECTORY = 0x10
FILE_ATTRIBUTE_ARCHIVE = 0x20
FILE_ATTRIBUTE_REPARSE_POINT = 0x400


def sid(text: str) -> bytes:
    """Binary SID for ``S-1-<auth>-<sub>...``."""
    parts = text.split("-")
    subs = [int(p) for p in parts[3:]]
    return bytes([1, len(subs)]) + int(parts[2]).to_bytes(6, "big") + struct.pack(f"<{len(subs)}I", *subs)


def security_descriptor(owner: str, group: str, aces: list[tuple[int, int, int, str]] | None) -> bytes:
    """A self-relative descriptor: header, owner, group, then the DACL (if ``aces`` is
    not None); each ACE is (type, flags, mask, sid)."""
    o, g = sid(owner), sid(group)
    dacl = b""
    if aces is not None:
        body = b""
        for ace_type, flags, mask, who in aces:
            s = sid(who)
            body += struct.pack("<BBHI", ace_type, flags, 8 + len(s), mask) + s
        dacl = struct.pack("<BBHHH", 2, 0, 8 + len(body), len(aces), 0) + body
    control = 0x8000 | (0x0004 if aces is not None else 0)
    off_owner = 20
    off_group = off_owner + len(o)
    off_dacl = off_group + len(g) if aces is not None else 0
    return struct.pack("<BBHIIII", 1, 0, control, off_owner, off_group, 0, off_dacl) + o + g + dacl


BA, SY, BU = "S-1-5-32-544", "S-1-5-18", "S-1-5-32-545"
TRUSTED_INSTALLER = "S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464"
#: what a real Windows base image puts on system files: TrustedInstaller owns, full
#: control for it, Administrators and SYSTEM read+execute, Users read+execute
SYSTEM_FILE_SD = security_descriptor(TRUSTED_INSTALLER, TRUSTED_INSTALLER, [
    (0, 0, 0x001F01FF, TRUSTED_INSTALLER), (0, 0, 0x001200A9, BA), (0, 0, 0x001200A9, SY),
    (0, 0, 0x001200A9, BU),
])
DIR_SD = security_descriptor(BA, SY, [
    (0, 0x03, 0x001F01FF, BA), (0, 0x03, 0x001F01FF, SY), (0, 0x03, 0x001200A9, BU),
])
#: the ko / crane value quoted in the reference note (O:BUG:BU, no DACL)
KO_SD = base64.b64decode("AQAAgBQAAAAkAAAAAAAAAAAAAAABAgAAAAAABSAAAAAhAgAAAQIAAAAAAAUgAAAAIQIAAA==")


def pax_time(sec: int, nsec: int = 0) -> str:
    return str(sec) if nsec == 0 else f"{sec}.{nsec:09d}".rstrip("0")


@dataclass
class Meta:
    """One entry's Windows metadata, as records."""

    attrs: int
    sd: bytes | None = None
    mtime: tuple[int, int] = (1700000000, 123456700)
    atime: tuple[int, int] = (1700000100, 0)
    ctime: tuple[int, int] = (1700000200, 500)
    creation: tuple[int, int] = (1600000000, 100)
    eas: dict[str, bytes] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    def records(self) -> dict[str, str]:
        rec = {
            "MSWINDOWS.fileattr": str(self.attrs),
            "LIBARCHIVE.creationtime": pax_time(*self.creation),
            "mtime": pax_time(*self.mtime),
            "atime": pax_time(*self.atime),
            "ctime": pax_time(*self.ctime),
        }
        if self.sd is not None:
            rec["MSWINDOWS.rawsd"] = base64.b64encode(self.sd).decode()
        for name, value in self.eas.items():
            rec[f"MSWINDOWS.xattr.{name}"] = base64.b64encode(value).decode()
        rec.update(self.extra)
        return rec


class LayerTar:
    """Builds a layer tar entry by entry; :meth:`bytes` gives the tar."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)

    @classmethod
    def diff_layer(cls) -> LayerTar:
        """A layer with parents starts with its ``Files`` and ``Hives`` entries."""
        t = cls()
        t.dir("Files")
        t.dir("Hives")
        return t

    @classmethod
    def base_layer(cls, *, hives: bool = True) -> LayerTar:
        """A base layer with the folders down to the registry hives, and the hives."""
        t = cls()
        for d in ("Files", "Files/Windows", "Files/Windows/System32", "Files/Windows/System32/config"):
            t.dir(d, meta=Meta(FILE_ATTRIBUTE_DIRECTORY, sd=DIR_SD))
        if hives:
            for h in ("DEFAULT", "SAM", "SECURITY", "SOFTWARE", "SYSTEM"):
                t.file(f"Files/Windows/System32/config/{h}", b"regf" + h.encode() * 10,
                       meta=Meta(FILE_ATTRIBUTE_ARCHIVE, sd=SYSTEM_FILE_SD))
        return t

    def _add(self, info: tarfile.TarInfo, meta: Meta | None, data: bytes | None = None) -> None:
        if meta is not None:
            info.pax_headers = meta.records()
            info.mtime = meta.mtime[0]
        self._tar.addfile(info, io.BytesIO(data) if data is not None else None)

    def dir(self, name: str, meta: Meta | None = None) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        self._add(info, meta or Meta(FILE_ATTRIBUTE_DIRECTORY, sd=DIR_SD))

    def file(self, name: str, data: bytes, meta: Meta | None = None,
             streams: dict[str, bytes] | None = None) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        meta = meta or Meta(FILE_ATTRIBUTE_ARCHIVE, sd=SYSTEM_FILE_SD)
        self._add(info, meta, data)
        for stream, content in (streams or {}).items():
            ads = tarfile.TarInfo(f"{name}:{stream}")
            ads.size = len(content)
            ads.mtime = meta.mtime[0]
            self._tar.addfile(ads, io.BytesIO(content))

    def symlink(self, name: str, target: str, *, junction: bool = False, is_dir: bool = False,
                meta: Meta | None = None) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        attrs = FILE_ATTRIBUTE_REPARSE_POINT | (FILE_ATTRIBUTE_DIRECTORY if is_dir or junction else FILE_ATTRIBUTE_ARCHIVE)
        meta = meta or Meta(attrs, sd=DIR_SD)
        if junction:
            meta.extra["MSWINDOWS.mountpoint"] = "1"
        self._add(info, meta)

    def hardlink(self, name: str, target: str) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.LNKTYPE
        info.linkname = target
        info.mode = 0o644
        self._add(info, Meta(FILE_ATTRIBUTE_ARCHIVE))

    def whiteout(self, name: str) -> None:
        head, _, base = name.rpartition("/")
        info = tarfile.TarInfo(f"{head}/.wh.{base}")
        self._tar.addfile(info)

    def raw(self, info: tarfile.TarInfo, data: bytes | None = None) -> None:
        self._tar.addfile(info, io.BytesIO(data) if data is not None else None)

    def bytes(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def decode_sd(raw: bytes) -> tuple[str | None, str | None, list[tuple[int, int, int, str]] | None]:
    """(owner, group, DACL ACEs) of a self-relative descriptor, parsed with struct."""
    _, _, control, o_owner, o_group, _, o_dacl = struct.unpack_from("<BBHIIII", raw)

    def read_sid(off: int) -> str:
        count = raw[off + 1]
        auth = int.from_bytes(raw[off + 2 : off + 8], "big")
        subs = struct.unpack_from(f"<{count}I", raw, off + 8)
        return "S-1-" + "-".join(map(str, [auth, *subs]))

    aces = None
    if control & 0x0004 and o_dacl:
        _, _, _, count, _ = struct.unpack_from("<BBHHH", raw, o_dacl)
        aces = []
        pos = o_dacl + 8
        for _ in range(count):
            ace_type, flags, size, mask = struct.unpack_from("<BBHI", raw, pos)
            aces.append((ace_type, flags, mask, read_sid(pos + 8)))
            pos += size
    return (read_sid(o_owner) if o_owner else None, read_sid(o_group) if o_group else None, aces)


# -- checking a tar against hcsshim's importer ------------------------------------------------


def hcs_check(data: bytes) -> list[tarfile.TarInfo]:
    """Check a diff layer tar as hcsshim's ``ImportLayerFromTar`` would take it, and
    return its members. AssertionError names the first broken rule.

    Rules (pkg/ociwclayer/import.go, internal/wclayer/legacy.go, backuptar
    FileInfoFromHeader, and the note's checklist): PAX format with the backuptar records
    on every entry that is not a deletion; ``Files`` then ``Hives`` first; every parent
    directory before its children; directories carry 0x10 and files do not; deletions
    only under ``Files/`` or ``UtilityVM/Files/``; hard links inside ``Files/`` to an
    earlier entry; a ``name:stream`` entry right after its file.
    """
    tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["Files", "Hives"], [m.name for m in members[:2]]
    assert all(m.isdir() for m in members[:2])
    dirs: set[str] = set()
    seen: set[str] = set()
    previous: tarfile.TarInfo | None = None
    for m in members:
        name = m.name.rstrip("/")
        head, _, base = name.rpartition("/")
        if head:
            assert head in dirs, f"{name}: parent {head} not listed before it"
        if base.startswith(".wh."):
            assert name.startswith(("Files/", "UtilityVM/Files/")), f"{name}: invalid tombstone"
            previous = m
            continue
        if ":" in base:
            assert previous is not None and previous.name == name.split(":", 1)[0], f"{name}: stream not after its file"
            assert m.isreg()
            seen.add(name)
            continue  # more streams of the same file may follow
        rec = m.pax_headers
        for key in ("MSWINDOWS.fileattr", "LIBARCHIVE.creationtime", "atime", "ctime"):
            assert key in rec, f"{name}: record {key} missing"
        attrs = int(rec["MSWINDOWS.fileattr"])
        if m.isdir():
            assert attrs & FILE_ATTRIBUTE_DIRECTORY, f"{name}: directory without 0x10"
            dirs.add(name)
        elif m.isreg():
            assert not attrs & FILE_ATTRIBUTE_DIRECTORY, f"{name}: file with 0x10"
        elif m.issym():
            assert attrs & FILE_ATTRIBUTE_REPARSE_POINT, f"{name}: symlink without 0x400"
        elif m.islnk():
            assert name.startswith("Files/") and m.linkname.startswith("Files/"), f"{name}: invalid hard link in layer"
            assert m.linkname in seen, f"{name}: link target {m.linkname} not earlier in the tar"
        else:
            raise AssertionError(f"{name}: typeflag {m.type!r} has no Windows meaning")
        if not m.islnk():
            sd = base64.b64decode(rec["MSWINDOWS.rawsd"], validate=True)
            assert sd[0] == 1 and struct.unpack_from("<H", sd, 2)[0] & 0x8000, f"{name}: not a self-relative SD"
        assert name.split("/")[0] in ("Files", "Hives", "UtilityVM"), f"{name}: outside the layer folders"
        seen.add(name)
        previous = m
    return members
