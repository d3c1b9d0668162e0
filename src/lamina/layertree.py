"""What a layer's tree must hold, worked out from its tar-split (the tar's own headers).

Why: ``check`` used to compare a read-only layer with its tar only by rebuilding the tar
from the files and hashing it against the DiffID; that reads file *contents* by the
names the tar gave, so a file added beside them, a ``chmod 4755`` or a ``chown`` went
unseen. A tar-split keeps every header, so the tree the tar made can be replayed
entry by entry, the way :mod:`lamina.archive.apply` made it, into a map of path ->
:class:`Want`, and the tree on disk compared with it (:mod:`lamina.treecheck`).

The replay follows apply's rules: whiteouts deleted (``"delete"``: vfs, and overlay's
base layers) or kept as overlay's 0/0 devices and opaque marks (``"overlay"``);
parent directories the tar does not list are 0755 and the mapped root's; a hard link
shares its target's inode and gives it the link header's metadata; devices are made
only by a privileged apply; overlayfs's own xattrs are never set where the driver
drops them. What the replay cannot know (the metadata of a directory an overlay apply
copied up from a lower layer for a hard link) is left unchecked (None).
"""

from __future__ import annotations

import binascii
import io
import json
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Literal

from lamina.archive.apply import OVERLAY_PRIVATE_XATTRS
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
from lamina.errors import InvalidArchive
from lamina.fs.safepath import UnsafePath, clean_parts

