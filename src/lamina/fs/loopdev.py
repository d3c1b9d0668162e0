"""Loop devices for sized filesystem images: attach one, and find the ones an image is on.

Why finding matters: a file attached to two loop devices is two block devices, each
with a filesystem of its own caching and writing the same blocks: the image is
corrupted as soon as both are mounted. The store's own mounts of an image are one
mount point, but a superblock can outlive that mount point: containerd mounts an
overlay whose upper directory is inside the image (the store never sees that mount,
overlayfs holds a private clone of it), so after the store unmounts its mount point
the filesystem, and the loop device under it, stay alive. Whoever attaches the image
must therefore look first (:func:`devices_of`) and mount the device that is already
there, never attach a second one.

The kernel says which file a loop device holds in
``/sys/block/loopN/loop/backing_file`` (a path, recomputed at each read, so it
follows renames); a candidate is confirmed with ``LOOP_GET_STATUS64`` on an open
descriptor, whose device and inode numbers are the backing file's. While that
descriptor is open the device cannot be detached (autoclear waits for the last
opener), so what was confirmed stays true until it is closed (:func:`hold`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
from collections.abc import Iterator
from pathlib import Path


class _LoopInfo64(ctypes.Structure):
    _fields_ = [("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64),
                ("lo_rdevice", ctypes.c_uint64), ("lo_offset", ctypes.c_uint64),
                ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
                ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
                ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_char * 64),
                ("lo_crypt_name", ctypes.c_char * 64), ("lo_encrypt_key", ctypes.c_ubyte * 32),
                ("lo_init", ctypes.c_uint64 * 2)]


class _LoopConfig(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32),
                ("info", _LoopInfo64), ("reserved", ctypes.c_uint64 * 8)]


LOOP_CLR_FD = 0x4C01
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
#: errors of opening a loop device that is being detached (or was just detached)
GOING_AWAY = (errno.ENXIO, errno.ENODEV, errno.ENOENT)


def attach(image: Path) -> str:
    """Attach ``image`` to a free loop device; return the device path. The caller must
    have checked that it is on none already (:func:`devices_of`), under a lock that
    every attacher of the image takes. The device does not detach by itself until
    :func:`set_autoclear` (called once it is mounted)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    img_fd = os.open(image, flags)
    try:
        ctl = os.open("/dev/loop-control", flags)
        try:
            for _ in range(16):  # another process may take the free device first
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                device = f"/dev/loop{number}"
                dev_fd = os.open(device, flags)
                try:
                    cfg = _LoopConfig()
                    cfg.fd = img_fd
                    cfg.info.lo_flags = LO_FLAGS_DIRECT_IO
                    cfg.info.lo_file_name = os.fsencode(str(image))[-63:]
                    try:
                        fcntl.ioctl(dev_fd, LOOP_CONFIGURE, cfg)
                    except OSError as e:
                        if e.errno == errno.EBUSY:
                            continue
                        raise
                    return device
                finally:
                    os.close(dev_fd)
            raise OSError(errno.EBUSY, "no free loop device after 16 tries")
        finally:
            os.close(ctl)
    finally:
        os.close(img_fd)


def set_autoclear(device: str) -> None:
    """Mark a loop device to detach when its last user goes (LOOP_CLR_FD on a device in
    use does exactly that; on an idle one it detaches at once)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        try:  # a kernel that refuses writers of a mounted device still takes this
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError:
        pass
    finally:
        os.close(fd)


def _backs(info: _LoopInfo64, st: os.stat_result) -> bool:
    return info.lo_inode == st.st_ino and info.lo_device == st.st_dev


def devices_of(image: Path) -> list[str]:
    """The loop devices ``image`` is attached to now (normally none or one)."""
    try:
        want = os.stat(image)
    except FileNotFoundError:
        return []
    found = []
    for entry in sorted(glob.glob("/sys/block/loop*/loop/backing_file")):
        try:
            with open(entry, "rb") as f:
                backing = os.fsdecode(f.read().rstrip(b"\n"))
            st = os.stat(backing)
        except OSError:
            continue  # detached meanwhile, or its file deleted (" (deleted)")
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            found.append("/dev/" + entry.split("/")[3])
    return found


@contextlib.contextmanager
def hold(device: str, image: Path) -> Iterator[bool]:
    """Keep ``device`` open for the block; yields True if it is then bound to ``image``
    (and so stays bound until the block ends), False if it is going away or holds
    another file by now."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in GOING_AWAY:
            yield False
            return
        raise
    try:
        info = _LoopInfo64()
        try:
            fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        except OSError as e:
            if e.errno not in GOING_AWAY:
                raise
            yield False
            return
        yield _backs(info, os.stat(image))
    finally:
        os.close(fd)
