"""Apply a layer tar to a directory, with Docker's ``UnpackLayer`` semantics.

What each entry does (moby ``pkg/archive/diff.go``, see
``reference/graphdriver-protocol.md`` §2.5–2.6):

- a regular file, symlink, fifo or device replaces whatever is at its path (a
  directory there is removed whole); a directory merges with an existing directory,
  only its metadata is set again. Parent directories the tar does not list are made
  with mode 0755, owned by the (mapped) root.
- a hardlink links to an earlier entry's path in the same root. With ``lower_roots``
  (overlay), a target that is not in the root is first copied up from the nearest
  lower root that shows it, parents included, as overlayfs would copy it up.
- ownership: numeric uid/gid, mapped container -> host with ``uid_map``/``gid_map``,
  set only when privileged (and only when it differs from what the kernel gave).
  Then ``SCHILY.xattr.*`` records (EPERM is logged and tolerated, as Docker does),
  then the mode (after chown, which clears setuid bits), then times. Directory times
  are set again at the end, since filling a directory changes its mtime.
- devices: made when privileged; skipped (logged at debug level) when not, as Docker
  does inside a user namespace. Fifos are made either way.
- whiteouts: ``.wh.NAME`` and ``.wh..wh..opq``, expressed per ``opts.whiteouts``:
  ``"delete"`` removes NAME, or for an opaque marker every entry of that directory
  not unpacked earlier from this same tar (vfs); ``"overlay"`` makes NAME a 0/0
  character device, or sets ``opts.opaque_xattr`` to ``y`` on the directory. AUFS
  metadata (top-level ``.wh..wh.*`` other than the opaque marker) is skipped.
- the result is the sum of the sizes of regular-file entries (Docker's rule).

Safety, which Docker gets from a chroot and we get from file descriptors: every path
is cleaned lexically (absolute names and ``..`` that would climb are refused), then
reached from the root fd one ``openat(O_NOFOLLOW)`` at a time (``lamina.fs.safepath``),
so a symlink in a parent position -- planted earlier in this tar or already in the
root -- is never followed; every later call is an ``*at`` call on the parent fd with
no-follow. Hardlink targets are resolved the same way. Symlink targets are stored as
text and never followed. In overlay mode a parent directory that the upper lacks is
checked against the lower roots first, so a path through a lower layer's symlink is
refused just as vfs (whose root holds the whole chain) refuses it. A refusal is
:class:`InvalidArchive` naming the entry.

Where we differ from Docker, on purpose:

- absolute names (``/etc/x``) are refused; Docker strips the ``/``. A layer tar never
  needs them, and refusing is what the hostile-tar tests ask.
- a path through a symlink is refused; Docker (in its chroot) follows a symlink that
  stays inside the root. Well-formed layers never write through a symlink.
- a name that repeats is accepted (later wins); Docker, recording tar-split, refuses
  any repeat. With tar-split we refuse only a repeat that loses an earlier entry's
  content (see :mod:`lamina.archive.tar.split`).
- AUFS hardlink farms (``.wh..wh.plnk``) are skipped, so a hardlink into one is
  refused as a missing target; Docker extracts them to a temporary directory.
- GNU sparse files are refused (see :mod:`lamina.archive.tar.reader`).
- with ``opts.drop_overlay_xattrs`` (and always in overlay mode),
  ``trusted.overlay.*``/``user.overlay.*`` xattrs from the tar are not set: they would
  steer the overlay mount (redirects, metacopy, opaque flags, origins). An option of its
  own, not a part of the whiteout mode, because an overlay base layer is unpacked in
  delete mode and is a lower directory all the same.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from lamina.archive import native
from lamina.archive.fastapply import FastFiles
from lamina.archive.tar.crc64 import Crc64
from lamina.archive.tar.reader import (
    BLK,
    CHR,
    DIR,
    FIFO,
    GLOBAL,
    LNK,
    REG,
    SYM,
    TarEntry,
    TarReader,
)
from lamina.archive.tar.split import TarSplitWriter
from lamina.errors import InvalidArchive, NoSpace, UnsupportedFilesystem
from lamina.fs import relax
from lamina.fs.safepath import (
    DIR_FLAGS,
    DirCache,
    UnsafePath,
    clean_parts,
    open_child_dir,
    open_dir,
    remove_at,
)

log = logging.getLogger(__name__)

IDMap = Sequence[tuple[int, int, int]]

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
#: the mode of parent directories the tar does not list (Docker's ImpliedDirectoryMode)
IMPLIED_DIR_MODE = 0o755

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: the xattr prefixes overlayfs reads as its own metadata (redirect, metacopy, opaque...)
OVERLAY_PRIVATE_XATTRS = ("trusted.overlay.", "user.overlay.")
#: xattr namespaces Linux has; a name outside them can only be a malformed tar
_XATTR_NAMESPACES = ("user.", "trusted.", "security.", "system.")
#: uid_t and gid_t are 32 bits, and (2^32 - 1) means "no change" to chown
_ID_LIMIT = (1 << 32) - 1
#: the largest major or minor device number makedev takes
_DEV_MAX = (1 << 32) - 1
#: errors that mean the tar asked for something this root cannot hold by name
_NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR})


@dataclass
class ApplyOptions:
    """How to apply a layer tar; see the module docstring."""

    whiteouts: Literal["delete", "overlay"] = "delete"
    opaque_xattr: str = "trusted.overlay.opaque"
    uid_map: IDMap = ()
    gid_map: IDMap = ()
    #: None = (geteuid() == 0): chown, devices
    privileged: bool | None = None
    #: the chain below ``root``, nearest first, for copying up hardlink targets
    lower_roots: Sequence[Path] = ()
    #: called once before ``lower_roots`` are first looked at: a layer applied while its
    #: lowers are still being written waits here until they are whole (chainapply)
    wait_for_lowers: Callable[[], None] | None = None
    #: write tar-split JSON lines here (uncompressed)
    tarsplit: IO[bytes] | None = None
    #: do not set overlayfs's own xattrs (OVERLAY_PRIVATE_XATTRS) from the tar: for every
    #: layer a driver shows through overlayfs (whiteout mode "overlay" implies it)
    drop_overlay_xattrs: bool = False


def apply_tar(root: Path, stream: IO[bytes], opts: ApplyOptions | None = None) -> int:
    """Apply the uncompressed layer tar ``stream`` to the directory ``root``.

    Returns the sum of the sizes of the tar's regular files. Reads ``stream`` to its
    end. Raises :class:`InvalidArchive` naming the entry for malformed or hostile input;
    then ``root`` is left part-applied (the caller discards the layer).
    """
    applier = _Applier(Path(root), opts or ApplyOptions())
    try:
        return applier.run(stream)
    finally:
        applier.close()


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` is process-global)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _mapper(idmap: IDMap, kind: str):
    """A container -> host id function for ``idmap`` (identity when empty)."""
    ranges = [(int(c), int(h), int(n)) for c, h, n in idmap]
    if not ranges:
        return None

    def to_host(value: int, entry: str) -> int:
        for container, host, size in ranges:
            if container <= value < container + size:
                return host + value - container
        raise InvalidArchive(f"container {kind} {value} has no host {kind} in the id map",
                             entry)

    return to_host


def _times(e: TarEntry) -> tuple[int, int]:
    """(atime, mtime) in ns: atime is never older than mtime (Docker's rule)."""
    m = e.mtime_ns
    a = e.atime_ns
    return (m if a is None or a < m else a), m


class _Applier:
    def __init__(self, root: Path, opts: ApplyOptions) -> None:
        if opts.whiteouts not in ("delete", "overlay"):
            raise ValueError(f"unknown whiteout style {opts.whiteouts!r}")
        self.opts = opts
        self.overlay = opts.whiteouts == "overlay"
        self.drop_private = opts.drop_overlay_xattrs or self.overlay
        self.privileged = (os.geteuid() == 0) if opts.privileged is None else opts.privileged
        self.euid = os.geteuid()
        self.egid = os.getegid()
        #: without CAP_DAC_OVERRIDE a directory we made 0555 could not be filled
        self.dac_override = self.euid == 0
        self.umask = _umask()
        self.map_uid = _mapper(opts.uid_map, "uid")
        self.map_gid = _mapper(opts.gid_map, "gid")
        self.root_uid = self.map_uid(0, "/") if self.map_uid else 0
        self.root_gid = self.map_gid(0, "/") if self.map_gid else 0
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        #: for each open directory fd: its gid if it is setgid (new entries inherit it)
        self.setgid: dict[int, int] = {}
        self._note_dir(self.root_fd)
        check = self._check_lowers if self.overlay and opts.lower_roots else None
        self.dirs = DirCache(self.root_fd, mode=IMPLIED_DIR_MODE, on_create=self._implied_dir,
                             before_create=check)
        if self.dac_override:
            self.dirs.on_open = lambda names, fd: self._note_dir(fd)
        else:
            self.dirs.on_open = self._reach_dir
            self.dirs.on_denied = self._widen_dir
        self.lower_fds: list[int] | None = None
        self.split = (TarSplitWriter(opts.tarsplit, buffered=True)
                      if opts.tarsplit is not None else None)
        self.digest: bytes | None = None
        #: paths unpacked so far (for opaque markers in delete mode)
        self.unpacked: set[str] = set()
        self.dir_times: list[tuple[list[str], int, int]] = []
        self.dir_modes: list[tuple[list[str], int]] = []
        self.reader: TarReader
        #: the directory the last entry was a plain file in (or was): where the files
        #: that follow probably are, for the fast path (None: no such directory)
        self.fast_dir: list[str] | None = None

    def close(self) -> None:
        self.dirs.close()
        os.close(self.root_fd)
        for fd in self.lower_fds or ():
            os.close(fd)

    # -- the loop -----------------------------------------------------------------

    def run(self, stream: IO[bytes]) -> int:
        reader = self.reader = TarReader(stream, record=self.split is not None)
        split = self.split
        size = 0
        fast = self._fast_files()
        while True:
            if fast is not None and self.fast_dir is not None:
                size += fast.run(self.fast_dir)
            e = reader.next_entry()
            if e is None:
                break
            self.fast_dir = None
            if split is not None:
                split.segment(e.raw or b"")
                self.digest = None
            try:
                self._entry(e)
            except UnsafePath as exc:
                raise InvalidArchive(f"{exc.path!r} {exc.reason}", e.name) from None
            except InvalidArchive:
                raise
            except ValueError as exc:  # a NUL byte in a name, say
                raise InvalidArchive(str(exc), e.name) from None
            except OSError as exc:
                if exc.errno in _NAME_ERRNOS:
                    raise InvalidArchive(os.strerror(exc.errno), e.name) from None
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(f"{os.strerror(exc.errno).lower()} while writing tar entry "
                                  f"{e.name!r}", exc.errno) from None
                exc.add_note(f"while applying tar entry {e.name!r}")
                raise
            if e.type == REG:
                size += e.size
            if reader.remaining:
                self._copy_data(-1)
            if split is not None:
                split.file(e.name_bytes, e.size, self.digest if e.size else None, is_dir=e.type == DIR)
        self._finish_dirs()
        if split is not None:
            split.segment(reader.end_raw)
            for chunk in reader.trailing():
                split.segment(chunk)
            split.finish()
        else:
            for _ in reader.trailing():
                pass
        return size

    def _fast_files(self) -> FastFiles | None:
        """The C fast path for runs of plain files, where the extension is built and no
        id map asks for per-entry work it does not do."""
        ext = native.ext
        if ext is None or self.map_uid is not None or self.map_gid is not None:
            return None
        return FastFiles(self, ext)

    def _entry(self, e: TarEntry) -> None:
        t = e.type
        if t == GLOBAL:
            return
        parts = clean_parts(e.name)
        if not parts:
            if t != DIR:
                raise InvalidArchive("names the layer root but is not a directory", e.name)
            self._root_dir(e)
            return
        first = parts[0]
        if first.startswith(WHITEOUT_META_PREFIX) and not (
                len(parts) == 1 and first == WHITEOUT_OPAQUE):
            log.debug("skipping AUFS metadata entry %s", e.name)
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(e, parts, base)
            return
        if t == REG:
            self._regular(e, parts)
        elif t == DIR:
            self._directory(e, parts)
        elif t == SYM:
            self._symlink(e, parts)
        elif t == LNK:
            self._hardlink(e, parts)
        else:
            self._special(e, parts)
        if not self.overlay:
            self.unpacked.add("/".join(parts))

    # -- helpers --------------------------------------------------------------------

    def _note_dir(self, fd: int, st: os.stat_result | None = None) -> None:
        st = st or os.fstat(fd)
        if st.st_mode & stat.S_ISGID:
            self.setgid[fd] = st.st_gid
        else:
            self.setgid.pop(fd, None)

    def _reach_dir(self, names: list[str], fd: int) -> None:
        """An existing directory opened by an unprivileged apply: one the tar is to fill
        but whose mode forbids it (a parent layer's ``0555``, say) gets its owner's
        bits now and its mode back at the end (:meth:`_finish_dirs`), as a directory
        the tar makes itself does."""
        st = os.fstat(fd)
        self._note_dir(fd, st)
        old = relax.widen(fd, 0o700, st)
        if old is not None:
            self.dir_modes.append((list(names), old))

    def _widen_dir(self, parent_fd: int, name: str, names: list[str]) -> int:
        """An existing directory the unprivileged owner may not even open (``0000``):
        widened as :func:`lamina.fs.relax.open_at` does, its mode put back at the end;
        refused as before if it is somebody else's."""
        fd, old = relax.open_at(name, DIR_FLAGS, parent_fd, 0o700)
        if old is not None:
            self.dir_modes.append((list(names), old))
        return fd

    def _implied_dir(self, fd: int) -> None:
        """A parent directory the tar did not list: owned by the mapped root."""
        if self.privileged and (self.root_uid, self.root_gid) != (self.euid, self.egid):
            os.fchown(fd, self.root_uid, self.root_gid)

    def _owner(self, e: TarEntry) -> tuple[int, int]:
        uid = self.map_uid(e.uid, e.name) if self.map_uid else e.uid
        gid = self.map_gid(e.gid, e.name) if self.map_gid else e.gid
        if uid >= _ID_LIMIT or gid >= _ID_LIMIT:  # the tar allows 64 bits, Linux 32
            raise InvalidArchive(f"owner {uid}:{gid} is out of range (Linux ids are below "
                                 f"{_ID_LIMIT})", e.name)
        return uid, gid

    def _needs_chown(self, pfd: int, uid: int, gid: int) -> bool:
        """Whether a new entry in ``pfd`` needs a chown to become uid:gid."""
        if not self.privileged:
            return False
        return uid != self.euid or gid != self.setgid.get(pfd, self.egid)

    def _parent(self, parts: list[str]) -> int:
        if len(parts) == 1:
            return self.root_fd
        return self.dirs.get(parts[:-1])

    def _replace(self, pfd: int, parts: list[str]) -> None:
        """Remove what is at ``parts`` (so a new entry can take its place)."""
        self.dirs.forget(parts)
        remove_at(pfd, parts[-1])

    def _copy_data(self, fd: int) -> None:
        """Write the current entry's data to ``fd`` (or drop it when fd < 0), taking
        its CRC-64 when tar-split is recorded."""
        crc = Crc64() if self.split is not None else None
        write = os.write
        chunk = self.reader.buffered()
        chunks = (chunk,) if chunk is not None else self.reader.data()
        for chunk in chunks:
            if crc is not None:
                crc.update(chunk)
            if fd >= 0:
                n = write(fd, chunk)
                if n < len(chunk):
                    _write_all(fd, chunk[n:])
        if crc is not None:
            self.digest = crc.digest()

    def _xattrs(self, e: TarEntry, target: int | str) -> None:
        """Set the entry's ``SCHILY.xattr.*`` records on an fd or a no-follow path."""
        assert e.xattrs is not None
        follow = not isinstance(target, str)
        for name, value in e.xattrs.items():
            if not name.startswith(_XATTR_NAMESPACES):
                # the kernel answers EOPNOTSUPP, which would blame the filesystem
                raise InvalidArchive(f"xattr {name!r} is in no namespace Linux knows", e.name)
            if self.drop_private and name.startswith(OVERLAY_PRIVATE_XATTRS):
                log.warning("%s: not setting overlayfs's own xattr %s", e.name, name)
                continue
            try:
                os.setxattr(target, name, value, follow_symlinks=follow)
            except OSError as exc:
                if exc.errno == errno.EPERM:
                    log.warning("%s: xattr %s not set: %s", e.name, name, exc.strerror)
                elif exc.errno == errno.EOPNOTSUPP and not name.startswith("system."):
                    raise UnsupportedFilesystem(
                        f"{e.name}: the filesystem does not support xattr {name}") from None
                elif exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    # an unknown system.* name, or a value the kernel cannot parse (ACLs,
                    # capabilities): the tar's doing, not the filesystem's
                    raise InvalidArchive(f"xattr {name} refused: {exc.strerror}", e.name) from None
                elif exc.errno in (errno.ENOSPC, errno.E2BIG, errno.ERANGE):
                    # more or larger xattrs than an inode can hold: the tar's doing
                    raise InvalidArchive(f"xattr {name} does not fit: {exc.strerror}",
                                         e.name) from None
                else:
                    raise

    @staticmethod
    def _proc_path(pfd: int, name: str) -> str:
        """A path naming ``name`` in directory fd ``pfd``, for calls that take no
        dir_fd (setxattr). Only the last component is looked up by name."""
        return f"/proc/self/fd/{pfd}/{name}"

    # -- entry kinds --------------------------------------------------------------

    def _regular(self, e: TarEntry, parts: list[str]) -> None:
        pfd = self.root_fd if len(parts) == 1 else self.dirs.get(parts[:-1])
        name = parts[-1]
        mode = e.mode
        try:
            fd = os.open(name, _FILE_FLAGS, mode, dir_fd=pfd)
        except FileExistsError:
            self._replace(pfd, parts)
            fd = os.open(name, _FILE_FLAGS, mode, dir_fd=pfd)
        try:
            if e.size:
                chunk = None if self.split is not None else self.reader.buffered()
                if chunk is not None:  # the common small file: one write, no generator
                    n = os.write(fd, chunk)
                    if n < len(chunk):
                        _write_all(fd, chunk[n:])
                else:
                    self._copy_data(fd)
            if self.privileged:
                uid, gid = self._owner(e)
                if self._needs_chown(pfd, uid, gid):
                    os.fchown(fd, uid, gid)
            if e.xattrs:
                self._xattrs(e, fd)
            if mode & self.umask or mode & 0o6000:  # setuid: the kernel may drop it
                os.fchmod(fd, mode)
            m = e.mtime_ns
            a = e.atime_ns
            os.utime(fd, ns=(m if a is None or a < m else a, m))
        finally:
            os.close(fd)
        self.fast_dir = parts[:-1]

    def _directory(self, e: TarEntry, parts: list[str]) -> None:
        pfd = self._parent(parts)
        name = parts[-1]
        mode = e.mode
        deferred = not self.dac_override and mode & 0o700 != 0o700
        mkmode = (mode | 0o700) if deferred else mode
        try:
            os.mkdir(name, mkmode, dir_fd=pfd)
            made = True
        except FileExistsError:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                made = False
            else:
                self._replace(pfd, parts)
                os.mkdir(name, mkmode, dir_fd=pfd)
                made = True
        fd = self.dirs.get(parts, create=False)
        if made:
            cur_mode = (mkmode & 0o1777 & ~self.umask) | (stat.S_ISGID if pfd in self.setgid else 0)
            cur_uid, cur_gid = self.euid, self.setgid.get(pfd, self.egid)
        else:
            st = os.fstat(fd)
            cur_mode, cur_uid, cur_gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        chowned = False
        if self.privileged:
            uid, gid = self._owner(e)
            if (uid, gid) != (cur_uid, cur_gid):
                os.fchown(fd, uid, gid)
                chowned = True
        if e.xattrs:
            self._xattrs(e, fd)
        if cur_mode != mkmode or (chowned and mkmode & 0o6000):
            os.fchmod(fd, mkmode)
            self._note_dir(fd)
        if not self.dac_override:  # set again at the end: it may have been widened
            self.dir_modes.append((parts, mode))
        self.dir_times.append((parts, *_times(e)))
        self.fast_dir = parts

    def _root_dir(self, e: TarEntry) -> None:
        """A ``./`` entry: the layer root's own metadata."""
        fd = self.root_fd
        st = os.fstat(fd)
        if self.privileged:
            uid, gid = self._owner(e)
            if (uid, gid) != (st.st_uid, st.st_gid):
                os.fchown(fd, uid, gid)
        if e.xattrs:
            self._xattrs(e, fd)
        if self.dac_override or e.mode & 0o700 == 0o700:
            if stat.S_IMODE(st.st_mode) != e.mode:
                os.fchmod(fd, e.mode)
                self._note_dir(fd)
        else:
            self.dir_modes.append(([], e.mode))
        self.dir_times.append(([], *_times(e)))
        self.fast_dir = []

    def _symlink(self, e: TarEntry, parts: list[str]) -> None:
        if not e.linkname:
            raise InvalidArchive("symlink with an empty target", e.name)
        pfd = self._parent(parts)
        name = parts[-1]
        try:
            os.symlink(e.linkname, name, dir_fd=pfd)
        except FileExistsError:
            self._replace(pfd, parts)
            os.symlink(e.linkname, name, dir_fd=pfd)
        self._path_metadata(e, pfd, name, chmod=False)

    def _special(self, e: TarEntry, parts: list[str]) -> None:
        t = e.type
        if t in (CHR, BLK):
            if not self.privileged:
                log.debug("unprivileged: skipping device %s", e.name)
                return
            kind = stat.S_IFCHR if t == CHR else stat.S_IFBLK
            if not (0 <= e.devmajor <= _DEV_MAX and 0 <= e.devminor <= _DEV_MAX):
                raise InvalidArchive(f"device number {e.devmajor},{e.devminor} is out of range "
                                     f"(Linux takes 0 to {_DEV_MAX})", e.name)
            dev = os.makedev(e.devmajor, e.devminor)
        elif t == FIFO:
            kind, dev = stat.S_IFIFO, 0
        else:  # a type Linux has no file for (the reader passes every type on)
            raise InvalidArchive(f"unsupported entry type {chr(t)!r}", e.name)
        pfd = self._parent(parts)
        name = parts[-1]
        try:
            try:
                os.mknod(name, kind | e.mode, dev, dir_fd=pfd)
            except FileExistsError:
                self._replace(pfd, parts)
                os.mknod(name, kind | e.mode, dev, dir_fd=pfd)
        except PermissionError as exc:
            if kind == stat.S_IFIFO:
                raise
            log.warning("%s: device not made: %s", e.name, exc.strerror)
            return
        self._path_metadata(e, pfd, name, chmod=True)

    def _path_metadata(self, e: TarEntry, pfd: int, name: str, *, chmod: bool,
                       current: os.stat_result | None = None) -> None:
        """Owner, xattrs, mode and times of an entry reached by name (no fd to hold:
        symlinks, devices, hardlinks). ``current`` is its stat if already known (then
        only what differs is set); otherwise it was just made by this process."""
        mode = e.mode
        if self.privileged:
            uid, gid = self._owner(e)
            if (current is not None and (uid, gid) != (current.st_uid, current.st_gid)) or (
                    current is None and self._needs_chown(pfd, uid, gid)):
                os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        if e.xattrs:
            self._xattrs(e, self._proc_path(pfd, name))
        if chmod:
            if current is not None:
                needed = stat.S_IMODE(current.st_mode) != mode
            else:
                needed = bool(mode & self.umask)
            if needed or mode & 0o6000:
                # The entry is not a symlink (checked or just made), so following
                # the name is safe here.
                os.chmod(name, mode, dir_fd=pfd)
        times = _times(e)
        if current is None or current.st_mtime_ns != times[1]:
            os.utime(name, ns=times, dir_fd=pfd, follow_symlinks=False)

    # -- hardlinks ----------------------------------------------------------------

    def _hardlink(self, e: TarEntry, parts: list[str]) -> None:
        target = clean_parts(e.linkname)
        if not target:
            raise InvalidArchive("hardlink to the layer root", e.name)
        if target == parts:
            raise InvalidArchive("hardlink to itself", e.name)
        pfd = self._parent(parts)
        name = parts[-1]
        same_dir = target[:-1] == parts[:-1]
        tfd = pfd if same_dir else self._open_or_none(self.root_fd, target[:-1])
        try:
            st = self._stat_or_none(tfd, target[-1])
            if st is None:
                st = self._copy_up(e, target)
                if tfd < 0:
                    tfd = open_dir(self.root_fd, target[:-1])
            elif stat.S_ISDIR(st.st_mode):
                raise InvalidArchive(f"hardlink to directory {e.linkname!r}", e.name)
            elif self.overlay and _is_whiteout(st):
                raise InvalidArchive(
                    f"hardlink target {e.linkname!r} was deleted by this layer", e.name)
            try:
                os.link(target[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd,
                        follow_symlinks=False)
            except FileExistsError:
                self._replace(pfd, parts)
                os.link(target[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd,
                        follow_symlinks=False)
        finally:
            if not same_dir and tfd >= 0:
                os.close(tfd)
        # Docker applies the link header's metadata to the (shared) inode.
        self._path_metadata(e, pfd, name, chmod=not stat.S_ISLNK(st.st_mode), current=st)

    @staticmethod
    def _open_or_none(layer_fd: int, parts: list[str]) -> int:
        """An fd of directory ``parts`` beneath ``layer_fd``, or -1 if it is missing.
        A symlink or a file on the way raises :class:`UnsafePath`."""
        try:
            return open_dir(layer_fd, parts)
        except FileNotFoundError:
            return -1

    @staticmethod
    def _stat_or_none(dir_fd: int, name: str) -> os.stat_result | None:
        if dir_fd < 0:
            return None
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _copy_up(self, e: TarEntry, target: list[str]) -> os.stat_result:
        """Copy the hardlink target from the nearest lower root that shows it, as
        overlayfs would on a write, and return the copy's stat."""
        missing = InvalidArchive(f"hardlink target {e.linkname!r} does not exist", e.name)
        if self._hidden_in(self.root_fd, target):
            raise missing
        for lower_fd in self._lowers():
            try:
                ldir = self._open_or_none(lower_fd, target[:-1])
            except UnsafePath:
                raise missing from None  # a symlink shadows the path below
            try:
                st = self._stat_or_none(ldir, target[-1])
                if st is not None:
                    if self.overlay and _is_whiteout(st):
                        raise missing
                    if stat.S_ISDIR(st.st_mode):
                        raise InvalidArchive(f"hardlink to directory {e.linkname!r}", e.name)
                    self._copy_parents(lower_fd, target)
                    return self._copy_file(ldir, target, st)
            finally:
                if ldir >= 0:
                    os.close(ldir)
            if self._hidden_in(lower_fd, target):
                break
        raise missing

    def _lowers(self) -> list[int]:
        if self.lower_fds is None:
            if self.opts.wait_for_lowers is not None:
                self.opts.wait_for_lowers()  # every look below this layer comes through here
            self.lower_fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                              for p in self.opts.lower_roots]
        return self.lower_fds

    def _check_lowers(self, parts: list[str]) -> None:
        """Before a parent directory is made in an overlay upper: refuse if the layers
        below show a symlink or a file there, as a vfs root (which holds the whole
        chain) would. The new directory would otherwise hide it in the merged view,
        and the tar would have written "through" it in effect."""
        if self._hidden_in(self.root_fd, parts):
            return
        shown = "/".join(parts)
        for lower_fd in self._lowers():
            try:
                ldir = self._open_or_none(lower_fd, parts[:-1])
            except UnsafePath:
                return  # a parent is no directory down there: all below is hidden
            st = self._stat_or_none(ldir, parts[-1])
            if ldir >= 0:
                os.close(ldir)
            if st is not None:
                if stat.S_ISDIR(st.st_mode) or _is_whiteout(st):
                    return
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafePath(shown, "is a symlink in a lower layer; paths are "
                                     "never followed through symlinks")
                raise UnsafePath(shown, "is not a directory in a lower layer")
            if self._hidden_in(lower_fd, parts):
                return

    def _hidden_in(self, layer_fd: int, target: list[str]) -> bool:
        """Whether a layer hides the lower layers' ``target``: a whiteout or a
        non-directory at one of its parents, or an opaque parent directory."""
        fd = os.dup(layer_fd)
        try:
            for i, part in enumerate(target[:-1]):
                if self.overlay and _opaque(fd, self.opts.opaque_xattr) and i:
                    return True
                try:
                    nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    return False
                except OSError:
                    return True  # a file, symlink or whiteout shadows the path
                os.close(fd)
                fd = nfd
            return self.overlay and _opaque(fd, self.opts.opaque_xattr)
        finally:
            os.close(fd)

    def _copy_parents(self, lower_fd: int, target: list[str]) -> None:
        """Make the target's missing parents in the root, with the lower dirs' metadata."""
        fd = self.root_fd
        lfd = os.dup(lower_fd)
        try:
            for i, part in enumerate(target[:-1]):
                nlfd = os.open(part, DIR_FLAGS, dir_fd=lfd)
                os.close(lfd)
                lfd = nlfd
                lst = os.fstat(lfd)

                def mirror(new_fd: int, lst: os.stat_result = lst) -> None:
                    if self.privileged:
                        os.fchown(new_fd, lst.st_uid, lst.st_gid)
                    os.fchmod(new_fd, stat.S_IMODE(lst.st_mode))
                    os.utime(new_fd, ns=(lst.st_atime_ns, lst.st_mtime_ns))

                nfd = open_child_dir(fd, part, "/".join(target[:i + 1]), create=True,
                                     mode=0o700, on_create=mirror)
                if fd != self.root_fd:
                    os.close(fd)
                fd = nfd
        finally:
            os.close(lfd)
            if fd != self.root_fd:
                os.close(fd)

    def _copy_file(self, ldir: int, target: list[str], st: os.stat_result) -> os.stat_result:
        """Copy one non-directory from a lower layer into the same path in the root."""
        name = target[-1]
        tdir = open_dir(self.root_fd, target[:-1])
        try:
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFREG:
                src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ldir)
                try:
                    dst = os.open(name, _FILE_FLAGS, 0o600, dir_fd=tdir)
                    try:
                        remaining = st.st_size
                        while remaining:
                            n = os.copy_file_range(src, dst, min(remaining, 1 << 30))
                            if not n:
                                break
                            remaining -= n
                    finally:
                        os.close(dst)
                finally:
                    os.close(src)
            elif kind == stat.S_IFLNK:
                os.symlink(os.readlink(name, dir_fd=ldir), name, dir_fd=tdir)
            else:
                os.mknod(name, st.st_mode, st.st_rdev, dir_fd=tdir)
            if self.privileged:  # before xattrs: chown drops security.capability
                os.chown(name, st.st_uid, st.st_gid, dir_fd=tdir, follow_symlinks=False)
            for attr in _listxattr(self._proc_path(ldir, name)):
                try:
                    os.setxattr(self._proc_path(tdir, name), attr,
                                os.getxattr(self._proc_path(ldir, name), attr,
                                            follow_symlinks=False),
                                follow_symlinks=False)
                except OSError as exc:
                    log.warning("copy-up of %s: xattr %s not copied: %s",
                                "/".join(target), attr, exc.strerror)
            if kind != stat.S_IFLNK:
                os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=tdir)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=tdir,
                     follow_symlinks=False)
            return os.stat(name, dir_fd=tdir, follow_symlinks=False)
        finally:
            os.close(tdir)

    # -- whiteouts ----------------------------------------------------------------

    def _whiteout(self, e: TarEntry, parts: list[str], base: str) -> None:
        dparts = parts[:-1]
        if base == WHITEOUT_OPAQUE:
            dfd = self.dirs.get(dparts) if dparts else self.root_fd
            if self.overlay:
                os.setxattr(dfd, self.opts.opaque_xattr, b"y")
            else:
                self._clear_opaque(dfd, dparts)
            return
        hidden = base[len(WHITEOUT_PREFIX):]
        if hidden in ("", ".", ".."):
            raise InvalidArchive(f"whiteout of {hidden!r}", e.name)
        target = dparts + [hidden]
        pfd = self.dirs.get(dparts) if dparts else self.root_fd
        self.dirs.forget(target)
        remove_at(pfd, hidden)
        if self.overlay:
            os.mknod(hidden, stat.S_IFCHR, 0, dir_fd=pfd)
            if self.privileged:
                uid, gid = self._owner(e)
                if self._needs_chown(pfd, uid, gid):
                    os.chown(hidden, uid, gid, dir_fd=pfd, follow_symlinks=False)

    def _clear_opaque(self, dfd: int, dparts: list[str]) -> None:
        """Remove every entry under the directory not unpacked earlier from this tar."""
        prefix = "/".join(dparts)
        unpacked = self.unpacked
        with os.scandir(dfd) as it:
            children = [(d.name, d.is_dir(follow_symlinks=False)) for d in it]
        for name, is_dir in children:
            path = f"{prefix}/{name}" if prefix else name
            if path not in unpacked:
                self.dirs.forget(dparts + [name])
                remove_at(dfd, name)
            elif is_dir:
                sub = os.open(name, DIR_FLAGS, dir_fd=dfd)
                try:
                    self._clear_opaque(sub, dparts + [name])
                finally:
                    os.close(sub)

    # -- the end --------------------------------------------------------------------

    def _finish_dirs(self) -> None:
        """Set directory times again (filling them changed them), then modes that had
        to wait (directories an unprivileged process must keep writable)."""
        dirs = self.dirs
        for parts, atime, mtime in self.dir_times:
            try:
                fd = dirs.get(parts, create=False) if parts else self.root_fd
            except (FileNotFoundError, UnsafePath):
                continue  # replaced or removed later in the tar
            os.utime(fd, ns=(atime, mtime))
        final: dict[tuple[str, ...], int] = {}
        for parts, mode in self.dir_modes:  # the last word on a directory counts
            final[tuple(parts)] = mode
        # deepest first: a parent closed first could shut the way to its children
        for key in sorted(final, key=len, reverse=True):
            try:
                fd = dirs.get(list(key), create=False) if key else self.root_fd
            except (FileNotFoundError, UnsafePath):
                continue
            os.fchmod(fd, final[key])


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(fd: int, attr: str) -> bool:
    try:
        return os.getxattr(fd, attr) == b"y"
    except OSError:
        return False


def _listxattr(path: str) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