IDMap = Sequence[tuple[int, int, int]]
_KINDS = {REG: stat.S_IFREG, DIR: stat.S_IFDIR, SYM: stat.S_IFLNK, CHR: stat.S_IFCHR,
          BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_ZEROS = bytes(1 << 20)


@dataclass
class Want:
    """What one path of the tree must be; None: not known, not checked."""

    #: stat.S_IFMT of the entry; None: any non-directory (a hard link target copied up)
    kind: int | None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    link: str | None = None
    rdev: int | None = None
    #: the tar's SCHILY.xattr records as apply set them
    xattrs: dict[str, bytes] = field(default_factory=dict)
    #: CRC-64 of a regular file's content, from the tar-split
    crc: bytes | None = None
    #: which layer's tar made it (vfs trees hold their whole chain)
    layer: str = ""
    #: the driver marks it opaque (overlay mode, ``.wh..wh..opq``)
    opaque: bool = False
    #: may be absent (a device an unprivileged apply did not make)
    optional: bool = False


@dataclass
class Replay:
    """The tree of one or more tars applied in order (a chain, base first)."""

    privileged: bool
    uid_map: IDMap = ()
    gid_map: IDMap = ()
    drop_overlay_xattrs: bool = False
    tree: dict[tuple[str, ...], Want] = field(default_factory=dict)

    def apply(self, layer: str, tarsplit: IO[bytes], whiteouts: Literal["delete", "overlay"]) -> None:
        """Replay one layer's tar-split onto the tree."""
        crcs: list[bytes | None] = []
        reader = TarReader(_Skeleton(_records(tarsplit, layer), crcs))
        unpacked: set[tuple[str, ...]] = set()
        #: files whose CRC is read later: the reader runs ahead of the records' order
        files: list[tuple[int, Want]] = []
        for index, e in enumerate(reader):
            if e.type == GLOBAL:
                continue
            try:
                parts = tuple(clean_parts(e.name))
            except UnsafePath:
                continue  # apply refused it: the layer would not exist
            if not parts:
                continue  # the layer root: not checked
            first = parts[0]
            if first.startswith(".wh..wh.") and not (len(parts) == 1 and first == ".wh..wh..opq"):
                continue  # AUFS metadata, skipped by apply
            base = parts[-1]
            if base.startswith(".wh."):
                self._whiteout(parts, base, whiteouts, unpacked, e.uid, e.gid, layer)
                continue
            self._implied(parts[:-1], layer)
            want = self._want(e, layer)
            if want is not None and want.size:
                files.append((index, want))
            if e.type == LNK:
                self._hardlink(parts, e, layer)
            elif e.type == DIR and self._is_dir(parts):
                old = self.tree[parts]
                old.mode, old.uid, old.gid, old.layer = want.mode, want.uid, want.gid, layer
                old.xattrs.update(want.xattrs)
            elif want is not None:
                self._drop(parts)
                self.tree[parts] = want
            if whiteouts == "delete":
                unpacked.add(parts)
        for index, want in files:  # every record has been read now
            want.crc = crcs[index] if index < len(crcs) else None

    # -- entries ---------------------------------------------------------------------------

    def _owner(self, uid: int, gid: int) -> tuple[int | None, int | None]:
        if not self.privileged:
            return None, None  # an unprivileged apply leaves the applier's own
        return _mapped(self.uid_map, uid), _mapped(self.gid_map, gid)

    def _xattrs(self, e: TarEntry) -> dict[str, bytes]:
        xattrs = dict(e.xattrs or {})
        if self.drop_overlay_xattrs:
            xattrs = {k: v for k, v in xattrs.items() if not k.startswith(OVERLAY_PRIVATE_XATTRS)}
        if not self.privileged:  # what only a privileged process may set was not set
            xattrs = {k: v for k, v in xattrs.items() if k.startswith("user.")}
        return xattrs

    def _want(self, e: TarEntry, layer: str) -> Want | None:
        t = e.type
        kind = _KINDS.get(t)
        uid, gid = self._owner(e.uid, e.gid)
        mode = e.mode & 0o7777
        xattrs = self._xattrs(e)
        if t == LNK:
            return None
        if kind is None:
            return None  # apply refuses what Linux has no file for
        if t in (CHR, BLK):
            if not self.privileged:
                return None  # not made unprivileged (as Docker in a user namespace)
            return Want(kind, mode, uid, gid, rdev=os.makedev(e.devmajor, e.devminor),
                        xattrs=xattrs, layer=layer, optional=True)
        if t == SYM:
            return Want(kind, None, uid, gid, link=e.linkname, xattrs=xattrs, layer=layer)
        size = e.size if t == REG else None
        return Want(kind, mode, uid, gid, size=size, xattrs=xattrs, layer=layer)

    def _hardlink(self, parts: tuple[str, ...], e: TarEntry, layer: str) -> None:
        try:
            target = tuple(clean_parts(e.linkname))
        except UnsafePath:
            return
        want = self.tree.get(target)
        if want is None:  # overlay: copied up from a lower layer, parents too
            self._implied(target[:-1], layer, known=False)
            want = Want(None, layer=layer)
            self.tree[target] = want
        uid, gid = self._owner(e.uid, e.gid)
        # the link header's metadata goes to the shared inode, as apply sets it
        if want.kind != stat.S_IFLNK:
            want.mode = e.mode & 0o7777
        if uid is not None:
            want.uid, want.gid = uid, gid
        want.xattrs.update(self._xattrs(e))
        self._drop(parts)
        self.tree[parts] = want

    def _whiteout(self, parts: tuple[str, ...], base: str, whiteouts: str, unpacked: set[tuple[str, ...]],
                  uid: int, gid: int, layer: str) -> None:
        dparts = parts[:-1]
        self._implied(dparts, layer)
        if base == ".wh..wh..opq":
            if whiteouts == "overlay":
                if dparts:
                    self.tree[dparts].opaque = True
                return
            for p in [p for p in self.tree if p[:len(dparts)] == dparts and len(p) > len(dparts)]:
                if p[:len(dparts) + 1] not in unpacked and p in self.tree:
                    self._drop(p[:len(dparts) + 1])
            return
        target = (*dparts, base[4:])
        self._drop(target)
        if whiteouts == "overlay":
            o_uid, o_gid = self._owner(uid, gid)
            self.tree[target] = Want(stat.S_IFCHR, None, o_uid, o_gid, rdev=0, layer=layer)

    def _implied(self, dparts: tuple[str, ...], layer: str, *, known: bool = True) -> None:
        """Parent directories the tar did not list: 0755, the mapped root's."""
        uid, gid = self._owner(0, 0)
        for i in range(1, len(dparts) + 1):
            p = dparts[:i]
            if p not in self.tree:
                self.tree[p] = (Want(stat.S_IFDIR, 0o755, uid, gid, layer=layer) if known
                                else Want(stat.S_IFDIR, layer=layer))

    def _is_dir(self, parts: tuple[str, ...]) -> bool:
        want = self.tree.get(parts)
        return want is not None and want.kind == stat.S_IFDIR

    def _drop(self, parts: tuple[str, ...]) -> None:
        """Forget ``parts`` and everything below it."""
        want = self.tree.pop(parts, None)
        if want is None or want.kind != stat.S_IFDIR:
            return  # no subtree: the common case costs one lookup
        n = len(parts)
        for p in [p for p in self.tree if len(p) > n and p[:n] == parts]:
            del self.tree[p]


def _mapped(idmap: IDMap, value: int) -> int | None:
    if not idmap:
        return value
    for container, host, size in idmap:
        if container <= value < container + size:
            return host + value - container
    return None


# -- the tar with its content left out ------------------------------------------------------


def _records(tarsplit: IO[bytes], layer: str) -> Iterator[dict]:
    for number, line in enumerate(tarsplit, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            raise InvalidArchive(f"layer {layer}: tar-split record {number} is not JSON") from None
        if not isinstance(obj, dict):
            raise InvalidArchive(f"layer {layer}: tar-split record {number} is not a JSON object")
        yield obj


def _b64(value: object) -> bytes:
    if not isinstance(value, str):
        return b""
    try:
        return binascii.a2b_base64(value)
    except binascii.Error:
        raise InvalidArchive("tar-split payload is not base64") from None


class _Skeleton(io.RawIOBase):
    """The tar a tar-split describes, each file's content read as zeros (only the
    headers matter here); each file's CRC-64 is appended to ``crcs`` in tar order."""

    def __init__(self, records: Iterator[dict], crcs: list[bytes | None]) -> None:
        super().__init__()
        self._pieces = self._gen(records, crcs)
        self._piece: memoryview | int = memoryview(b"")

    @staticmethod
    def _gen(records: Iterator[dict], crcs: list[bytes | None]) -> Iterator[bytes | int]:
        for obj in records:
            if obj.get("type") == 2:
                yield _b64(obj.get("payload"))
            elif obj.get("type") == 1:
                size = obj.get("size") or 0
                crcs.append(_b64(obj.get("payload")) or None)
                if isinstance(size, int) and size > 0:
                    yield size

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while True:
            piece = self._piece
            if isinstance(piece, int) and piece > 0:
                n = min(piece, len(b), len(_ZEROS))
                b[:n] = _ZEROS[:n]
                self._piece = piece - n
                return n
            if isinstance(piece, memoryview) and len(piece):
                n = min(len(piece), len(b))
                b[:n] = piece[:n]
                self._piece = piece[n:]
                return n
            nxt = next(self._pieces, None)
            if nxt is None:
                return 0
            self._piece = nxt if isinstance(nxt, int) else memoryview(nxt)


__all__ = ["Replay", "Want"]
