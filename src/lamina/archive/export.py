"""Writing layer tars: a whole tree (:func:`tar_tree`) or a changes list
(:func:`tar_changes`), streamed as chunks.

The format matches Docker's ``archive.Tar`` / ``ExportChanges`` (pkg/archive): names
relative to the root with no leading "/" or "./", directories ending in "/", entries in
lexical depth-first order (each directory's names sorted as bytes), mtimes cut to whole
seconds, no atime/ctime, numeric ownership only (no user-name lookups), the mode field
carrying the file-type bits as Docker's ``FileInfoHeader`` writes them, a second name of
a hardlinked inode written as a link to the first, sockets skipped. Xattrs travel as
``SCHILY.xattr.*`` PAX records: every ``user.``, ``security.`` and ``trusted.`` one
except overlayfs's own bookkeeping (``trusted.overlay.*`` / ``user.overlay.*``). Docker
exports ``security.capability`` alone; lamina keeps the others too, so that what a
layer was applied with (the apply engine sets every ``SCHILY.xattr``) comes back out.
Like Docker, a revision-3 capability (it names a user namespace's root) goes out as
revision 2.

With ``whiteouts="overlay"`` the tree is an overlay upper directory and its whiteouts are
turned into the tar form (Docker's overlay ``ConvertWrite``): a 0/0 character device
becomes a ``.wh.NAME`` file, an opaque directory is followed by ``DIR/.wh..wh..opq``.

Why hand-built headers and raw ``os.read``: the cost of an export is per entry, and
:mod:`tarfile` spends far more per entry than the system calls do (see
:mod:`lamina.archive.tar.writer`). Memory stays bounded: small entries gather in one
buffer flushed at about 1 MiB, big files pass through in 1 MiB reads. The buffer is a
list of pieces joined once per flush: appending to a ``bytearray`` that is cleared after
each flush re-grows it in small steps, copying it dozens of times per megabyte.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from lamina.archive.change import Change, ChangeKind
from lamina.archive.tar import writer as tw
from lamina.errors import InvalidArchive, UnsupportedFilesystem
from lamina.fs.relax import original_modes
from lamina.fs.safepath import UnsafePath, clean_parts, open_dir

log = logging.getLogger(__name__)

IDMap = Sequence[tuple[int, int, int]]

#: chunks are yielded once the pending output reaches this size
CHUNK = 1 << 20
#: files bigger than this are streamed in CHUNK reads instead of joining the buffer
_BIG_FILE = 256 << 10

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

_XATTR_EXPORTED = ("user.", "security.", "trusted.")
_XATTR_OVERLAY = ("trusted.overlay.", "user.overlay.")

#: Linux's VFS_CAP_REVISION_3 capability xattr carries the user namespace's root uid,
#: meaningless outside it; Docker rewrites it to revision 2 (first 20 bytes) on export
_CAP_XATTR = "security.capability"
_VFS_CAP_REVISION_2 = 0x02
_VFS_CAP_REVISION_3 = 0x03
_VFS_CAP_V2_SIZE = 20

#: regular files: never follow, never block (a fifo swapped in), never a tty
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_TYPEFLAG = {
    stat.S_IFREG: tw.REGTYPE,
    stat.S_IFDIR: tw.DIRTYPE,
    stat.S_IFLNK: tw.SYMTYPE,
    stat.S_IFCHR: tw.CHRTYPE,
    stat.S_IFBLK: tw.BLKTYPE,
    stat.S_IFIFO: tw.FIFOTYPE,
}


def tar_tree(
    root: Path,
    *,
    whiteouts: Literal["none", "overlay"] = "none",
    opaque_xattr: str = "trusted.overlay.opaque",
    uid_map: IDMap = (),
    gid_map: IDMap = (),
) -> Iterator[bytes]:
    """The whole tree under ``root`` (not ``root`` itself) as a tar, in chunks.

    ``uid_map``/``gid_map`` are Docker ID maps ``(container_id, host_id, size)``; owners
    are mapped host -> container. ``whiteouts="overlay"`` reads ``root`` as an overlay
    upper directory (see the module text); ``opaque_xattr`` names the opaque mark
    (``user.overlay.opaque`` for rootless overlay).
    """
    if whiteouts not in ("none", "overlay"):
        raise ValueError(f"whiteouts must be 'none' or 'overlay', not {whiteouts!r}")
    w = _TarWriter(
        os.fsencode(root), whiteouts == "overlay", opaque_xattr, uid_map, gid_map
    )
    return w.tree()


def tar_changes(
    root: Path,
    changes: Sequence[Change],
    *,
    uid_map: IDMap = (),
    gid_map: IDMap = (),
) -> Iterator[bytes]:
    """Docker's ``ExportChanges``: the changes of ``root`` as a layer tar, in chunks.

    Changes go out sorted by path. A Delete becomes a whiteout entry
    ``<dir>/.wh.<base>`` (regular, size 0, mode 0, owner 0:0, stamped now); any other
    change adds the entry found at its path in ``root``, not what lies under it (a
    changed directory's children have changes of their own). An entry that vanished
    since the changes were computed (a live container) is logged and left out.
    """
    w = _TarWriter(os.fsencode(root), False, "", uid_map, gid_map)
    return w.changes(changes)


def host_to_container(idmap: IDMap, what: str) -> Callable[[int, bytes], int] | None:
    """A function mapping a host id to the container id under ``idmap``, or None for
    the identity (empty map). An id outside every range cannot go into the tar."""
    if not idmap:
        return None
    ranges = [(host, host + size, container) for container, host, size in idmap]

    def to_container(host_id: int, name: bytes) -> int:
        for lo, hi, container in ranges:
            if lo <= host_id < hi:
                return container + host_id - lo
        raise InvalidArchive(
            f"host {what} {host_id} has no container {what} in the ID map",
            os.fsdecode(name),
        )

    return to_container


class _TarWriter:
    """The state of one export: the output buffer, inodes seen (for hardlinks), and the
    options. One instance per stream.

    Entries are reached from directory descriptors, never by re-resolving a path: each
    directory of the walk is opened with ``O_NOFOLLOW`` from its parent's descriptor,
    and each entry is opened, stat'ed and read relative to that descriptor. A live tree
    (a running container) that swaps a directory for a symlink mid-walk therefore
    cannot lead the export outside the root. Xattrs of entries that cannot be opened
    (symlinks, devices, fifos) are read through ``/proc/self/fd/<dir>/<name>``.
    """

    def __init__(
        self,
        root: bytes,
        overlay: bool,
        opaque_xattr: str,
        uid_map: IDMap,
        gid_map: IDMap,
    ) -> None:
        self.root = root
        #: the root with one trailing "/", for messages
        self.prefix = root.rstrip(b"/") + b"/"
        self.overlay = overlay
        self.opaque_xattr = opaque_xattr
        # overlayfs's own xattrs share the opaque mark's namespace: a rename or a
        # metadata-only copy-up leaves marks this export cannot represent
        self.overlay_ns = opaque_xattr.rsplit(".", 1)[0] + "." if overlay else ""
        self.map_uid = host_to_container(uid_map, "uid")
        self.map_gid = host_to_container(gid_map, "gid")
        #: pending output pieces and their total size (joined and yielded at CHUNK)
        self.parts: list[bytes] = []
        self.pending = 0
        #: (st_dev, st_ino) -> the first name written for an inode with several links
        self.seen: dict[tuple[int, int], bytes] = {}
        self.xattrs_supported = True
        self.proc_fd = os.path.isdir("/proc/self/fd")

    # -- walks ------------------------------------------------------------------

    def tree(self) -> Iterator[bytes]:
        """Depth-first, each directory's names in byte order, like Go's WalkDir.

        A regular file (known from the directory entry's type, no lstat) takes the fast
        path: open, fstat and flistxattr on the descriptor (cheaper than by path), and a
        plain ustar header. Everything else goes through :meth:`add`.
        """
        parts = self.parts
        add = self.add
        map_uid, map_gid = self.map_uid, self.map_gid
        mapped = map_uid is not None or map_gid is not None
        list_fd = self._list_fd
        file_block = tw.file_block
        pads = tw.PADDING
        os_open, fstat, os_read, os_close, lstat = os.open, os.fstat, os.read, os.close, os.lstat
        flags = _FILE_FLAGS
        S_ISDIR = stat.S_ISDIR
        S_IFMT, S_IFREG = 0o170000, stat.S_IFREG
        big_file = _BIG_FILE
        widened = original_modes()  # entries an unprivileged reader widened: their true modes
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack: list[tuple[bytes, int, Iterator[tuple[bytes, os.DirEntry[str]]]]] = []
        try:
            stack.append((b"", root_fd, iter(_entries(root_fd))))
        except BaseException:
            os_close(root_fd)
            raise
        try:
            while stack:
                rel_prefix, dfd, entries = stack[-1]
                for name, entry in entries:
                    rel = rel_prefix + name
                    fd = -1
                    try:
                        if entry.is_file(follow_symlinks=False):
                            fd = os_open(name, flags, dir_fd=dfd)
                            st = fstat(fd)
                            if (
                                st.st_mode & S_IFMT == S_IFREG
                                and st.st_nlink == 1
                                and not list_fd(fd)
                                and not (mapped and name.startswith(WHITEOUT_PREFIX))
                            ):
                                size = st.st_size
                                hdr = file_block(
                                    rel,
                                    st.st_mode if not widened else _true_mode(st, widened),
                                    st.st_uid if map_uid is None else map_uid(st.st_uid, rel),
                                    st.st_gid if map_gid is None else map_gid(st.st_gid, rel),
                                    size,
                                    st.st_mtime_ns // 1_000_000_000,
                                )
                                if hdr is not None:
                                    parts.append(hdr)
                                    if size > big_file:
                                        sfd, fd = fd, -1  # _stream closes it
                                        yield from self._stream(sfd, size, rel)
                                        continue
                                    if size:
                                        data = os_read(fd, size)
                                        if len(data) < size:
                                            data = _read_rest(fd, data, size, rel)
                                        parts.append(data)
                                        parts.append(pads[size & 511])
                                    self.pending += 1023 + size  # near enough to decide a flush
                                    if self.pending >= CHUNK:
                                        yield self._flush()
                                    continue
                        elif entry.is_dir(follow_symlinks=False):
                            try:
                                fd = os_open(name, _DIR_FLAGS, dir_fd=dfd)
                                st = fstat(fd)
                            except OSError as e:
                                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                                    raise
                                st = lstat(name, dir_fd=dfd)  # no longer a directory
                        else:
                            st = lstat(name, dir_fd=dfd)
                        big = add(rel, dfd, name, st, fd)
                        if big is not None:
                            yield from self._stream(*big)
                        elif self.pending >= CHUNK:
                            yield self._flush()
                        if fd >= 0 and S_ISDIR(st.st_mode):
                            children = _entries(fd)
                            stack.append((rel + b"/", fd, iter(children)))
                            fd = -1  # the stack owns it now
                            break
                    except FileNotFoundError:
                        log.warning("export: %s vanished while being read; left out", self._shown(rel))
                    finally:
                        if fd >= 0:
                            os_close(fd)
                else:
                    stack.pop()
                    os_close(dfd)
        finally:
            for _, dfd, _ in stack:
                os_close(dfd)
        self._put(tw.END_OF_ARCHIVE)
        yield self._flush()

    def changes(self, changes: Sequence[Change]) -> Iterator[bytes]:
        now = int(time.time())
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        parent: tuple[bytes, int] = (b"", os.dup(root_fd))  # the last parent dir opened
        try:
            for change in sorted(changes, key=lambda c: os.fsencode(c.path)):
                rel = os.fsencode(change.path).strip(b"/")
                if not rel:
                    continue  # the root itself is never an entry
                head, _, base = rel.rpartition(b"/")
                if change.kind == ChangeKind.DELETE:
                    name = (head + b"/" if head else b"") + WHITEOUT_PREFIX + base
                    self._put(tw.header(name, 0, 0, 0, 0, now, tw.REGTYPE))
                else:
                    try:
                        if parent[0] != head:
                            fd = open_dir(root_fd, clean_parts(os.fsdecode(head)))
                            os.close(parent[1])
                            parent = (head, fd)
                        st = os.lstat(base, dir_fd=parent[1])
                        big = self.add(rel, parent[1], base, st)
                    except (FileNotFoundError, UnsafePath) as e:
                        # a live tree changed since the changes were computed
                        log.warning("export: %s left out: %s", change.path, e)
                        continue
                    if big is not None:
                        yield from self._stream(*big)
                if self.pending >= CHUNK:
                    yield self._flush()
        finally:
            os.close(parent[1])
            os.close(root_fd)
        self._put(tw.END_OF_ARCHIVE)
        yield self._flush()

    def _put(self, piece: bytes) -> None:
        self.parts.append(piece)
        self.pending += len(piece)

    def _flush(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        self.pending = 0
        return out

    def _shown(self, rel: bytes) -> str:
        """An entry's full path, for messages."""
        return os.fsdecode(self.prefix + rel)

    # -- one entry ----------------------------------------------------------------

    def add(
        self, rel: bytes, dfd: int, name: bytes, st: os.stat_result, fd: int = -1
    ) -> tuple[int, int, bytes] | None:
        """Append the entry ``name`` of directory ``dfd`` (tar name ``rel``, without a
        trailing "/"; ``st`` its lstat) to the buffer.

        ``fd``, if not -1, is the entry already open (the caller closes it). Small file
        data joins the buffer too. For a big regular file only the header is appended
        and ``(fd, size, rel)`` is returned with a descriptor of its own: the caller
        streams the data (:meth:`_stream` closes it).
        """
        widened = original_modes()
        mode = st.st_mode if not widened else _true_mode(st, widened)
        fmt = stat.S_IFMT(mode)
        flag = _TYPEFLAG.get(fmt)
        if flag is None:
            if fmt == stat.S_IFSOCK:
                log.info("export: %s is a socket; sockets cannot go in a tar", self._shown(rel))
            else:
                log.warning("export: %s has an unknown file type %o; left out", self._shown(rel), fmt)
            return None

        rdev = st.st_rdev
        if self.overlay and fmt == stat.S_IFCHR and rdev == 0:
            # overlay whiteout -> .wh.NAME; kernel-made, so its owner is left unmapped
            head, _, base = rel.rpartition(b"/")
            wname = (head + b"/" if head else b"") + WHITEOUT_PREFIX + base
            self._put(tw.header(wname, 0o600, st.st_uid, st.st_gid, 0, st.st_mtime_ns // 1_000_000_000, tw.REGTYPE))
            return None

        uid, gid = st.st_uid, st.st_gid
        if not name.startswith(WHITEOUT_PREFIX):
            if self.map_uid is not None:
                uid = self.map_uid(uid, rel)
            if self.map_gid is not None:
                gid = self.map_gid(gid, rel)

        xattrs, opaque = self._xattrs(fd if fd >= 0 else self._xattr_path(dfd, name, rel), fmt, rel)
        mtime = st.st_mtime_ns // 1_000_000_000
        size = 0
        linkname = b""
        if fmt == stat.S_IFDIR:
            tname = rel + b"/"
        else:
            tname = rel
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                first = self.seen.get(key)
                if first is not None:
                    self._put(tw.header(tname, mode, uid, gid, 0, mtime, tw.LNKTYPE, first, 0, 0, xattrs))
                    return None
                self.seen[key] = tname
            if fmt == stat.S_IFREG:
                size = st.st_size
            elif fmt == stat.S_IFLNK:
                linkname = os.readlink(name, dir_fd=dfd)

        devmajor = devminor = 0
        if fmt == stat.S_IFCHR or fmt == stat.S_IFBLK:
            devmajor, devminor = os.major(rdev), os.minor(rdev)
        self._put(tw.header(tname, mode, uid, gid, size, mtime, flag, linkname, devmajor, devminor, xattrs))

        if opaque:
            # Docker's marker keeps the directory's permission bits and owner; mtime 0
            self._put(tw.header(tname + OPAQUE_MARKER, mode & 0o777, uid, gid, 0, 0, tw.REGTYPE))
        if size:
            own = fd < 0
            if own:
                fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
            if size > _BIG_FILE:
                return (fd if own else os.dup(fd)), size, rel
            try:
                data = os.read(fd, size)
                if len(data) < size:
                    data = _read_rest(fd, data, size, rel)
            finally:
                if own:
                    os.close(fd)
            self._put(data)
            self._put(tw.padding(size))
        return None

    def _stream(self, fd: int, size: int, rel: bytes) -> Iterator[bytes]:
        """Yield the pending buffer, then a big file's data in CHUNK reads, then keep its
        padding in the buffer. A file that shrank since its stat is padded with zeros,
        one that grew is cut, so the header stays true."""
        try:
            if self.parts:
                yield self._flush()
            left = size
            while left:
                data = os.read(fd, CHUNK if left > CHUNK else left)
                if not data:
                    log.warning("export: %s shrank while being read; padded with zeros", self._shown(rel))
                    while left:
                        n = CHUNK if left > CHUNK else left
                        yield bytes(n)
                        left -= n
                    break
                left -= len(data)
                yield data
        finally:
            os.close(fd)
        self._put(tw.padding(size))

    def _xattr_path(self, dfd: int, name: bytes, rel: bytes) -> bytes:
        """A path naming entry ``name`` of ``dfd`` for the l*xattr calls, which take no
        directory descriptor: through /proc the directory stays the one we hold."""
        if self.proc_fd:
            return b"/proc/self/fd/%d/%s" % (dfd, name)
        return self.prefix + rel

    def _list_fd(self, fd: int) -> list[str]:
        """flistxattr, or [] where the filesystem has no xattrs (remembered)."""
        if not self.xattrs_supported:
            return []
        try:
            return os.listxattr(fd)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.xattrs_supported = False
            return []

    def _xattrs(self, target: int | bytes, fmt: int, rel: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The exported xattrs of ``target`` (an open fd, or a path not to follow) as
        sorted ``(name, value)`` pairs, and whether it is an opaque directory (overlay
        mode)."""
        if not self.xattrs_supported:
            return [], False
        follow = {} if isinstance(target, int) else {"follow_symlinks": False}
        try:
            names = os.listxattr(target, **follow)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):  # the filesystem has none
                self.xattrs_supported = False
                return [], False
            if e.errno == errno.ENOENT:
                return [], False
            raise
        if not names:
            return [], False
        out: list[tuple[bytes, bytes]] = []
        opaque = False
        for xname in sorted(names):
            if xname.startswith(_XATTR_OVERLAY):
                if self.overlay and xname.startswith(self.overlay_ns):
                    opaque = self._overlay_mark(target, follow, xname, fmt, rel) or opaque
                continue
            if not xname.startswith(_XATTR_EXPORTED):
                continue
            try:
                value = os.getxattr(target, xname, **follow)
            except OSError as e:
                if e.errno == errno.ENODATA:  # removed between list and get
                    continue
                raise
            if xname == _CAP_XATTR and len(value) > 3 and value[3] == _VFS_CAP_REVISION_3:
                value = value[:3] + bytes([_VFS_CAP_REVISION_2]) + value[4:_VFS_CAP_V2_SIZE]
            out.append((os.fsencode(xname), value))
        return out, opaque

    def _overlay_mark(self, target: int | bytes, follow: dict[str, bool], xname: str, fmt: int,
                      rel: bytes) -> bool:
        """Read one of overlayfs's own xattrs on an upper entry: True for the opaque mark
        on a directory. Redirects and metacopy marks mean the upper directory alone does
        not hold the layer (renamed directories, data left in a lower layer), so a
        native export would be wrong; refuse so the caller can diff the mounted views."""
        if xname == self.opaque_xattr:
            return fmt == stat.S_IFDIR and os.getxattr(target, xname, **follow) == b"y"
        kind = xname[len(self.overlay_ns):]
        if kind in ("redirect", "metacopy"):
            raise UnsupportedFilesystem(
                f"{self._shown(rel)}: overlay {kind} mark; the upper directory alone cannot be exported"
            )
        return False


def _true_mode(st: os.stat_result, widened: Mapping[tuple[int, int], int]) -> int:
    """``st_mode`` with the permission bits it had before a reader widened them
    (:func:`lamina.fs.relax.readable_tree`), so the tar says what the layer holds."""
    old = widened.get((st.st_dev, st.st_ino))
    return st.st_mode if old is None else stat.S_IFMT(st.st_mode) | old


def _entries(dir_fd: int) -> list[tuple[bytes, os.DirEntry[str]]]:
    """A directory's entries with their names as bytes, sorted by those bytes (Go's
    WalkDir order; str order differs for names that are not UTF-8)."""
    fsencode = os.fsencode
    with os.scandir(dir_fd) as it:
        entries = [(fsencode(e.name), e) for e in it]
    entries.sort(key=_first)
    return entries


def _first(pair: tuple[bytes, object]) -> bytes:
    return pair[0]


def _read_rest(fd: int, data: bytes, size: int, rel: bytes) -> bytes:
    """Finish a short read of ``size`` bytes; a file that shrank is padded with zeros,
    so the header written before stays true."""
    parts = [data]
    got = len(data)
    while got < size:
        more = os.read(fd, size - got)
        if not more:
            log.warning("export: %s shrank while being read; padded with zeros", os.fsdecode(rel))
            parts.append(bytes(size - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
