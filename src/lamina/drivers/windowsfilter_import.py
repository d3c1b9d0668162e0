"""Import a Windows layer tar into a windowsfilter layer folder, in its own process.

Run as ``python -m lamina.drivers.windowsfilter_import HOME ID [PARENT_PATH...]`` with
the tar on stdin; prints the size imported (sum of the tar's regular-file sizes,
alternate data streams not counted) on stdout, or one JSON line describing the error
on stderr and exits 1. Why a child process: the seed runs its import as a re-exec'd
``docker-windows-write-layer`` so that a crash or a privilege change in the import
cannot take the daemon down with it; lamina keeps that shape (and
``LAMINA_WINDOWSFILTER_NOREEXEC=1`` imports in-process, for debugging, as the seed's
``DOCKER_WINDOWSFILTER_NOREEXEC`` does).

What the import does, following hcsshim's layer writers (legacy.go for layers with
parents, baselayerwriter.go for base layers):

* every entry lands in a staging folder inside the layer folder; only a complete
  import is renamed into place, so a failed one leaves the layer as empty as before;
* each file keeps every ``MSWINDOWS.*`` / ``LIBARCHIVE.*`` record in an xattr, so the
  metadata follows the file through overlayfs copy-up
  (:mod:`lamina.drivers.windowsfilter_meta`);
* parents must come before children; names compare case-blind, as on NTFS;
* ``name:stream`` entries following their file are its alternate data streams, kept as
  sibling files named the same way;
* ``.wh.`` entries under ``Files/`` become overlay whiteouts (0/0 character devices),
  under ``UtilityVM/Files/`` they delete from the cloned utility VM at once;
* hard links may point at earlier entries or, for ``Files/``, into the parent layers;
* the first ``UtilityVM`` entry of a diff layer clones the parent's utility VM with
  hard links (the BCD files copied), as Server 2016 has one UVM per layer;
* the four BCD files are also saved as ``bcd*.bak`` (they are what a UVM import
  mutates), and the tar record keeps the raw headers for a byte-exact export.
"""

from __future__ import annotations

import base64
import binascii
import errno
import gzip
import json
import os
import shutil
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from lamina.archive import winsd, wintar
from lamina.archive.tar.format import DIR, GLOBAL, LNK, REG, SYM
from lamina.archive.tar.reader import TarEntry
from lamina.archive.tar.split import RecordingReader
from lamina.archive.wintar import FileAttr, linux_link_target, text_record, time_record
from lamina.drivers.windowsfilter_meta import ATIME, CTIME, LINKPATH, TAR_RECORD, write_meta
from lamina.errors import InvalidArchive, LaminaError, LayerExists
from lamina.fs.durable import fsync_dir, syncfs
from lamina.fs.locks import FileLock

#: top-level folders a layer tar may hold, by their case-folded name
_TOPS = {"files": wintar.FILES, "hives": wintar.HIVES, "utilityvm": wintar.UTILITY_VM}
_STAGING_PREFIX = ".import-"

Key = tuple[str, ...]


def _key(parts: Iterable[str]) -> Key:
    return tuple(p.casefold() for p in parts)


