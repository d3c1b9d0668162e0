"""Size limits for one directory tree, on any backing filesystem.

Two ways, chosen per store:

* **Project quotas** (xfs mounted with ``pquota``, ext4 with the ``project`` feature
  mounted with ``prjquota``): the directory gets its own project ID with the inherit
  flag (``FS_IOC_FSSETXATTR``) and a hard block limit (``quotactl(Q_XSETQLIM)``), as
  Docker's overlay2 does on xfs. Free to set up, exact, and the space is shared with
  the store until used.
* **A sized filesystem image** everywhere else: a sparse file holding an ext4
  filesystem, attached to a loop device and mounted. Its free space is the limit. It
  costs one mkfs and one loop device per limited layer, and a mount to re-attach after
  a reboot, but needs nothing of the backing filesystem.

A write past either limit fails with EDQUOT or ENOSPC and touches nothing else.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from lamina.errors import LoopImageBusy, QuotaNotSupported
from lamina.fs import loopdev, newmount
from lamina.fs.libc import libc_name
from lamina.fs.locks import locked
from lamina.fs.mount import is_mountpoint, mount, mounts_naming, umount

_libc = ctypes.CDLL(libc_name(), use_errno=True)
_libc.quotactl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long

# -- project quotas ------------------------------------------------------------------


class _FsXattr(ctypes.Structure):
    _fields_ = [("fsx_xflags", ctypes.c_uint32), ("fsx_extsize", ctypes.c_uint32),
                ("fsx_nextents", ctypes.c_uint32), ("fsx_projid", ctypes.c_uint32),
                ("fsx_cowextsize", ctypes.c_uint32), ("fsx_pad", ctypes.c_ubyte * 8)]


class _FsDiskQuota(ctypes.Structure):
    _fields_ = [("d_version", ctypes.c_int8), ("d_flags", ctypes.c_int8),
                ("d_fieldmask", ctypes.c_uint16), ("d_id", ctypes.c_uint32),
                ("d_blk_hardlimit", ctypes.c_uint64), ("d_blk_softlimit", ctypes.c_uint64),
                ("d_ino_hardlimit", ctypes.c_uint64), ("d_ino_softlimit", ctypes.c_uint64),
                ("d_bcount", ctypes.c_uint64), ("d_icount", ctypes.c_uint64),
                ("d_itimer", ctypes.c_int32), ("d_btimer", ctypes.c_int32),
                ("d_iwarns", ctypes.c_uint16), ("d_bwarns", ctypes.c_uint16),
                ("d_itimer_hi", ctypes.c_int8), ("d_btimer_hi", ctypes.c_int8),
                ("d_rtbtimer_hi", ctypes.c_int8), ("d_padding2", ctypes.c_int8),
                ("d_rtb_hardlimit", ctypes.c_uint64), ("d_rtb_softlimit", ctypes.c_uint64),
                ("d_rtbcount", ctypes.c_uint64), ("d_rtbtimer", ctypes.c_int32),
                ("d_rtbwarns", ctypes.c_uint16), ("d_padding3", ctypes.c_int16),
                ("d_padding4", ctypes.c_char * 8)]


FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_PROJINHERIT = 0x200
PRJQUOTA = 2
Q_XGETQUOTA = (ord("X") << 8) + 3
Q_XSETQLIM = (ord("X") << 8) + 4
Q_XGETQSTAT = (ord("X") << 8) + 5
FS_QUOTA_PDQ_ACCT = 1 << 4
FS_QUOTA_PDQ_ENFD = 1 << 5
FS_PROJ_QUOTA = 2
FS_DQ_BSOFT = 1 << 2
FS_DQ_BHARD = 1 << 3
#: quotactl counts blocks in "basic blocks" of 512 bytes
BASIC_BLOCK = 512


def _quotactl(path: Path, cmd: int, qid: int, addr: ctypes.c_void_p | None) -> None:
    """quotactl on the filesystem holding ``path``.

    Uses ``quotactl_fd`` (Linux 5.14+), which needs only an open file on the filesystem;
    older kernels want a block device node, which we make beside ``path`` as Docker does
    (``backingFsBlockDev``) from the filesystem's st_dev.
    """
    full = (cmd << 8) | PRJQUOTA
    nr = newmount.syscall_number("quotactl_fd")
    if nr is not None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            rc = _libc.syscall(ctypes.c_long(nr), ctypes.c_uint(fd), ctypes.c_uint(full),
                               ctypes.c_int(qid), addr)
        finally:
            os.close(fd)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, f"quotactl {path}: {os.strerror(err)}")
    dev = Path(path) / ".backingFsBlockDev"
    st = os.stat(path)
    try:
        os.unlink(dev)
    except FileNotFoundError:
        pass
    os.mknod(dev, stat.S_IFBLK | 0o600, st.st_dev)
    try:
        if _libc.quotactl(full, os.fsencode(dev), qid, addr) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"quotactl {path}: {os.strerror(err)}")
    finally:
        os.unlink(dev)


def project_quota_reason(path: Path) -> str | None:
    """None when the filesystem holding ``path`` accounts *and* enforces project
    quotas; otherwise why not, in words."""
    buf = ctypes.create_string_buffer(256)  # fs_quota_stat; qs_flags is the u16 at 2
    try:
        _quotactl(path, Q_XGETQSTAT, 0, ctypes.cast(buf, ctypes.c_void_p))
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
            return "the filesystem has no project quotas"
        if e.errno == errno.ESRCH:
            return "project quotas are not turned on (mount with pquota / prjquota)"
        if e.errno == errno.EPERM:
            return "not permitted to manage quotas (not root, or in a user namespace)"
        return f"project quotas unusable: {e.strerror}"
    flags = ctypes.c_uint16.from_buffer(buf, 2).value
    if not flags & FS_QUOTA_PDQ_ACCT:
        return "project quota accounting is off (mount with pquota / prjquota)"
    if not flags & FS_QUOTA_PDQ_ENFD:
        return "project quota enforcement is off (mount with pquota / prjquota)"
    return None


def get_project_id(path: Path) -> int:
    """The project ID of a file or directory (0 when none was given)."""
    return _fsxattr(path).fsx_projid


def _fsxattr(path: Path) -> _FsXattr:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        attr = _FsXattr()
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, attr)
        return attr
    finally:
        os.close(fd)


def set_project_id(path: Path, project_id: int) -> None:
    """Give ``path`` a project ID that everything made under it inherits."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        attr = _FsXattr()
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, attr)
        attr.fsx_projid = project_id
        attr.fsx_xflags |= FS_XFLAG_PROJINHERIT
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, attr)
    finally:
        os.close(fd)


