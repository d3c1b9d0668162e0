"""overlayfs as the kernel has it here: what it can do, and how to mount it.

Shared by the drivers that show a chain through overlayfs (``overlay``, and
``windowsfilter``, whose views are overlays of the chain's ``Files/``), so that both
mount the same way and learn the kernel's features the same way.

* :func:`probe` finds, once per kernel, boot and user namespace, what an overlay on the
  store's filesystem can do: whether it mounts at all (and why not), ``d_type``, whether
  mounts need ``userxattr`` (inside a user namespace), whether the new mount API takes
  ``lowerdir+`` (Linux 6.8+: chains past one page of options), and how sizes can be
  limited there. A probe mounts a tiny overlay beside the store, so its answer is cached.
* :func:`mount_overlay` mounts one view: each lower its own ``lowerdir+`` where the
  kernel has it, else one mount(2) option string, retried with short relative names
  when the absolute one does not fit in a page. Every mount turns off the features that
  would put pointers into lower layers in the upper directory (``redirect_dir``,
  ``metacopy``, ``index``), where the kernel knows them, so an upper directory is
  always a self-contained change set.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lamina.fs import newmount, quota
from lamina.fs.backingfs import backing_fs, existing_ancestor, supports_d_type
from lamina.fs.libc import libc_name
from lamina.fs.mount import MS_RDONLY, mount, umount

_libc = ctypes.CDLL(libc_name(), use_errno=True)
CLONE_FS = 0x200

#: overlayfs's OVL_MAX_STACK: lower directories one mount may have
KERNEL_MAX_LOWERS = 500
#: bump when Features gains a field, so old cache files are ignored
_FEATURES_VERSION = 1


# -- what the kernel and the backing filesystem can do ------------------------------------


@dataclass
class Features:
    """What the probes found for one store root on this kernel, in this namespace."""

    backing_fs: str
    d_type: bool
    #: running as root of a user namespace: mounts need ``userxattr``
    userxattr: bool
    #: the kernel takes ``lowerdir+`` through fsconfig (deep chains)
    lowerdir_plus: bool
    #: extra (key, value) mount options every mount gets, e.g. ("index", "off")
    options: list[tuple[str, str]]
    #: "project" or "loop", or "" when sizes cannot be limited
    quota: str
    quota_reason: str
    #: why an overlay mount on this filesystem fails, "" when it works
    mount_error: str

    @property
    def opaque_xattr(self) -> str:
        return "user.overlay.opaque" if self.userxattr else "trusted.overlay.opaque"


def overlay_in_kernel() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1:] == ["overlay"] for line in f)
    except OSError:
        return False


def in_user_namespace() -> bool:
    """True inside a user namespace other than the initial one (rootless)."""
    try:
        with open("/proc/self/uid_map") as f:
            rows = [line.split() for line in f if line.strip()]
    except OSError:
        return False
    return rows != [["0", "0", "4294967295"]]


def _kernel_options(userxattr: bool) -> list[tuple[str, str]]:
    """Options that keep the upper directory self-contained, where the kernel has them.

    With ``userxattr`` the kernel itself turns redirects and metacopy off, and refuses
    the options ("conflicting options"), so only ``index`` is given then.
    """
    params = Path("/sys/module/overlay/parameters")
    keys = ("index",) if userxattr else ("index", "redirect_dir", "metacopy")
    return [(key, "off") for key in keys if (params / key).exists()]


def features_key() -> dict[str, str]:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        userns = os.readlink("/proc/self/ns/user")
    except OSError:
        userns = ""
    return {"kernel": platform.release(), "boot": boot, "userns": userns,
            "euid": str(os.geteuid()), "version": str(_FEATURES_VERSION)}


#: probes already made by this process: (root, key) -> Features
_PROBED: dict[tuple[str, str], Features] = {}


def probe(root: Path, *, use_cache: bool = True, cache_dir: Path | None = None) -> Features:
    """Find out what overlay can do for a store at ``root``: once per process, and once
    per kernel and boot in ``cache_dir/features.json`` (default ``root/overlay``) when
    that directory exists (each CLI command is a new process; a probe mounts and
    unmounts)."""
    cache = (cache_dir or root / "overlay") / "features.json"
    key = features_key()
    memo = (str(root), json.dumps(key, sort_keys=True))
    if not use_cache:
        return _probe_now(root)
    feats = _PROBED.get(memo)
    saved_ok = False
    if feats is None or cache.parent.is_dir():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                data = saved["features"]
                data["options"] = [tuple(o) for o in data["options"]]
                feats, saved_ok = feats or Features(**data), True
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if feats is None:
        feats = _probe_now(root)
    _PROBED[memo] = feats
    if not saved_ok and cache.parent.is_dir():
        tmp = cache.with_name(f".features.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "features": asdict(feats)}))
        os.replace(tmp, cache)
    return replace(feats)


def _probe_now(root: Path) -> Features:
    where = existing_ancestor(root)
    fs = backing_fs(where)
    userxattr = in_user_namespace()
    feats = Features(
        backing_fs=fs, d_type=True, userxattr=userxattr, lowerdir_plus=False,
        options=_kernel_options(userxattr), quota="", quota_reason="", mount_error="",
    )
    try:
        feats.d_type = supports_d_type(where)
    except OSError as e:
        feats.mount_error = f"cannot probe {where}: {e.strerror}"
        return feats
    feats.lowerdir_plus = newmount.supports_key("overlay", "lowerdir+", str(where))
    feats.mount_error = _probe_mount(where, feats)
    feats.quota, feats.quota_reason = _probe_quota(where, userxattr)
    return feats


def _probe_mount(where: Path, feats: Features) -> str:
    """Mount a tiny overlay (lower, upper, work) beside the store; "" if it works."""
    try:
        d = Path(tempfile.mkdtemp(prefix=".overlay-probe-", dir=where))
    except OSError as e:
        return f"cannot write in {where}: {e.strerror}"
    try:
        for name in ("lower1", "lower2", "upper", "work", "merged"):
            (d / name).mkdir()
        try:
            mount_overlay(d / "merged", [d / "lower1", d / "lower2"], d / "upper", d / "work",
                           feats=feats, readonly=False)
        except OSError as e:
            return (e.strerror or str(e)).replace(f"{d}/", "")
        umount(d / "merged")
        return ""
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _probe_quota(where: Path, userns: bool) -> tuple[str, str]:
    if userns:
        return "", "size limits need root outside a user namespace"
    reason = quota.project_quota_reason(where)
    if reason is None:
        return "project", ""
    loop_reason = quota.loop_image_reason()
    if loop_reason is None:
        return "loop", ""
    return "", f"{reason}; {loop_reason}"


def userns_overlay_reason() -> str | None:
    """Whether overlay can be mounted inside a fresh user namespace (rootless use), by
    trying it in a child under util-linux ``unshare``; None if it can."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "cannot tell: util-linux unshare is missing"
    with tempfile.TemporaryDirectory(prefix="lamina-userns-") as d:
        for name in ("lower", "upper", "work", "merged"):
            os.mkdir(os.path.join(d, name))
        script = ("mount -t overlay overlay -o lowerdir=lower,upperdir=upper,workdir=work,"
                  "userxattr merged")
        done = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script],
                              cwd=d, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or ["overlay mount refused"])[-1]


