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
:mod:`lamina.archive.tarwriter`). Memory stays bounded: small entries gather in one
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from lamina.archive import tarwriter as tw
from lamina.archive.change import Change, ChangeKind
from lamina.errors import InvalidArchive, UnsupportedFilesystem

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
    options. One instance per stream."""

    def __init__(
        self,
        root: bytes,
        overlay: bool,
        opaque_xattr: str,
        uid_map: IDMap,
        gid_map: IDMap,
    ) -> None:
        #: the root with one trailing "/", ready to be joined with a tar name
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
        os_open, fstat, os_read, os_close = os.open, os.fstat, os.read, os.close
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        S_ISDIR = stat.S_ISDIR
        S_IFMT, S_IFREG = 0o170000, stat.S_IFREG
        big_file = _BIG_FILE
        stack = [(b"", iter(_entries(self.prefix)))]
        while stack:
            rel_prefix, entries = stack[-1]
            for entry in entries:
                rel = rel_prefix + entry.name
                path = entry.path
                fd = -1
                try:
                    if entry.is_file(follow_symlinks=False):
                        fd = os_open(path, flags)
                        st = fstat(fd)
                        if (
                            st.st_mode & S_IFMT == S_IFREG
                            and st.st_nlink == 1
                            and not list_fd(fd)
                            and not (mapped and entry.name.startswith(WHITEOUT_PREFIX))
                        ):
                            size = st.st_size
                            hdr = file_block(
                                rel,
                                st.st_mode,
                                st.st_uid if map_uid is None else map_uid(st.st_uid, rel),
                                st.st_gid if map_gid is None else map_gid(st.st_gid, rel),
                                size,
                                st.st_mtime_ns // 1_000_000_000,
                            )
                            if hdr is not None:
                                parts.append(hdr)
                                if size > big_file:
                                    sfd, fd = fd, -1  # _stream closes it
                                    yield from self._stream(sfd, size, path)
                                    continue
                                if size:
                                    data = os_read(fd, size)
                                    if len(data) < size:
                                        data = _read_rest(fd, data, size, path)
                                    parts.append(data)
                                    parts.append(pads[size & 511])
                                self.pending += 1023 + size  # near enough to decide a flush
                                if self.pending >= CHUNK:
                                    yield self._flush()
                                continue
                    else:
                        st = entry.stat(follow_symlinks=False)
                    big = add(rel, path, st, fd)
                    if big is not None:
                        yield from self._stream(*big)
                    elif self.pending >= CHUNK:
                        yield self._flush()
                except FileNotFoundError:
                    log.warning("export: %s vanished while being read; left out", os.fsdecode(path))
                    continue
                finally:
                    if fd >= 0:
                        os_close(fd)
                if S_ISDIR(st.st_mode):
                    try:
                        children = _entries(path + b"/")
                    except FileNotFoundError:
                        continue
                    stack.append((rel + b"/", iter(children)))
                    break
            else:
                stack.pop()
        self._put(tw.END_OF_ARCHIVE)
        yield self._flush()

    def changes(self, changes: Sequence[Change]) -> Iterator[bytes]:
        now = int(time.time())
        for change in sorted(changes, key=lambda c: os.fsencode(c.path)):
            rel = os.fsencode(change.path).strip(b"/")
            if not rel:
                continue  # the root itself is never an entry
            if change.kind == ChangeKind.DELETE:
                head, _, base = rel.rpartition(b"/")
                name = (head + b"/" if head else b"") + WHITEOUT_PREFIX + base
                self._put(tw.header(name, 0, 0, 0, 0, now, tw.REGTYPE))
            else:
                path = self.prefix + rel
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    log.warning("export: %s vanished since its change was seen; left out", change.path)
                    continue
                big = self.add(rel, path, st)
                if big is not None:
                    yield from self._stream(*big)
            if self.pending >= CHUNK:
                yield self._flush()
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

    # -- one entry ----------------------------------------------------------------

    def add(
        self, rel: bytes, path: bytes, st: os.stat_result, fd: int = -1
    ) -> tuple[int, int, bytes] | None:
        """Append the entry for ``path`` (tar name ``rel``, no trailing "/") to the buffer.

        ``fd``, if not -1, is ``path`` already open (the caller closes it). Small file
        data joins the buffer too. For a big regular file only the header is appended
        and ``(fd, size, path)`` is returned with a descriptor of its own: the caller
        streams the data (:meth:`_stream` closes it).
        """
        mode = st.st_mode
        fmt = stat.S_IFMT(mode)
        flag = _TYPEFLAG.get(fmt)
        if flag is None:
            if fmt == stat.S_IFSOCK:
                log.info("export: %s is a socket; sockets cannot go in a tar", os.fsdecode(path))
            else:
                log.warning("export: %s has an unknown file type %o; left out", os.fsdecode(path), fmt)
            return None

        rdev = st.st_rdev
        if self.overlay and fmt == stat.S_IFCHR and rdev == 0:
            # overlay whiteout -> .wh.NAME; kernel-made, so its owner is left unmapped
            head, _, base = rel.rpartition(b"/")
            name = (head + b"/" if head else b"") + WHITEOUT_PREFIX + base
            self._put(tw.header(name, 0o600, st.st_uid, st.st_gid, 0, st.st_mtime_ns // 1_000_000_000, tw.REGTYPE))
            return None

        uid, gid = st.st_uid, st.st_gid
        if not rel.rpartition(b"/")[2].startswith(WHITEOUT_PREFIX):
            if self.map_uid is not None:
                uid = self.map_uid(uid, rel)
            if self.map_gid is not None:
                gid = self.map_gid(gid, rel)

        xattrs, opaque = self._xattrs(path, fmt)
        mtime = st.st_mtime_ns // 1_000_000_000
        size = 0
        linkname = b""
        if fmt == stat.S_IFDIR:
            name = rel + b"/"
        else:
            name = rel
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                first = self.seen.get(key)
                if first is not None:
                    self._put(tw.header(name, mode, uid, gid, 0, mtime, tw.LNKTYPE, first, 0, 0, xattrs))
                    return None
                self.seen[key] = name
            if fmt == stat.S_IFREG:
                size = st.st_size
            elif fmt == stat.S_IFLNK:
                linkname = os.readlink(path)

        devmajor = devminor = 0
        if fmt == stat.S_IFCHR or fmt == stat.S_IFBLK:
            devmajor, devminor = os.major(rdev), os.minor(rdev)
        self._put(tw.header(name, mode, uid, gid, size, mtime, flag, linkname, devmajor, devminor, xattrs))

        if opaque:
            # Docker's marker keeps the directory's permission bits and owner; mtime 0
            self._put(tw.header(name + OPAQUE_MARKER, mode & 0o777, uid, gid, 0, 0, tw.REGTYPE))
        if size:
            own = fd < 0
            if own:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            if size > _BIG_FILE:
                return (fd if own else os.dup(fd)), size, path
            try:
                data = os.read(fd, size)
                if len(data) < size:
                    data = _read_rest(fd, data, size, path)
            finally:
                if own:
                    os.close(fd)
            self._put(data)
            self._put(tw.padding(size))
        return None

    def _stream(self, fd: int, size: int, path: bytes) -> Iterator[bytes]:
        """Yield the pending buffer, then a big file's data in CHUNK reads, then keep its
        padding in the buffer. A file that shrank since its lstat is padded with zeros,
        one that grew is cut, so the header stays true."""
        try:
            if self.parts:
                yield self._flush()
            left = size
            while left:
                data = os.read(fd, CHUNK if left > CHUNK else left)
                if not data:
                    log.warning("export: %s shrank while being read; padded with zeros", os.fsdecode(path))
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

    def _xattrs(self, path: bytes, fmt: int) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The exported xattrs of ``path`` as sorted ``(name, value)`` pairs, and whether
        it is an opaque directory (overlay mode)."""
        if not self.xattrs_supported:
            return [], False
        try:
            names = os.listxattr(path, follow_symlinks=False)
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
                    opaque = opaque or self._overlay_mark(path, xname, fmt)
                continue
            if not xname.startswith(_XATTR_EXPORTED):
                continue
            try:
                value = os.getxattr(path, xname, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENODATA:  # removed between list and get
                    continue
                raise
            if xname == _CAP_XATTR and len(value) > 3 and value[3] == _VFS_CAP_REVISION_3:
                value = value[:3] + bytes([_VFS_CAP_REVISION_2]) + value[4:_VFS_CAP_V2_SIZE]
            out.append((os.fsencode(xname), value))
        return out, opaque

    def _overlay_mark(self, path: bytes, xname: str, fmt: int) -> bool:
        """Read one of overlayfs's own xattrs on an upper entry: True for the opaque mark
        on a directory. Redirects and metacopy marks mean the upper directory alone does
        not hold the layer (renamed directories, data left in a lower layer), so a
        native export would be wrong; refuse so the caller can diff the mounted views."""
        if xname == self.opaque_xattr:
            return fmt == stat.S_IFDIR and os.getxattr(path, xname, follow_symlinks=False) == b"y"
        kind = xname[len(self.overlay_ns):]
        if kind in ("redirect", "metacopy"):
            raise UnsupportedFilesystem(
                f"{os.fsdecode(path)}: overlay {kind} mark; the upper directory alone cannot be exported"
            )
        return False


def _entries(path: bytes) -> list[os.DirEntry[bytes]]:
    """A directory's entries sorted by name as bytes (Go's WalkDir order)."""
    with os.scandir(path) as it:
        entries = list(it)
    entries.sort(key=_entry_name)
    return entries


def _entry_name(entry: os.DirEntry[bytes]) -> bytes:
    return entry.name


def _read_rest(fd: int, data: bytes, size: int, path: bytes) -> bytes:
    """Finish a short read of ``size`` bytes; a file that shrank is padded with zeros,
    so the header written before stays true."""
    parts = [data]
    got = len(data)
    while got < size:
        more = os.read(fd, size - got)
        if not more:
            log.warning("export: %s shrank while being read; padded with zeros", os.fsdecode(path))
            parts.append(bytes(size - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