def set_project_limit(fs_path: Path, project_id: int, size: int) -> None:
    """Set the hard (and soft) block limit of a project; 0 removes the limit."""
    q = _FsDiskQuota()
    q.d_version = 1
    q.d_flags = FS_PROJ_QUOTA
    q.d_fieldmask = FS_DQ_BSOFT | FS_DQ_BHARD
    q.d_id = project_id
    blocks = (size + BASIC_BLOCK - 1) // BASIC_BLOCK
    q.d_blk_hardlimit = q.d_blk_softlimit = blocks
    _quotactl(fs_path, Q_XSETQLIM, project_id, ctypes.cast(ctypes.byref(q), ctypes.c_void_p))


def get_project_usage(fs_path: Path, project_id: int) -> tuple[int, int]:
    """(bytes used, byte limit) of a project; limit 0 = none."""
    q = _FsDiskQuota()
    _quotactl(fs_path, Q_XGETQUOTA, project_id, ctypes.cast(ctypes.byref(q), ctypes.c_void_p))
    return q.d_bcount * BASIC_BLOCK, q.d_blk_hardlimit * BASIC_BLOCK


class ProjectQuota:
    """Hands out project IDs under ``home`` and limits directories with them.

    IDs are allocated above the one ``home`` carries (as Docker does, so an
    administrator can reserve a range by setting it on the store root) and above every
    ID already on a directory in ``scan_dirs``. Allocation happens under an flock on
    ``lock_path``, so two processes limiting layers at once never share an ID.
    """

    def __init__(self, home: Path, scan_dirs: Sequence[Path], lock_path: Path) -> None:
        self.home = home
        self.scan_dirs = list(scan_dirs)
        self.lock_path = lock_path

    def _next_id(self) -> int:
        highest = get_project_id(self.home)
        for parent in self.scan_dirs:
            try:
                entries = list(os.scandir(parent))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    try:
                        highest = max(highest, get_project_id(Path(entry.path)))
                    except OSError:
                        continue
        return highest + 1

    def limit(self, directory: Path, size: int) -> int:
        """Give ``directory`` (in one of ``scan_dirs``) a fresh project ID with a hard
        limit of ``size`` bytes."""
        with locked(self.lock_path):
            project_id = get_project_id(directory) or self._next_id()
            set_project_id(directory, project_id)
        set_project_limit(self.home, project_id, size)
        return project_id

    def release(self, directory: Path) -> None:
        """Drop the limit of ``directory``'s project (its ID may be reused)."""
        try:
            project_id = get_project_id(directory)
        except OSError:
            return
        if project_id and project_id != get_project_id(self.home):
            set_project_limit(self.home, project_id, 0)


