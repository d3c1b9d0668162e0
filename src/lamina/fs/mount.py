"""Kernel mounts through libc, without shelling out to mount(8).

Why ctypes and not ``mount(8)``: one fork+exec per mount costs milliseconds, and the
option string must reach the kernel exactly as built (mount(8) reinterprets some).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from lamina.fs.libc import libc_name

_libc = ctypes.CDLL(libc_name(), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2


def mount(source: str, target: str | Path, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """mount(2); raises OSError with the errno and the target in the message."""
    rc = _libc.mount(
        source.encode(),
        os.fsencode(str(target)),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} on {target}: {os.strerror(err)}")


def umount(target: str | Path, *, lazy: bool = True) -> None:
    """umount2(2); a target that is not mounted (EINVAL) or gone (ENOENT) is fine."""
    rc = _libc.umount2(os.fsencode(str(target)), MNT_DETACH if lazy else 0)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def is_mountpoint(path: str | Path) -> bool:
    """True if ``path`` is listed as a mount point in /proc/self/mountinfo."""
    want = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split(b" ", 5)
                if _unescape(fields[4]) == want:
                    return True
    except OSError:
        return os.path.ismount(want)
    return False


def mounts_under(prefix: str | Path) -> list[str]:
    """Mount points at or below ``prefix``, deepest first (the order to unmount them)."""
    root = os.path.realpath(prefix)
    found: list[str] = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = _unescape(line.split(b" ", 5)[4])
            if point == root or point.startswith(root + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def mounts_naming(path: str | Path) -> list[str]:
    """Mount points of this mount namespace whose filesystem options name a path at or
    below ``path`` (an overlay with its ``upperdir`` or a ``lowerdir`` there): mounts
    that use a directory without being mounted on it. Only what the options spell out
    is seen (not a lower given through a symlink, nor a mount of another namespace)."""
    want = os.path.realpath(path)
    found: list[str] = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.rstrip(b"\n").partition(b" - ")
            fields = right.split(b" ", 2)
            if len(fields) < 3:
                continue
            for opt in _unescape(fields[2]).split(","):
                _, _, value = opt.partition("=")
                if any(p == want or p.startswith(want + "/") for p in value.split(":")):
                    found.append(_unescape(left.split(b" ")[4]))
                    break
    return found


def _unescape(field: bytes) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal ``\\NNN``."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] == 0x5C and i + 3 < len(field) + 1 and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def fs_type(path: str | Path) -> str:
    """The filesystem type of the mount holding ``path`` ("ext4", "xfs", "tmpfs", ...),
    from the longest matching mount point in /proc/self/mountinfo."""
    want = os.path.realpath(path)
    best, best_type = "", "unknown"
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                left, _, right = line.partition(b" - ")
                point = _unescape(left.split(b" ")[4])
                if (want == point or want.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, best_type = point, os.fsdecode(right.split(b" ", 1)[0])
    except OSError:
        pass
    return best_type