# -- mounting ------------------------------------------------------------------------------


def mount_overlay(target: Path, lowers: Sequence[Path], upper: Path | None, work: Path | None,
                   *, feats: Features, readonly: bool, legacy_from: Path | None = None,
                   short_lowers: Sequence[str] = ()) -> None:
    """Mount an overlay at ``target``; ``lowers`` nearest first.

    With the new mount API each lower is its own ``lowerdir+``; else one mount(2) option
    string, retried with ``short_lowers`` (paths relative to ``legacy_from``) when the
    absolute one does not fit in a page.

    With ``lowerdir+`` the short names are used too, whenever given: the kernel shows
    each lower as it was passed in ``/proc/self/mountinfo``, and 500 absolute layer paths
    make a line past the 64 KiB that runc (and other readers) accept, which breaks every
    container start on the host while the mount exists.
    """
    if feats.lowerdir_plus:
        relative = legacy_from is not None and len(short_lowers) == len(lowers)
        options: list[tuple[str, str | os.PathLike[str]]] = list(feats.options)
        options += [("lowerdir+", p) for p in (short_lowers if relative else lowers)]
        if upper is not None and work is not None:
            options += [("upperdir", upper), ("workdir", work)]
        flags = (["userxattr"] if feats.userxattr else []) + (["ro"] if readonly else [])

        def do_mount() -> None:
            newmount.mount_fs("overlay", target, source="overlay", flags=flags, options=options,
                              attrs=newmount.MOUNT_ATTR_RDONLY if readonly else 0)

        if relative:
            assert legacy_from is not None
            in_directory(legacy_from, do_mount)
        else:
            do_mount()
        return
    data = _legacy_options(feats, [str(p) for p in lowers], upper, work)
    limit = os.sysconf("SC_PAGE_SIZE") - 1
    if len(data) <= limit:
        mount("overlay", target, "overlay", MS_RDONLY if readonly else 0, data)
        return
    if legacy_from is None or not short_lowers:
        raise OSError(errno.E2BIG, f"overlay options for {target} exceed one page ({len(data)} bytes)")
    assert upper is not None and work is not None
    rel = _legacy_options(feats, list(short_lowers), os.path.relpath(upper, legacy_from),
                          os.path.relpath(work, legacy_from))
    if len(rel) > limit:
        raise OSError(errno.E2BIG, f"overlay options for {target} exceed one page even with short links")
    in_directory(legacy_from, lambda: mount("overlay", target, "overlay",
                                             MS_RDONLY if readonly else 0, rel))


def _legacy_options(feats: Features, lowers: list[str], upper: Any, work: Any) -> str:
    opts = [f"{k}={v}" for k, v in feats.options] + (["userxattr"] if feats.userxattr else [])
    opts.append("lowerdir=" + ":".join(_escape(p) for p in lowers))
    if upper is not None:
        opts += [f"upperdir={_escape(str(upper))}", f"workdir={_escape(str(work))}"]
    return ",".join(opts)


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def in_directory(directory: Path, action: Any) -> None:
    """Run ``action`` with ``directory`` as the working directory of one thread only.

    A thread that unshares CLONE_FS has its own cwd, so relative mount paths resolve
    there without moving the cwd of the rest of the process (Docker's mountFrom).
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if _libc.unshare(CLONE_FS) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_FS): {os.strerror(err)}")
            os.chdir(directory)
            action()
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    t = threading.Thread(target=run, name="overlay-mount")
    t.start()
    t.join()
    if failure:
        raise failure[0]
