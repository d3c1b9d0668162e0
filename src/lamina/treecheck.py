"""``check``'s look at each read-only layer's tree against the tar it was made from.

For every complete read-only layer made by ``apply_diff`` (it has a tar-split), the tree
the driver keeps (:meth:`lamina.drivers.base.Driver.content_tree`) is walked and
compared, entry by entry, with what the tar's headers say it must hold
(:mod:`lamina.layertree`): entries added or missing, and each entry's type, permission
bits (setuid included), owner, size, symlink target, device numbers and file
capability. With ``content`` the files that the DiffID check does not read are hashed
too (on vfs, the files a layer holds from its parents), and the size of a layer's own
files is left to the DiffID check, which names the file (one line per damage). The
walk reads metadata only otherwise, so ``check --fast`` stays fast, and still sees a
file whose size changed.

And on a driver that shows layers through overlayfs, an overlayfs xattr on any entry
(``trusted.overlay.*``, ``user.overlay.*``: redirects, metacopy, opaque marks) that the
driver did not set itself is reported: overlay would obey it, so files fail or show
what is not the layer's. The one such xattr a driver sets is the opaque mark of a
directory whose tar had ``.wh..wh..opq``, known from the tar-split.

vfs keeps each layer's whole chain, so its expected tree is the chain's tars replayed
in order; a layer whose chain holds a layer without a tar-split (made by ``create`` and
written through its view, or sealed) cannot be judged that way and is left out.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lamina.archive.apply import OVERLAY_PRIVATE_XATTRS
from lamina.archive.tar.crc64 import Crc64
from lamina.errors import LaminaError
from lamina.fs.relax import original_modes
from lamina.layertree import Replay, Want
from lamina.records import LayerRecord

if TYPE_CHECKING:
    from lamina.store import Store

#: differences reported per layer before the rest is summed up in one line
MAX_PER_LAYER = 50
_CAP = "security.capability"
_KIND_NAMES = {stat.S_IFREG: "a file", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink",
               stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket"}


@dataclass(frozen=True)
class Finding:
    """One difference: the layer, whether it is an overlayfs xattr, one line naming the path."""

    layer: str
    overlay_xattr: bool
    message: str


def check_trees(store: Store, records: Mapping[str, LayerRecord], *, content: bool) -> list[Finding]:
    """Every difference between the read-only layers' trees and their tars."""
    out: list[Finding] = []
    driver = store.driver
    for rec in records.values():
        if not rec.complete or rec.rw or not rec.has_tarsplit or not store.tarsplits.exists(rec.id):
            continue
        where = driver.content_tree(rec.id, rec.parent)
        if where is None or not where.path.is_dir():
            continue
        chain = _chain(rec, records) if where.whole_chain else [rec]
        if chain is None:
            continue
        try:
            replay = Replay(privileged=os.geteuid() == 0, uid_map=driver.ctx.uid_map,
                            gid_map=driver.ctx.gid_map,
                            drop_overlay_xattrs=driver.shows_through_overlayfs)
            for layer in reversed(chain):  # the base first
                with store.tarsplits.open(layer.id) as ts:
                    replay.apply(layer.id, ts, where.whiteouts if layer is rec else "delete")
            with driver.readable(rec.id):
                found = _Compare(rec.id, replay.tree, where.opaque_xattr, driver.shows_through_overlayfs,
                                 content=content).walk(where.path)
        except (LaminaError, OSError) as e:
            out.append(Finding(rec.id, False, f"its tree could not be checked against its tar: {e}"))
            continue
        if len(found) > MAX_PER_LAYER:
            more = len(found) - MAX_PER_LAYER
            found = found[:MAX_PER_LAYER] + [Finding(rec.id, False, f"... and {more} more differences")]
        out += found
    return out


def _chain(rec: LayerRecord, records: Mapping[str, LayerRecord]) -> list[LayerRecord] | None:
    """The layer and its ancestors, nearest first, if every one has a tar-split."""
    chain = []
    cur: LayerRecord | None = rec
    while cur is not None:
        if cur.rw or not cur.has_tarsplit:
            return None
        chain.append(cur)
        cur = records.get(cur.parent) if cur.parent else None
        if chain[-1].parent and cur is None:
            return None  # a lost parent: reported on its own
    return chain