class LayerImporter:
    """One import into ``staging``; ``parents`` are the parent layer folders, nearest
    first (none: a base layer)."""

    def __init__(self, staging: Path, parents: list[Path]) -> None:
        self.root = staging
        self.parents = parents
        self.base = not parents
        #: every name made so far, case-folded -> the relative path on disk
        self.names: dict[Key, str] = {}
        #: the subset that are real directories (never symlinks): where children may go
        self.dirs: set[Key] = set()
        self.has_uvm = False
        self.dir_times: list[tuple[str, int, int]] = []
        self.size = 0
        self._stream_owner: tuple[str, str] | None = None  # (tar name, path on disk)

    # -- the loop -----------------------------------------------------------------------

    def run(self, stream: IO[bytes], record: IO[bytes]) -> int:
        """Import the tar on ``stream``, writing its tar-split to ``record``."""
        reader = RecordingReader(stream, record)
        while (entry := reader.next()) is not None:
            if entry.type != GLOBAL:  # a PAX global header names no file (as in Go)
                self._add(reader, entry)
        self._finish()
        return self.size

    def _add(self, reader: RecordingReader, entry: TarEntry) -> None:
        owner = self._stream_owner
        self._stream_owner = None
        if owner and entry.type == REG and entry.name.startswith(owner[0] + ":"):
            self._add_stream(reader, entry, owner)
            return
        parts = wintar.split_name(entry.name)
        if parts[-1].startswith(wintar.WHITEOUT_PREFIX):
            self._remove(entry, parts[:-1] + [parts[-1][len(wintar.WHITEOUT_PREFIX):]])
        elif entry.type == LNK:
            self._add_link(entry, parts)
        else:
            self._add_file(reader, entry, parts)

    # -- placing names --------------------------------------------------------------------

    def _rel(self, entry: TarEntry, parts: list[str]) -> str:
        """Where ``parts`` goes on disk: the parent must be a directory made earlier
        (which also means no entry can write through a symlink), and the top folder
        must be one of the three a layer has."""
        top = _TOPS.get(parts[0].casefold())
        if top is None:
            raise InvalidArchive("not under Files/, Hives/ or UtilityVM/", entry.name)
        if len(parts) == 1:
            return top
        parent = _key(parts[:-1])
        if parent not in self.dirs:
            missing = "/".join(parts[:-1])
            raise InvalidArchive(
                f"parent directory {missing} is missing: a layer tar must list every directory before its children",
                entry.name,
            )
        return self.names[parent] + "/" + parts[-1]

    def _check_uvm(self, entry: TarEntry, parts: list[str]) -> None:
        if not wintar.has_prefix(parts, wintar.UTILITY_VM) or len(parts) == 1:
            return
        if not self.has_uvm:
            raise InvalidArchive("missing UtilityVM directory: its entry must come before UtilityVM/Files", entry.name)
        if not wintar.has_prefix(parts, wintar.UTILITY_VM_FILES):
            raise InvalidArchive("invalid UtilityVM layer: only UtilityVM/Files may hold content", entry.name)

    def _make_room(self, entry: TarEntry, parts: list[str], rel: str, *, replace: bool) -> None:
        """Refuse a second entry for a name (NTFS would fail the create), except where
        hcsshim overwrites: the cloned utility VM and hard links."""
        key = _key(parts)
        if key not in self.names:
            return
        if not replace and not wintar.has_prefix(parts, wintar.UTILITY_VM_FILES):
            raise InvalidArchive("duplicate entry (names compare case-blind, as on NTFS)", entry.name)
        old = self.root / self.names[key]
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)
        for k in [k for k in self.names if k[: len(key)] == key]:
            del self.names[k]
            self.dirs.discard(k)

    # -- entry kinds ----------------------------------------------------------------------

    def _add_file(self, reader: RecordingReader, entry: TarEntry, parts: list[str]) -> None:
        attrs = self._attributes(entry)
        is_dir = entry.type == DIR
        if is_dir and attrs is not None and not attrs & FileAttr.DIRECTORY:
            raise InvalidArchive(f"directory entry whose {wintar.FILEATTR} lacks FILE_ATTRIBUTE_DIRECTORY (0x10)", entry.name)
        if entry.type == REG and attrs is not None and attrs & FileAttr.DIRECTORY:
            raise InvalidArchive(f"regular file entry whose {wintar.FILEATTR} has FILE_ATTRIBUTE_DIRECTORY (0x10)", entry.name)
        if entry.type not in (REG, DIR, SYM):
            # hcsshim gives other types no data stream: a directory if the attributes say so
            is_dir = attrs is not None and bool(attrs & FileAttr.DIRECTORY)
        self._check_records(entry)
        if wintar.has_prefix(parts, wintar.UTILITY_VM) and len(parts) == 1:
            self._enter_uvm(entry)
        self._check_uvm(entry, parts)
        rel = self._rel(entry, parts)
        if len(parts) == 1 and not is_dir:
            raise InvalidArchive(f"{rel} must be a directory", entry.name)
        path = self.root / rel
        key = _key(parts)
        if is_dir:
            if key in self.dirs and wintar.has_prefix(parts, wintar.UTILITY_VM):
                pass  # the cloned UVM (or the UtilityVM entry) already made it: keep it
            else:
                self._make_room(entry, parts, rel, replace=False)
                os.mkdir(path, 0o755)
            self.dirs.add(key)
        elif entry.type == SYM:
            self._make_room(entry, parts, rel, replace=False)
            os.symlink(linux_link_target(entry.linkname), path)
        else:
            self._make_room(entry, parts, rel, replace=False)
            self._write_data(reader, entry, path, rel)
        self.names[key] = rel
        self._set_meta(entry, path, is_dir, extra={LINKPATH: entry.linkname} if entry.type == SYM else None)
        self._stream_owner = (entry.name, rel)

    def _write_data(self, reader: RecordingReader, entry: TarEntry, path: Path, rel: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        backup_name = wintar.MUTATED_FILES.get(rel)
        backup = open(self.root / backup_name, "wb") if backup_name else None
        try:
            with open(fd, "wb", buffering=1 << 20, closefd=True) as f:
                if backup is None:
                    reader.copy_data(f.write)
                else:
                    def tee(chunk: bytes) -> None:
                        f.write(chunk)
                        backup.write(chunk)
                    reader.copy_data(tee)
        finally:
            if backup is not None:
                backup.close()
        if entry.type == REG:
            self.size += entry.size

    def _add_stream(self, reader: RecordingReader, entry: TarEntry, owner: tuple[str, str]) -> None:
        """An alternate data stream of the file just added: a sibling ``file:stream``."""
        stream = entry.name[len(owner[0]) + 1 :]
        if not stream or "/" in stream or "\\" in stream or "\0" in stream:
            raise InvalidArchive("invalid alternate data stream name", entry.name)
        rel = owner[1] + ":" + stream
        key = _key(rel.split("/"))
        if key in self.names:
            raise InvalidArchive("duplicate alternate data stream", entry.name)
        path = self.root / rel
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "wb", buffering=1 << 20, closefd=True) as f:
            reader.copy_data(f.write)
        self.names[key] = rel
        self._set_meta(entry, path, False)
        self._stream_owner = owner  # more streams of the same file may follow

    def _add_link(self, entry: TarEntry, parts: list[str]) -> None:
        target = wintar.split_name(entry.linkname)
        if wintar.has_prefix(target, wintar.FILES):
            roots: list[Path] | None = self.parents
        elif wintar.has_prefix(target, wintar.UTILITY_VM_FILES):
            roots = []  # the cloned UVM is in this layer already
        else:
            roots = None
        named_ok = wintar.has_prefix(parts, wintar.FILES) or wintar.has_prefix(parts, wintar.UTILITY_VM_FILES)
        if roots is None or not named_ok:
            raise InvalidArchive(f"invalid hard link in layer (to {entry.linkname})", entry.name)
        self._check_uvm(entry, parts)
        if _key(target) in self.names:
            source = self.root / self.names[_key(target)]
        else:
            source = next((p for p in (_find_ci(root, target) for root in roots) if p is not None), None)
            if source is None:
                raise InvalidArchive(f"failed to find link target {entry.linkname}", entry.name)
        if source.is_dir() and not source.is_symlink():
            raise InvalidArchive(f"hard link to a directory ({entry.linkname})", entry.name)
        rel = self._rel(entry, parts)
        self._make_room(entry, parts, rel, replace=True)
        os.link(source, self.root / rel, follow_symlinks=False)
        self.names[_key(parts)] = rel

    def _remove(self, entry: TarEntry, parts: list[str]) -> None:
        if self.base:
            raise InvalidArchive("base layer cannot have tombstones (.wh. entries)", entry.name)
        if parts[-1] == wintar.OPAQUE_TARGET:
            return  # Windows has no opaque directories: hcsshim's delete of it is a no-op
        if wintar.has_prefix(parts, wintar.UTILITY_VM_FILES):
            self._check_uvm(entry, parts)
            key = _key(parts)
            if key not in self.names:
                raise InvalidArchive("tombstone for a utility VM file that does not exist", entry.name)
            self._make_room(entry, parts, self.names[key], replace=True)
            return
        if not wintar.has_prefix(parts, wintar.FILES) or len(parts) == 1:
            raise InvalidArchive("invalid tombstone: only Files/ and UtilityVM/Files/ entries can be deleted", entry.name)
        self._ensure_dirs(entry, parts[:-1])
        rel = self._rel(entry, parts)
        self._make_room(entry, parts, rel, replace=True)
        os.mknod(self.root / rel, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        self.names[_key(parts)] = rel

    def _ensure_dirs(self, entry: TarEntry, parts: list[str]) -> None:
        """Make the folders a deletion needs that the tar did not list, copying each
        one's metadata from the nearest parent layer that has it (so the union view
        keeps it), as the platform's import does inside a layer folder."""
        for depth in range(2, len(parts) + 1):
            key = _key(parts[:depth])
            if key in self.dirs:
                continue
            if key in self.names:
                raise InvalidArchive(f"{'/'.join(parts[:depth])} is not a directory", entry.name)
            rel = self._rel(entry, parts[:depth])
            os.mkdir(self.root / rel, 0o755)
            source = next((p for p in (_find_ci(r, parts[:depth]) for r in self.parents) if p is not None), None)
            if source is not None and source.is_dir():
                shutil.copystat(source, self.root / rel, follow_symlinks=False)
                st = source.stat()
                self.dir_times.append((rel, st.st_atime_ns, st.st_mtime_ns))
            self.names[key] = rel
            self.dirs.add(key)

    def _enter_uvm(self, entry: TarEntry) -> None:
        """The ``UtilityVM`` entry: a diff layer starts from a clone of its parent's UVM."""
        if self.has_uvm:
            return
        self.has_uvm = True
        if self.base:
            return
        source = self.parents[0] / wintar.UTILITY_VM_FILES
        if not source.is_dir():
            return
        os.mkdir(self.root / wintar.UTILITY_VM, 0o755)
        self.names[(wintar.UTILITY_VM.casefold(),)] = wintar.UTILITY_VM
        self.dirs.add((wintar.UTILITY_VM.casefold(),))
        self._clone(source, wintar.UTILITY_VM_FILES)

    def _clone(self, source: Path, rel: str) -> None:
        """Hard-link ``source`` to ``rel`` (directories and symlinks copied with their
        metadata, the mutated BCD files copied, not linked)."""
        dest = self.root / rel
        os.mkdir(dest, 0o755)
        shutil.copystat(source, dest, follow_symlinks=False)
        st = source.stat()
        self.dir_times.append((rel, st.st_atime_ns, st.st_mtime_ns))
        self.names[_key(rel.split("/"))] = rel
        self.dirs.add(_key(rel.split("/")))
        for child in sorted(os.scandir(source), key=lambda e: e.name):
            child_rel = f"{rel}/{child.name}"
            if child.is_dir(follow_symlinks=False):
                self._clone(Path(child.path), child_rel)
                continue
            if child.is_symlink():
                os.symlink(os.readlink(child.path), self.root / child_rel)
                shutil.copystat(child.path, self.root / child_rel, follow_symlinks=False)
            elif child_rel in wintar.MUTATED_FILES:
                shutil.copy2(child.path, self.root / child_rel)
            else:
                os.link(child.path, self.root / child_rel, follow_symlinks=False)
            self.names[_key(child_rel.split("/"))] = child_rel

    # -- metadata ----------------------------------------------------------------------------

    @staticmethod
    def _attributes(entry: TarEntry) -> int | None:
        value = text_record(entry, wintar.FILEATTR)
        return None if value is None else wintar.parse_fileattr(value, entry.name)

    @staticmethod
    def _check_records(entry: TarEntry) -> None:
        """Refuse records the Windows importer would fail on, naming the entry."""
        raw = text_record(entry, wintar.RAWSD)
        if raw is not None:
            try:
                winsd.decode(base64.b64decode(raw, validate=True))
            except (binascii.Error, ValueError):
                raise InvalidArchive(f"{wintar.RAWSD} is not base64", entry.name) from None
            except InvalidArchive as e:
                raise InvalidArchive(str(e), entry.name) from None
        for key in (wintar.CREATIONTIME, "atime", "ctime"):
            time_record(entry, key)

    def _set_meta(self, entry: TarEntry, path: Path, is_dir: bool, extra: dict[str, str] | None = None) -> None:
        records = wintar.windows_records(entry.pax)
        for key, name in (("atime", ATIME), ("ctime", CTIME)):
            value = text_record(entry, key)
            if value is not None:
                records[name] = value
        if extra:
            records.update(extra)
        try:
            write_meta(path, records)
        except OSError as e:
            if e.errno in (errno.E2BIG, errno.ENOSPC, errno.ERANGE):
                raise InvalidArchive(f"Windows metadata too large for the store's xattrs: {e.strerror}", entry.name) from None
            raise
        atime = time_record(entry, "atime")
        times = (entry.mtime_ns if atime is None else atime, entry.mtime_ns)
        if is_dir:
            self.dir_times.append((str(path.relative_to(self.root)), *times))
        else:
            os.utime(path, ns=times, follow_symlinks=False)

    # -- the end ------------------------------------------------------------------------------

    def _finish(self) -> None:
        if self.base:
            for hive in wintar.BASE_LAYER_HIVES:
                key = _key(hive.split("/"))
                if key not in self.names or not (self.root / self.names[key]).is_file():
                    raise InvalidArchive("base layer lacks a registry hive ProcessBaseLayer needs", hive)
            if any(k[:2] == ("utilityvm", "files") for k in self.names):
                if _key(wintar.UVM_BCD.split("/")) not in self.names:
                    raise InvalidArchive("base layer's UtilityVM must contain a BCD store", wintar.UVM_BCD)
        else:
            for top in (wintar.FILES, wintar.HIVES):
                if (top.casefold(),) not in self.dirs:
                    raise InvalidArchive(f"a layer with parents must have a {top} directory entry (it may be empty)", top)
        # children changed their directories' times: set them again, deepest first
        for rel, atime, mtime in sorted(self.dir_times, key=lambda t: t[0].count("/"), reverse=True):
            os.utime(self.root / rel, ns=(atime, mtime), follow_symlinks=False)


def _find_ci(root: Path, parts: list[str]) -> Path | None:
    """``root/parts`` if it exists without passing a symlink, matching each component
    exactly or else case-blind (NTFS resolves ``Program Files`` for ``program files``)."""
    current = root
    for i, part in enumerate(parts):
        candidate = current / part
        if not os.path.lexists(candidate):
            try:
                names = os.listdir(current)
            except OSError:
                return None
            folded = part.casefold()
            match = next((n for n in names if n.casefold() == folded), None)
            if match is None:
                return None
            candidate = current / match
        if i < len(parts) - 1 and (candidate.is_symlink() or not candidate.is_dir()):
            return None
        current = candidate
    return current


# -- the whole import ----------------------------------------------------------------------------


def write_layer(stream: IO[bytes], home: Path, layer_id: str, parents: list[Path]) -> int:
    """Import the tar on ``stream`` into ``home/layer_id``; return its size."""
    layer = home / layer_id
    layer.mkdir(mode=0o700, exist_ok=True)
    staging = layer / f"{_STAGING_PREFIX}{os.getpid()}"
    # the lock first: cleanup takes a staging folder whose lock is free for a dead import's
    lock = FileLock(layer / (staging.name + ".lock"))
    lock.acquire()
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(0o700)
        importer = LayerImporter(staging, parents)
        with gzip.open(staging / TAR_RECORD, "wb", compresslevel=1) as record:
            size = importer.run(stream, record)
        _commit(staging, layer)
        return size
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.release()
        (layer / (staging.name + ".lock")).unlink(missing_ok=True)


def _commit(staging: Path, layer: Path) -> None:
    """Move the finished import into the layer folder; the empty ``Files`` that create
    made gives way, anything else there means the layer already has content."""
    syncfs(staging)
    for item in sorted(os.listdir(staging)):
        dest = layer / item
        if dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()):
            dest.rmdir()
        elif os.path.lexists(dest):
            raise LayerExists(f"layer {layer.name} already has content ({item}); apply a diff only to an empty layer")
        os.rename(staging / item, dest)
    fsync_dir(layer)


def is_staging(name: str) -> bool:
    """Whether a name inside a layer folder is an import's staging folder or its lock."""
    return name.startswith(_STAGING_PREFIX)


def staging_in_use(layer: Path, name: str) -> bool:
    """Whether the import that owns staging folder ``name`` is still running."""
    lock = FileLock(layer / (name.removesuffix(".lock") + ".lock"))
    if not lock.acquire(blocking=False):
        return True
    lock.release()
    return False


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m lamina.drivers.windowsfilter_import HOME ID [PARENT_PATH...]", file=sys.stderr)
        return 2
    home, layer_id, *parents = argv
    try:
        size = write_layer(sys.stdin.buffer, Path(home), layer_id, [Path(p) for p in parents])
    except LaminaError as e:
        entry = getattr(e, "entry", None)
        message = str(e) if entry is None else str(e)[len(entry) + 2 :]
        print(json.dumps({"type": type(e).__name__, "message": message, "entry": entry}), file=sys.stderr)
        return 1
    except OSError as e:
        print(json.dumps({"type": "OSError", "message": str(e), "errno": e.errno}), file=sys.stderr)
        return 1
    sys.stdout.write(str(size))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
