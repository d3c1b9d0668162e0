"""Linux's new mount API (fsopen/fsconfig/fsmount/move_mount) through raw syscalls.

Why: mount(2) takes every option in one string that must fit in one page, so an overlay
of a few hundred lower directories cannot be described to it (Docker's overlay2 stops at
128 lowers and invents ``l/`` short links to get that far). With ``fsconfig`` each
option is its own call, and overlayfs (Linux 6.8+) accepts ``lowerdir+`` once per lower
directory, so the kernel's own limit of 500 lowers becomes reachable. The kernel also
explains a refused mount in words on the context fd, which we put in the error.

glibc gained wrappers for these calls only in 2.36, so they are called by number. The
numbers are the same on x86_64 and aarch64 (they were added after the syscall tables
were unified), but they are kept per machine so a new architecture fails loudly.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lamina.fs.libc import libc_name

_libc = ctypes.CDLL(libc_name(), use_errno=True)
_libc.syscall.restype = ctypes.c_long

#: syscall numbers per ``platform.machine()``
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
               "fsmount": 432, "mount_setattr": 442, "quotactl_fd": 443},
    "aarch64": {"open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
                "fsmount": 432, "mount_setattr": 442, "quotactl_fd": 443},
}
_SYSCALLS["arm64"] = _SYSCALLS["aarch64"]
_SYSCALLS["amd64"] = _SYSCALLS["x86_64"]

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100


def syscall_number(name: str) -> int | None:
    """The number of syscall ``name`` on this machine, or None if we do not know it."""
    return _SYSCALLS.get(platform.machine(), {}).get(name)


def _call(name: str, *args: object) -> int:
    nr = syscall_number(name)
    if nr is None:
        raise OSError(errno.ENOSYS, f"{name}: syscall number unknown on {platform.machine()}")
    rc = _libc.syscall(ctypes.c_long(nr), *args)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return int(rc)


@dataclass
class FsContext:
    """An open filesystem context (what ``fsopen`` returns), configured one key at a time."""

    fd: int
    fstype: str

    def set_flag(self, key: str) -> None:
        self._config(FSCONFIG_SET_FLAG, key, None)

    def set_string(self, key: str, value: str | os.PathLike[str]) -> None:
        self._config(FSCONFIG_SET_STRING, key, os.fsencode(value))

    def _config(self, cmd: int, key: str | None, value: bytes | None) -> None:
        nr = syscall_number("fsconfig")
        assert nr is not None  # fsopen succeeded, so the table has this machine
        rc = _libc.syscall(
            ctypes.c_long(nr), ctypes.c_int(self.fd), ctypes.c_uint(cmd),
            ctypes.c_char_p(key.encode() if key is not None else None),
            ctypes.c_char_p(value), ctypes.c_int(0),
        )
        if rc < 0:
            err = ctypes.get_errno()
            what = f"{key}={os.fsdecode(value)}" if value is not None else (key or "create")
            raise OSError(err, f"{self.fstype}: {what}: {self.messages() or os.strerror(err)}")

    def create(self) -> None:
        """Ask the kernel to build the superblock from the options given so far."""
        self._config(FSCONFIG_CMD_CREATE, None, None)

    def mount(self, target: str | Path, attrs: int = 0) -> None:
        """Turn the context into a mount and attach it at ``target``."""
        mfd = _call("fsmount", ctypes.c_int(self.fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                    ctypes.c_uint(attrs))
        try:
            _call("move_mount", ctypes.c_int(mfd), ctypes.c_char_p(b""),
                  ctypes.c_int(AT_FDCWD), ctypes.c_char_p(os.fsencode(str(target))),
                  ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
        finally:
            os.close(mfd)

    def messages(self) -> str:
        """What the kernel logged on this context ("e overlay: ..."), joined by "; "."""
        lines: list[str] = []
        while True:
            try:
                data = os.read(self.fd, 1024)
            except OSError:
                break
            if not data:
                break
            text = data.decode(errors="replace").strip()
            # each read returns one message prefixed "e ", "w " or "i "
            lines.append(text[2:] if text[1:2] == " " else text)
        return "; ".join(lines)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FsContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fsopen(fstype: str) -> FsContext:
    """Open a configuration context for a new ``fstype`` superblock."""
    fd = _call("fsopen", ctypes.c_char_p(fstype.encode()), ctypes.c_uint(FSOPEN_CLOEXEC))
    return FsContext(fd, fstype)


def mount_fs(fstype: str, target: str | Path, *, source: str | None = None,
             flags: Iterable[str] = (), options: Iterable[tuple[str, str | os.PathLike[str]]] = (),
             attrs: int = 0) -> None:
    """Mount ``fstype`` at ``target`` with each option set by its own ``fsconfig`` call.

    ``options`` is a sequence of (key, value) pairs kept in order, so a key may repeat
    (overlayfs's ``lowerdir+``). Raises OSError carrying the kernel's explanation.
    """
    with fsopen(fstype) as ctx:
        if source is not None:
            ctx.set_string("source", source)
        for flag in flags:
            ctx.set_flag(flag)
        for key, value in options:
            ctx.set_string(key, value)
        ctx.create()
        ctx.mount(target, attrs)


def supports_key(fstype: str, key: str, value: str | os.PathLike[str]) -> bool:
    """Whether ``fstype`` accepts string option ``key`` (nothing is mounted).

    The kernel parses each option as it is given, so an unknown key fails at once with
    EINVAL; any other outcome means the key is known. False also when the new mount API
    itself is missing (ENOSYS) or not permitted (EPERM).
    """
    try:
        ctx = fsopen(fstype)
    except OSError:
        return False
    with ctx:
        try:
            ctx.set_string(key, value)
        except OSError as e:
            return e.errno != errno.EINVAL or "nknown parameter" not in str(e)
    return True