class _Compare:
    """Walks one tree through directory descriptors and compares it with ``want``."""

    def __init__(self, layer: str, want: dict[tuple[str, ...], Want], opaque_xattr: str,
                 overlay: bool, *, content: bool) -> None:
        self.layer = layer
        self.want = want
        self.opaque_xattr = opaque_xattr
        self.overlay = overlay
        self.content = content
        self.privileged = os.geteuid() == 0
        self.found: list[Finding] = []
        self.widened = original_modes()

    def say(self, parts: tuple[str, ...], what: str, *, overlay_xattr: bool = False) -> None:
        self.found.append(Finding(self.layer, overlay_xattr, f"/{'/'.join(parts)}: {what}"))

    def walk(self, root: os.PathLike[str]) -> list[Finding]:
        seen: set[tuple[str, ...]] = set()
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack: list[tuple[int, tuple[str, ...]]] = [(top, ())]
        try:
            while stack:
                dfd, parts = stack.pop()
                try:
                    with os.scandir(dfd) as it:
                        entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
                    for name, st in sorted(entries):
                        path = (*parts, name)
                        seen.add(path)
                        self.entry(dfd, name, path, st)
                        if stat.S_ISDIR(st.st_mode) and self.want.get(path, _ANY_DIR).kind == stat.S_IFDIR:
                            try:
                                stack.append((os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                                      | os.O_CLOEXEC, dir_fd=dfd), path))
                            except PermissionError:
                                self.say(path, "cannot be read (permission denied)")
                finally:
                    os.close(dfd)
        finally:
            for dfd, _ in stack:
                os.close(dfd)
        seen.add(())
        for path, want in self.want.items():
            if path not in seen and not want.optional and path[:-1] in seen:
                self.say(path, f"missing (its tar made {_KIND_NAMES.get(want.kind or 0, 'a file')})")
        self.found.sort(key=lambda f: f.message)
        return self.found

    def entry(self, dfd: int, name: str, path: tuple[str, ...], st: os.stat_result) -> None:
        want = self.want.get(path)
        kind = stat.S_IFMT(st.st_mode)
        xattrs = _xattrs(dfd, name)
        self.overlay_xattrs(path, xattrs, want)
        if want is None:
            self.say(path, f"added ({_KIND_NAMES.get(kind, 'an entry')} its tar does not have)")
            return
        if want.kind is not None and want.kind != kind or want.kind is None and kind == stat.S_IFDIR:
            self.say(path, f"is {_KIND_NAMES.get(kind, 'an entry')}, its tar made "
                           f"{_KIND_NAMES.get(want.kind or 0, 'a file')}")
            return
        old = self.widened.get((st.st_dev, st.st_ino))
        mode = stat.S_IMODE(st.st_mode) if old is None else old
        if want.mode is not None and kind != stat.S_IFLNK and mode != want.mode:
            self.say(path, f"mode {mode:04o}, its tar says {want.mode:04o}")
        if want.uid is not None and (st.st_uid, st.st_gid) != (want.uid, want.gid):
            self.say(path, f"owner {st.st_uid}:{st.st_gid}, its tar says {want.uid}:{want.gid}")
        own_content = self.content and want.layer == self.layer  # the DiffID check reads it: said there
        if want.size is not None and kind == stat.S_IFREG and st.st_size != want.size and not own_content:
            self.say(path, f"size {st.st_size}, its tar says {want.size}")
        if want.link is not None and kind == stat.S_IFLNK:
            target = os.readlink(name, dir_fd=dfd)
            if target != want.link:
                self.say(path, f"points to {target!r}, its tar says {want.link!r}")
        if want.rdev is not None and kind in (stat.S_IFCHR, stat.S_IFBLK) and st.st_rdev != want.rdev:
            self.say(path, f"device {os.major(st.st_rdev)},{os.minor(st.st_rdev)}, its tar says "
                           f"{os.major(want.rdev)},{os.minor(want.rdev)}")
        if self.privileged and kind != stat.S_IFLNK and xattrs.get(_CAP) != want.xattrs.get(_CAP):
            have, told = _CAP in xattrs, _CAP in want.xattrs
            what = "added" if have and not told else "removed" if told and not have else "changed"
            self.say(path, f"file capability {what} ({_CAP}), unlike its tar")
        if (self.content and kind == stat.S_IFREG and want.crc is not None and want.layer != self.layer
                and not self.found_at(path)):
            if _crc(dfd, name) != want.crc:
                self.say(path, f"content differs from the tar of layer {want.layer}")

    def found_at(self, path: tuple[str, ...]) -> bool:
        prefix = f"/{'/'.join(path)}: "
        return any(f.message.startswith(prefix) for f in self.found)

    def overlay_xattrs(self, path: tuple[str, ...], xattrs: dict[str, bytes], want: Want | None) -> None:
        if not self.overlay:
            return
        for key, value in xattrs.items():
            if not key.startswith(OVERLAY_PRIVATE_XATTRS):
                continue
            if key == self.opaque_xattr and value == b"y" and want is not None and want.opaque:
                continue  # the driver's own mark for the tar's .wh..wh..opq
            self.say(path, f"overlayfs xattr {key} that the store did not set (overlay would obey it)",
                     overlay_xattr=True)


#: an unknown entry that is a directory: descended into, to report what it holds as added
_ANY_DIR = Want(stat.S_IFDIR)


def _xattrs(dfd: int, name: str) -> dict[str, bytes]:
    """The entry's overlayfs and capability xattrs (the ones compared)."""
    path = f"/proc/self/fd/{dfd}/{name}"
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOENT, errno.EACCES):
            return {}
        raise
    out = {}
    for key in names:
        if key == _CAP or key.startswith(OVERLAY_PRIVATE_XATTRS):
            try:
                out[key] = os.getxattr(path, key, follow_symlinks=False)
            except OSError:
                continue
    return out


def _crc(dfd: int, name: str) -> bytes:
    crc = Crc64()
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        while chunk := os.read(fd, 1 << 20):
            crc.update(chunk)
    finally:
        os.close(fd)
    return crc.digest()


__all__ = ["Finding", "MAX_PER_LAYER", "check_trees"]
