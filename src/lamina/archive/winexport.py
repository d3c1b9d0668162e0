"""The Windows layer tar encoder: a layer's files and recorded metadata as the tar
hcsshim's exporter writes.

Why here and not in the driver: it is format, not storage. The driver knows where a
layer keeps its files, its deletions (overlay whiteouts) and each file's Windows records
(an xattr, :mod:`lamina.drivers.windowsfilter_meta`); it walks them and hands this module
:class:`ExportItem` objects and a way to read the records. What goes into the tar (PAX
headers with backuptar's records, defaults for files written from Linux, bare whiteouts,
hard links to the first name of an inode, alternate data streams after their file) is
decided here, beside the codec that writes it.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lamina.archive import winsd, wintar
from lamina.archive.tar.format import DIRTYPE, END_OF_ARCHIVE, LNKTYPE, REGTYPE, SYMTYPE, padding
from lamina.archive.tar.pax import format_time
from lamina.archive.wintar import FileAttr, linux_link_target, windows_link_target
from lamina.errors import StoreCorrupt

log = logging.getLogger(__name__)

#: the PAX key a symlink's Windows target is recorded under
LINKPATH = "linkpath"
#: a file's recorded PAX records, by path
MetaReader = Callable[[Path], dict[str, str]]

_DEFAULT_FILE_SD = winsd.sddl_to_bytes(winsd.DEFAULT_FILE_SDDL)
_DEFAULT_DIR_SD = winsd.sddl_to_bytes(winsd.DEFAULT_DIR_SDDL)


def default_security_descriptor(is_dir: bool) -> bytes:
    """The descriptor an export gives a file that has none recorded (written from Linux)."""
    return _DEFAULT_DIR_SD if is_dir else _DEFAULT_FILE_SD


@dataclass
class ExportItem:
    """One entry of a layer's export: a tar name, the file on disk (None for a
    deletion or a folder the layer does not have), and its alternate data streams."""

    name: str
    path: Path | None
    deleted: bool = False
    streams: list[tuple[str, Path]] = field(default_factory=list)


def write_tar(items: Iterable[ExportItem], read_meta: MetaReader) -> Iterator[bytes]:
    """A Windows diff layer tar from export items, as hcsshim's exporter writes one:
    PAX headers with backuptar's records on every entry, recorded metadata where the
    file has it and defaults where it was written from Linux, bare whiteouts for
    deletions, later names of a hard-linked file as links to the first.

    ``read_meta`` gives a file's recorded PAX records (its ``MSWINDOWS.*`` and
    ``LIBARCHIVE.*`` records as the tar gave them, ``linkpath`` for a symlink); it is empty
    for a file written from Linux.
    """
    links: dict[tuple[int, int], str] = {}
    files_times: tuple[int, int, int] | None = None
    for item in items:
        if item.deleted:
            head, _, base = item.name.rpartition("/")
            yield wintar.whiteout_header(f"{head}/{wintar.WHITEOUT_PREFIX}{base}")
            continue
        if item.path is None:
            # a top folder the layer does not have (a sandbox's Hives)
            times = files_times or (0, 0, 0)
            yield _header(item.name, DIRTYPE, FileAttr.DIRECTORY, {}, times, size=0)
            continue
        st = item.path.lstat()
        times = (st.st_mtime_ns, st.st_atime_ns, st.st_ctime_ns)
        if item.name == wintar.FILES:
            files_times = times
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            first = links.setdefault((st.st_dev, st.st_ino), item.name)
            if first != item.name:
                meta = read_meta(item.path)
                attrs = windows_attributes(meta, st)
                records = {wintar.FILEATTR: str(attrs), wintar.CREATIONTIME: _creation(meta, times)}
                yield wintar.encode_header(item.name, LNKTYPE, mode=0o644, mtime_ns=times[0],
                                           linkname=first, records={**records, **_time_records(times)})
                continue
        yield from _file_entry(item, st, times, read_meta(item.path))
    yield END_OF_ARCHIVE


def windows_attributes(meta: dict[str, str], st: os.stat_result) -> int:
    """Recorded attributes, kept consistent with what the file is now; defaults for a
    file written from Linux (directory 0x10, file 0x20, symlink adds 0x400)."""
    recorded = meta.get(wintar.FILEATTR)
    if recorded is not None and recorded.isdigit():
        attrs = int(recorded)
    elif stat.S_ISDIR(st.st_mode):
        attrs = FileAttr.DIRECTORY
    else:
        attrs = FileAttr.ARCHIVE
    if stat.S_ISDIR(st.st_mode):
        attrs = (attrs | FileAttr.DIRECTORY) & ~FileAttr.REPARSE_POINT
    elif stat.S_ISLNK(st.st_mode):
        attrs |= FileAttr.REPARSE_POINT
    else:
        attrs &= ~(FileAttr.DIRECTORY | FileAttr.REPARSE_POINT)
    return int(attrs)


def _creation(meta: dict[str, str], times: tuple[int, int, int]) -> str:
    return meta.get(wintar.CREATIONTIME) or format_time(times[0])


def _time_records(times: tuple[int, int, int]) -> dict[str, str]:
    """``atime``/``ctime`` as the file has them now (Go always writes both)."""
    return {"atime": format_time(times[1]), "ctime": format_time(times[2])}


def _header(name: str, typeflag: bytes, attrs: int, meta: dict[str, str],
            times: tuple[int, int, int], *, size: int, linkname: str = "", mode: int | None = None) -> bytes:
    records = {k: v for k, v in meta.items() if k.startswith(wintar.WINDOWS_RECORD_PREFIXES)}
    records[wintar.FILEATTR] = str(attrs)
    records[wintar.CREATIONTIME] = _creation(meta, times)
    if wintar.RAWSD not in records and wintar.SDDL not in records:
        sd = default_security_descriptor(bool(attrs & FileAttr.DIRECTORY))
        records[wintar.RAWSD] = base64.b64encode(sd).decode()
    records.update(_time_records(times))
    if mode is None:
        mode = wintar.MODE_DIR if typeflag == DIRTYPE else wintar.MODE_REG
    return wintar.encode_header(name, typeflag, size=size, mode=mode, mtime_ns=times[0],
                                linkname=linkname, records=records)


def _file_entry(item: ExportItem, st: os.stat_result, times: tuple[int, int, int],
                meta: dict[str, str]) -> Iterator[bytes]:
    assert item.path is not None
    attrs = windows_attributes(meta, st)
    if stat.S_ISDIR(st.st_mode):
        yield _header(item.name, DIRTYPE, attrs, meta, times, size=0)
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(item.path)
        recorded = meta.get(LINKPATH)
        linkname = recorded if recorded is not None and linux_link_target(recorded) == target else windows_link_target(target)
        mode = wintar.MODE_SYMLINK | (wintar.MODE_DIR if attrs & FileAttr.DIRECTORY else 0)
        yield _header(item.name, SYMTYPE, attrs, meta, times, size=0, linkname=linkname, mode=mode)
    elif stat.S_ISREG(st.st_mode):
        yield _header(item.name, REGTYPE, attrs, meta, times, size=st.st_size)
        yield from _file_data(item.path, st.st_size, item.name)
    else:
        log.warning("%s: a %s has no Windows form; left out of the export", item.name, stat.filemode(st.st_mode)[0])
        return
    for stream, path in item.streams:
        size = path.lstat().st_size
        mode = wintar.MODE_DIR if stat.S_ISDIR(st.st_mode) else wintar.MODE_REG
        yield wintar.encode_header(f"{item.name}:{stream}", REGTYPE, size=size, mode=mode,
                                   mtime_ns=times[0], records=_time_records(times))
        yield from _file_data(path, size, f"{item.name}:{stream}")


def _file_data(path: Path, size: int, name: str) -> Iterator[bytes]:
    left = size
    with open(path, "rb", buffering=0) as f:
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise StoreCorrupt(f"{name} shrank while it was exported")
            left -= len(chunk)
            yield chunk
    yield padding(size)