# -- sized filesystem images -----------------------------------------------------------


MIB = 1 << 20
#: how long a released image's loop device may take to detach before the image is
#: taken to be still in use by a mount outside the store
DETACH_WAIT = 1.0


def loop_image_reason() -> str | None:
    """None when sized images can be made here, else why not."""
    if os.geteuid() != 0:
        return "loop devices need root"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control missing)"
    if not shutil.which("mkfs.ext4"):
        return "mkfs.ext4 missing (Debian package e2fsprogs)"
    return None


def mount_image(image: Path, mountpoint: Path) -> None:
    """Mount the ext4 image at ``mountpoint`` through a loop device (idempotent).

    One mounter at a time per image, across threads and processes (an flock on the
    image): two that both saw it unmounted would attach it twice, and two loop devices
    on one image are two filesystems writing one file. For the same reason an image
    that is on a loop device already (its filesystem still mounted somewhere the store
    does not see, such as containerd's overlay over a snapshot) is mounted from that
    device, the same filesystem again, never attached a second time; an image found on
    two devices is refused."""
    with locked(image):
        if is_mountpoint(mountpoint):
            return
        _mount_locked(image, mountpoint)


def _mount_locked(image: Path, mountpoint: Path) -> None:
    """:func:`mount_image` under the image's lock."""
    deadline = time.monotonic() + 10 * DETACH_WAIT
    while True:
        devices = loopdev.devices_of(image)
        if len(devices) > 1:
            raise LoopImageBusy(f"{image} is attached to {' and '.join(devices)}: two filesystems on one file; "
                                "stop what uses them, unmount them and detach the devices before using the layer")
        if not devices:
            device = loopdev.attach(image)
            try:
                mount(device, mountpoint, "ext4", 0, "")
            finally:
                loopdev.set_autoclear(device)
            return
        with loopdev.hold(devices[0], image) as bound:
            if bound:
                # the filesystem on it (if any) is the image's one: mount it again
                mount(devices[0], mountpoint, "ext4", 0, "")
                loopdev.set_autoclear(devices[0])
                return
        # the device is being detached: wait for it to go, then attach afresh
        if time.monotonic() > deadline:
            raise LoopImageBusy(f"{image}: its loop device {devices[0]} neither goes away nor can be opened")
        time.sleep(0.005)


