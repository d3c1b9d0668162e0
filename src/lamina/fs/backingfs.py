"""What filesystem a store sits on, and whether it returns file types from readdir.

Why it matters: overlayfs needs d_type (without it, whiteouts and directories look
alike while merging, and the kernel may hide files or show deleted ones: Docker refuses
to start overlay2 on xfs made with ``ftype=0`` for this reason); quotas depend on the
filesystem (xfs/ext4 project quotas); and overlay over overlay is refused by the kernel.
The name comes from statfs's magic number (as Docker's ``graphdriver.FsNames``), not
from /proc/self/mountinfo, so it is right even under bind mounts.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

from lamina.fs.libc import libc_name

_libc = ctypes.CDLL(libc_name(), use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.opendir.restype = ctypes.c_void_p
_libc.readdir64.argtypes = [ctypes.c_void_p]
_libc.readdir64.restype = ctypes.c_void_p
_libc.closedir.argtypes = [ctypes.c_void_p]

#: statfs f_type -> the name Docker shows as "Backing Filesystem"
FS_NAMES: dict[int, str] = {
    0xEF53: "extfs",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x794C7630: "overlayfs",
    0x2FC12FC1: "zfs",
    0x6969: "nfs",
    0xF2F52010: "f2fs",
    0x73717368: "squashfs",
    0x61756673: "aufs",
    0xF15F: "ecryptfs",
    0x65735546: "fuse",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x52654973: "reiserfs",
    0x3153464A: "jfs",
    0x01021997: "v9fs",
    0x00C36400: "ceph",
    0xE0F5E1E2: "erofs",
    0x5346414F: "afs",
    0x62656572: "sysfs",
    0x9FA0: "proc",
    0x4D44: "vfat",
    0x2011BAB0: "exfat",
    0x5346544E: "ntfs",
    0x7366746E: "ntfs3",
}

OVERLAY_MAGIC = 0x794C7630
#: filesystems overlayfs cannot use as the upper layer (no xattrs, or stacking refused)
NO_UPPER = {"aufs", "ecryptfs", "overlayfs", "squashfs", "erofs", "v9fs", "vfat", "exfat"}

_DT_UNKNOWN = 0
#: offset of d_type in glibc's struct dirent64 (d_ino 8, d_off 8, d_reclen 2), the same on
#: every 64-bit Linux ABI glibc supports
_D_TYPE_OFFSET = 18


def fs_magic(path: str | Path) -> int:
    """statfs(2)'s ``f_type`` for ``path``."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes; room to spare
    if _libc.statfs(os.fsencode(str(path)), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}")
    # f_type is the first member, a (signed) long; the magic numbers fit in 32 bits
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def fs_name(magic: int) -> str:
    """Docker's name for a magic number, or "<unknown> (0x...)"."""
    return FS_NAMES.get(magic, f"<unknown> (0x{magic:x})")


def backing_fs(path: str | Path) -> str:
    """The name of the filesystem holding ``path`` (or its nearest existing ancestor)."""
    return fs_name(fs_magic(existing_ancestor(path)))


def existing_ancestor(path: str | Path) -> Path:
    """``path`` itself if it exists, else the nearest ancestor that does."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def supports_d_type(path: str | Path) -> bool:
    """Whether readdir on the filesystem of ``path`` reports file types.

    Makes a scratch file in a temporary directory beside ``path`` and reads the raw
    dirent (Python's ``os.scandir`` would hide DT_UNKNOWN by falling back to stat).
    """
    with tempfile.TemporaryDirectory(prefix=".d_type-", dir=existing_ancestor(path)) as d:
        Path(d, "probe").touch()
        dirp = _libc.opendir(os.fsencode(d))
        if not dirp:
            err = ctypes.get_errno()
            raise OSError(err, f"opendir {d}: {os.strerror(err)}")
        try:
            while True:
                ent = _libc.readdir64(dirp)
                if not ent:
                    return False
                name = ctypes.string_at(ent + _D_TYPE_OFFSET + 1)
                if name == b"probe":
                    return ctypes.c_ubyte.from_address(ent + _D_TYPE_OFFSET).value != _DT_UNKNOWN
        finally:
            _libc.closedir(dirp)