def unmount_image(mountpoint: Path, image: Path | None = None) -> None:
    """Unmount an image; its loop device goes with the last reference. With ``image``,
    under the image's lock, so no mount of it runs at the same time."""
    if image is None:
        umount(mountpoint)
        return
    with locked(image):
        umount(mountpoint)


def release_image(mountpoint: Path, image: Path) -> bool:
    """Unmount an image for good if nothing else uses its filesystem; True if it and
    its loop device are gone, False if it is still in use (then it stays mounted at
    ``mountpoint`` as it was).

    In use means: a file open or a working directory under ``mountpoint`` (the unmount
    is refused with EBUSY; it is not lazy), or a mount made from it elsewhere, such as
    an overlay with its upper directory inside (the unmount succeeds, but the loop
    device stays attached: the filesystem lives on). The second case is told by
    waiting up to :data:`DETACH_WAIT` for the device to detach; if it does not, the
    same device is mounted back, so the store goes on seeing the one filesystem. An
    overlay in this mount namespace whose options name a directory inside is seen
    before anything is unmounted (:func:`lamina.fs.mount.mounts_naming`)."""
    with locked(image):
        if not is_mountpoint(mountpoint):
            return not loopdev.devices_of(image)
        if mounts_naming(mountpoint):
            return False  # seen at once: an overlay over it in this namespace
        for device in loopdev.devices_of(image):
            loopdev.set_autoclear(device)  # a crash between attach and mount may have left it unset
        try:
            umount(mountpoint, lazy=False)
        except OSError as e:
            if e.errno == errno.EBUSY:
                return False
            raise
        if _detached(image, DETACH_WAIT):
            return True
        _mount_locked(image, mountpoint)
        return False


def _detached(image: Path, wait: float) -> bool:
    """Whether ``image`` is on no loop device, waiting up to ``wait`` seconds for the
    kernel to let go of one whose last user just went."""
    deadline = time.monotonic() + wait
    while loopdev.devices_of(image):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _mkfs(image: Path, size: int, root_owner: tuple[int, int]) -> None:
    inodes = max(size // 8192, 4096)
    journal_mib = min(max(size // (256 * MIB), 4), 64)
    cmd = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", "-N", str(inodes),
           "-J", f"size={journal_mib}", "-O", "^resize_inode",
           "-E", f"nodiscard,lazy_itable_init=1,lazy_journal_init=1,root_owner={root_owner[0]}:{root_owner[1]}",
           str(image)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise QuotaNotSupported(f"mkfs.ext4 {image}: {done.stderr.strip() or done.returncode}")


def create_image(image: Path, mountpoint: Path, size: int, *,
                 root_owner: tuple[int, int] = (0, 0)) -> None:
    """Make a sparse ext4 image with about ``size`` bytes free and mount it.

    ext4's own overhead (journal, inode tables, the kernel's reserve) depends on the
    size, so the image is made, measured, and made again larger until the free space
    reaches ``size`` (two rounds at most in practice; mkfs takes milliseconds).
    """
    reason = loop_image_reason()
    if reason:
        raise QuotaNotSupported(f"cannot limit {mountpoint}: {reason}")
    total = size + size // 40 + 8 * MIB
    for _ in range(4):
        with open(image, "wb") as f:
            f.truncate(total)
        _mkfs(image, total, root_owner)
        mount_image(image, mountpoint)
        st = os.statvfs(mountpoint)
        free = st.f_bavail * st.f_frsize
        if free >= size:
            return
        # made again in place: its loop device must be gone before the file is rewritten
        with locked(image):
            umount(mountpoint, lazy=False)
            if not _detached(image, 10 * DETACH_WAIT):
                raise QuotaNotSupported(f"{image}: its loop device stays attached after unmounting")
        total += size - free + MIB
    raise QuotaNotSupported(f"cannot size an image for {size} bytes at {image}")
