"""overlay: layers as kernel overlayfs directories, laid out as Docker's overlay2.

On disk (``ROOT`` is the store root)::

    ROOT/layers/<id>/diff/      the layer's own content; the overlay upper directory
    ROOT/layers/<id>/work/      overlay's work directory (layers with a parent)
    ROOT/layers/<id>/merged/    where the union view is mounted
    ROOT/layers/<id>/link       the layer's 26-letter short name
    ROOT/layers/<id>/lower      "l/<parent short>:l/<grandparent short>:..." (with a parent)
    ROOT/layers/<id>/committed  present once a layer has been built on this one
    ROOT/layers/<id>/size.img   a size-limited layer's filesystem image (loop fallback),
    ROOT/layers/<id>/sized/     mounted here, holding diff/ and work/ (diff is a symlink)
    ROOT/l/<short>              symlink to ../layers/<id>/diff
    ROOT/overlay/features.json  what the probes found, per kernel and boot

How a layer is seen: a layer without a parent is a plain directory (its ``diff``). Any
other layer is an overlay mount of its parents' ``diff`` directories as lowers, with its
own ``diff``/``work`` as upper and work directories. Once a layer has been built on
(overlay2's ``committed``), its view is mounted read-only: writing under a child would
change the child's view behind its back. Until then it is writable, as overlay2's is,
which is how image layers are filled through their view.

Why these choices:

* Deep chains. ``mount(2)`` takes one page of options, which is why overlay2 invents
  ``l/`` short names and stops at 128 lowers. The new mount API gives each
  ``lowerdir+`` its own ``fsconfig`` call (Linux 6.8+), so the kernel's own limit of 500
  lower directories applies; since the layer's own ``diff`` is always the upper, a
  chain of 501 layers can be mounted. The ``l/`` names are passed there too, relative to
  the store root: the kernel shows each lower as given in ``/proc/self/mountinfo``, and
  runc cannot read a line past 64 KiB. On older kernels the ``l/`` links keep the option
  string short, and the limit is what fits in a page. Past either, a clear error.
* Native diff. The upper directory *is* the layer's change set, so ``changes``/``diff``
  read it alone: their cost follows the changes, not the image. To keep the upper
  self-contained, every mount sets ``redirect_dir=off``, ``metacopy=off`` and
  ``index=off`` (where the kernel knows them), so a renamed directory or a metadata-only
  copy-up never leaves a pointer into a lower layer.
* Rootless. Inside a user namespace the kernel refuses ``trusted.*`` xattrs, so mounts
  add ``userxattr`` and opaque directories carry ``user.overlay.opaque``
  (:attr:`OverlayDriver.opaque_xattr`, also used by apply and export).
* Size limits on any filesystem: project quotas where the backing filesystem has them,
  else a sparse ext4 image on a loop device (:mod:`lamina.fs.quota`).
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

from lamina.archive.apply import ApplyOptions, apply_tar
from lamina.archive.change import Change
from lamina.archive.changes import changes_overlay, tree_size
from lamina.archive.export import tar_tree
from lamina.drivers.base import (
    CreateOptions,
    Driver,
    DriverContext,
    FileGetter,
    MountSpec,
)
from lamina.errors import (
    ChainTooDeep,
    DriverUnavailable,
    InvalidOption,
    LaminaError,
    QuotaNotSupported,
    UnsupportedFilesystem,
)
from lamina.fs import newmount, quota
from lamina.fs.backingfs import NO_UPPER, backing_fs, existing_ancestor, supports_d_type
from lamina.fs.getter import DirFileGetter
from lamina.fs.mount import MS_BIND, MS_RDONLY, is_mountpoint, mount, mounts_under, umount
from lamina.fs.usage import disk_usage

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
CLONE_FS = 0x200
MS_REMOUNT = 32

#: overlayfs's OVL_MAX_STACK: lower directories one mount may have
KERNEL_MAX_LOWERS = 500
LINK_LEN = 26
#: bytes of the one-page mount(2) option string kept for everything but the lowers: the
#: fixed options plus relative upperdir/workdir paths of a 128-character layer ID in a
#: sized layer come to about 370
OPTION_HEADROOM = 384
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


def _features_key() -> dict[str, str]:
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


def probe(root: Path, *, use_cache: bool = True) -> Features:
    """Find out what overlay can do for a store at ``root``: once per process, and once
    per kernel and boot in ``root/overlay/features.json`` when the store exists (each
    CLI command is a new process; a probe mounts and unmounts)."""
    cache = root / "overlay" / "features.json"
    key = _features_key()
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
            _mount_overlay(d / "merged", [d / "lower1", d / "lower2"], d / "upper", d / "work",
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


def _mount_overlay(target: Path, lowers: Sequence[Path], upper: Path | None, work: Path | None,
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
            _in_directory(legacy_from, do_mount)
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
    _in_directory(legacy_from, lambda: mount("overlay", target, "overlay",
                                             MS_RDONLY if readonly else 0, rel))


def _legacy_options(feats: Features, lowers: list[str], upper: Any, work: Any) -> str:
    opts = [f"{k}={v}" for k, v in feats.options] + (["userxattr"] if feats.userxattr else [])
    opts.append("lowerdir=" + ":".join(_escape(p) for p in lowers))
    if upper is not None:
        opts += [f"upperdir={_escape(str(upper))}", f"workdir={_escape(str(work))}"]
    return ",".join(opts)


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _in_directory(directory: Path, action: Any) -> None:
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


# -- the driver ----------------------------------------------------------------------------


class OverlayDriver(Driver):
    """Kernel overlayfs, overlay2's layout, deep chains, rootless, sizes anywhere.

    Driver options (``--storage-opt``): ``overlay.size`` (default limit for read-write
    layers, as ``overlay2.size``), ``overlay.quota`` (``auto``, ``project``, ``loop``)
    and ``overlay.mount_api`` (``auto``, or ``legacy`` to use mount(2) and ``l/`` links
    even where the new API exists).
    """

    name = "overlay"

    def __init__(self, ctx: DriverContext) -> None:
        super().__init__(ctx)
        self._opts = _parse_options(ctx.options)
        reason = self.unavailable_reason(ctx.root)
        if reason:
            raise _unavailable_error(reason)
        for d in (ctx.layers, ctx.tmp, ctx.root / "l", ctx.root / "overlay"):
            d.mkdir(parents=True, exist_ok=True)
        self.features = probe(ctx.root)
        if self._opts.get("mount_api") == "legacy":
            self.features.lowerdir_plus = False
        mode = self._opts.get("quota", "auto")
        if mode == "project" and self.features.quota != "project":
            raise QuotaNotSupported(f"overlay.quota=project: {self.features.quota_reason or 'not available'} at {ctx.root}")
        if mode == "loop":
            loop_reason = quota.loop_image_reason()
            if loop_reason:
                raise QuotaNotSupported(f"overlay.quota=loop: {loop_reason}")
            self.features.quota = "loop"
        self._default_size = self._opts.get("size")
        self._project: quota.ProjectQuota | None = None

    # -- availability --------------------------------------------------------------------

    @classmethod
    def unavailable_reason(cls, root: Path) -> str | None:
        if not overlay_in_kernel():
            return "the kernel has no overlayfs (not in /proc/filesystems)"
        if os.geteuid() != 0:
            return ("overlay mounts need root, or root of a user namespace (rootless: run under "
                    "rootlesskit or `unshare --user --map-root-user --mount`)")
        feats = probe(root)
        if not feats.d_type:
            return (f"backing filesystem {feats.backing_fs} at {existing_ancestor(root)} does not "
                    "report file types (d_type); xfs needs ftype=1")
        if feats.mount_error:
            where = existing_ancestor(root)
            if feats.backing_fs in NO_UPPER:
                return (f"backing filesystem {feats.backing_fs} at {where} cannot hold overlay "
                        f"upper directories: {feats.mount_error}")
            if feats.userxattr:
                return (f"the kernel refuses overlay mounts in this user namespace ({feats.mount_error}); "
                        "rootless overlay needs Linux 5.11+ and a mount namespace of its own")
            return f"overlay mount on {feats.backing_fs} at {where} fails: {feats.mount_error}"
        return None

    @property
    def max_depth(self) -> int:
        """The most lower directories one mount may have: one per parent layer."""
        if self.features.lowerdir_plus:
            return KERNEL_MAX_LOWERS
        per_lower = len("l/") + LINK_LEN + 1
        return min(KERNEL_MAX_LOWERS, (os.sysconf("SC_PAGE_SIZE") - OPTION_HEADROOM) // per_lower)

    @property
    def opaque_xattr(self) -> str:
        """The xattr that marks an opaque directory in this store's upper dirs."""
        return self.features.opaque_xattr

    # -- paths ---------------------------------------------------------------------------

    def _upper(self, layer_id: str) -> Path:
        """The real upper directory of a layer (inside its image for sized layers, which
        is mounted again here if a reboot unmounted it)."""
        d = self.layer_dir(layer_id)
        sized = d / "sized"
        if (d / "size.img").exists():
            self._ensure_image(d)
            return sized / "diff"
        return d / "diff"

    def _work(self, layer_id: str) -> Path:
        return self._upper(layer_id).parent / "work"

    def own_mounts(self) -> set[str]:
        """The sized images under read-write layers with a size limit stay mounted."""
        return {str(img.parent / "sized") for img in self.ctx.layers.glob("*/size.img")}

    def _ensure_image(self, d: Path) -> None:
        sized = d / "sized"
        try:
            if os.stat(sized).st_dev != os.stat(d).st_dev:
                return
        except FileNotFoundError:
            sized.mkdir()
        quota.mount_image(d / "size.img", sized)

    def _link(self, layer_id: str) -> str:
        try:
            return (self.layer_dir(layer_id) / "link").read_text().strip()
        except FileNotFoundError:
            return ""

    def _lowers(self, layer_id: str) -> list[str]:
        """The ``lower`` file's short links, nearest parent first."""
        try:
            text = (self.layer_dir(layer_id) / "lower").read_text().strip()
        except FileNotFoundError:
            return []
        return text.split(":") if text else []

    def _lower_ids(self, layer_id: str) -> list[str] | None:
        """The parents of a layer, nearest first, read through its ``l/`` links; None if a
        link is missing (cleanup restores them)."""
        ids = []
        for short in self._lowers(layer_id):
            try:
                target = os.readlink(self.ctx.root / short)
            except OSError:
                return None
            parts = Path(target).parts  # ../layers/<id>/diff
            if len(parts) != 4 or parts[:2] != ("..", "layers"):
                return None
            ids.append(parts[2])
        return ids

    def _parent_of(self, layer_id: str) -> str | None | bool:
        """The layer's parent, None for a base layer, False if unknown."""
        ids = self._lower_ids(layer_id)
        if ids is None:
            return False
        return ids[0] if ids else None

    # -- layer lifecycle -----------------------------------------------------------------

    def create(self, layer_id: str, parent: str | None, *, rw: bool, opts: CreateOptions) -> None:
        size = opts.size
        if size is None and rw and self._default_size:
            size = self._default_size
        if size and not rw:
            raise InvalidOption(f"layer {layer_id}: a size limit applies to read-write layers only")
        if size and not self.features.quota:
            raise QuotaNotSupported(f"layer {layer_id}: cannot limit its size here: {self.features.quota_reason}")
        lower: list[str] = []
        if parent is not None:
            plink = self._link(parent)
            if not plink:
                raise LaminaError(f"layer {layer_id}: parent {parent} has no overlay link file")
            lower = [f"l/{plink}", *self._lowers(parent)]
            if len(lower) > self.max_depth:
                raise ChainTooDeep(
                    f"layer {layer_id}: a chain of {len(lower) + 1} layers needs {len(lower)} lower "
                    f"directories; this kernel mounts at most {self.max_depth}"
                    + ("" if self.features.lowerdir_plus else
                       " with one mount(2) page (the new mount API, Linux 6.8+, allows 500)"))
        work = self.ctx.tmp / f"{layer_id}~creating"
        self._discard(work)
        work.mkdir()
        os.chmod(work, 0o711)
        try:
            self._build(layer_id, work, lower, size)
            if parent is not None:
                (self.layer_dir(parent) / "committed").touch(0o600)
            os.rename(work, self.layer_dir(layer_id))
        except BaseException:
            self._discard(work)
            raise

    def _build(self, layer_id: str, d: Path, lower: list[str], size: int | None) -> None:
        uid, gid = self._root_owner()
        target = d
        if size:
            if self.features.quota == "project":
                self._projects().limit(d, size)
            else:
                (d / "sized").mkdir()
                quota.create_image(d / "size.img", d / "sized", size, root_owner=(uid, gid))
                target = d / "sized"
        (target / "diff").mkdir(0o755)
        os.chmod(target / "diff", 0o755)
        os.chown(target / "diff", uid, gid)
        if target != d:
            (d / "diff").symlink_to("sized/diff")
        if lower:
            (target / "work").mkdir(0o700)
            (d / "lower").write_text(":".join(lower))
        short = base64.b32encode(os.urandom(20)).decode()[:LINK_LEN]
        (d / "link").write_text(short)
        os.symlink(f"../layers/{layer_id}/diff", self.ctx.root / "l" / short)

    def _root_owner(self) -> tuple[int, int]:
        """The host IDs of the container's root under the store's ID maps."""
        def host(idmap: Sequence[tuple[int, int, int]]) -> int:
            for cid, hid, size in idmap:
                if cid <= 0 < cid + size:
                    return hid - cid
            return 0
        return host(self.ctx.uid_map), host(self.ctx.gid_map)

    def _projects(self) -> quota.ProjectQuota:
        if self._project is None:
            self._project = quota.ProjectQuota(self.ctx.root, [self.ctx.layers, self.ctx.tmp],
                                               self.ctx.root / "overlay" / "quota.lock")
        return self._project

    def remove(self, layer_id: str) -> None:
        d = self.layer_dir(layer_id)
        self._discard(self.ctx.tmp / f"{layer_id}~creating")
        if not d.exists():
            return
        short = self._link(layer_id)
        if short:
            link = self.ctx.root / "l" / short
            try:
                if os.readlink(link) == f"../layers/{layer_id}/diff":
                    link.unlink()
            except OSError:
                pass
        if self.features.quota == "project":
            try:
                self._projects().release(d)
            except OSError as e:
                log.warning("layer %s: could not drop its project quota: %s", layer_id, e)
        doomed = self.ctx.tmp / f"{layer_id}~removing-{uuid.uuid4().hex[:8]}"
        for point in mounts_under(d):
            umount(point)
        os.rename(d, doomed)
        self._discard(doomed)

    def _discard(self, path: Path) -> None:
        """Delete a layer directory that may hold mounts (a view, a sized image)."""
        if not path.exists():
            return
        for point in mounts_under(path):
            umount(point)
        _rmtree(path)

    def mount(self, layer_id: str, chain: Sequence[str], *, rw: bool, mount_label: str = "") -> Path:
        """The view of ``layer_id``. Read-only once a layer has been built on it, else
        writable (``rw`` does not change that: an image layer is filled through its view
        before it has children, as with overlay2). ``mount_label`` is not applied: SELinux
        labels are not supported."""
        if not chain or chain[0] != layer_id:
            raise LaminaError(f"layer {layer_id}: mount was given the chain of {chain[:1]}")
        d = self.layer_dir(layer_id)
        committed = (d / "committed").exists()
        merged = d / "merged"
        upper = self._upper(layer_id)
        if is_mountpoint(merged):
            # the store mounts only for a first reference, so this one is stale (a
            # crash between mount and record); mounting over it would stack views
            umount(merged)
        if len(chain) == 1:
            if not committed:
                return upper
            merged.mkdir(mode=0o700, exist_ok=True)
            mount(str(upper), merged, None, MS_BIND)
            try:
                mount("", merged, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
            except OSError:
                umount(merged)
                raise
            return merged
        parents = list(chain[1:])
        if len(parents) > self.max_depth:
            raise ChainTooDeep(f"layer {layer_id}: {len(parents)} lower directories; this kernel "
                               f"mounts at most {self.max_depth}")
        merged.mkdir(mode=0o700, exist_ok=True)
        try:
            _mount_overlay(
                merged, [self._upper(p) for p in parents], upper, upper.parent / "work",
                feats=self.features, readonly=committed,
                legacy_from=self.ctx.root, short_lowers=self._lowers(layer_id),
            )
        except OSError as e:
            raise LaminaError(f"layer {layer_id}: overlay mount failed: {e.strerror or e}") from e
        return merged

    def unmount(self, layer_id: str) -> None:
        merged = self.layer_dir(layer_id) / "merged"
        if is_mountpoint(merged):
            umount(merged)
        try:
            merged.rmdir()
        except OSError:
            pass

    def is_mounted(self, layer_id: str) -> bool:
        return is_mountpoint(self.layer_dir(layer_id) / "merged")

    def mount_specs(self, layer_id: str, chain: Sequence[str], *, writable: bool) -> list[MountSpec]:
        """What containerd's snapshotters return: a base layer is a bind mount of its
        ``diff``; any other layer one ``overlay`` mount, with the layer's own ``diff`` and
        ``work`` as upper and work directories when ``writable``, else its own ``diff``
        as the topmost lower (read-only, no upper).

        The lowers are the ``l/`` short links as absolute paths under the store root.
        The mounter is containerd's mount code, which uses mount(2): its options must
        fit in one page, and when they come near it containerd makes the lower
        directories relative to their common parent (here ``ROOT/l/``), so each costs
        its 26-letter name and a colon. That is what this checks, so 128-layer chains
        mount and deeper ones fail here with a clear error, not in containerd."""
        if not chain or chain[0] != layer_id:
            raise LaminaError(f"layer {layer_id}: mount_specs was given the chain of {chain[:1]}")
        upper = self._upper(layer_id)
        if len(chain) == 1:
            return [MountSpec("bind", str(upper), ("rw" if writable else "ro", "rbind"))]
        lowers = list(self._lowers(layer_id))
        if not writable:
            lowers.insert(0, f"l/{self._link(layer_id)}")
        if len(lowers) != len(chain) - (1 if writable else 0) or not all(lowers):
            raise LaminaError(f"layer {layer_id}: its lower file does not match its chain; run lamina cleanup")
        opts = [f"{k}={v}" for k, v in self.features.options]
        if self.features.userxattr:
            opts.append("userxattr")
        if writable:
            opts += [f"workdir={upper.parent / 'work'}", f"upperdir={upper}"]
        root = str(self.ctx.root)
        if any(c in root for c in ",:"):
            raise LaminaError(f"store root {root}: a ',' or ':' in it cannot be passed in overlay options")
        opts.append("lowerdir=" + ":".join(f"{root}/{short}" for short in lowers))
        page = os.sysconf("SC_PAGE_SIZE")
        if sum(map(len, opts)) >= page - 512:
            # containerd's compaction: lowers relative to ROOT/l/, the rest as given
            fixed = [o for o in opts if not o.startswith("lowerdir=")]
            data = ",".join([*fixed, "lowerdir=" + ":".join(s.removeprefix("l/") for s in lowers)])
            if len(data) > page:
                raise ChainTooDeep(
                    f"layer {layer_id}: a chain of {len(chain)} layers needs {len(data)} bytes of "
                    f"overlay options; containerd mounts at most one page ({page})")
        return [MountSpec("overlay", "overlay", tuple(opts))]

    def disk_usage(self, layer_id: str) -> tuple[int, int]:
        """The upper directory's usage: the layer's own content (containerd's overlay)."""
        return disk_usage(self._upper(layer_id))

    # -- native diffs --------------------------------------------------------------------

    def _native_against(self, layer_id: str, parent: str | None) -> bool:
        """Whether the upper directory alone describes the layer against ``parent``: only
        when ``parent`` is its direct parent (or both are nothing)."""
        own = self._parent_of(layer_id)
        return own is not False and own == (parent or None)

    def apply_diff(self, layer_id: str, parent: str | None, chain: Sequence[str],
                   stream: IO[bytes], tarsplit: IO[bytes] | None = None) -> int | None:
        if list(chain[1:2]) != ([parent] if parent else []) or self.is_mounted(layer_id):
            return None
        opts = ApplyOptions(
            whiteouts="overlay" if len(chain) > 1 else "delete",
            opaque_xattr=self.opaque_xattr,
            uid_map=self.ctx.uid_map, gid_map=self.ctx.gid_map,
            lower_roots=[self._upper(p) for p in chain[1:]],
            tarsplit=tarsplit,
        )
        return apply_tar(self._upper(layer_id), stream, opts)

    def diff(self, layer_id: str, parent: str | None) -> Iterator[bytes] | None:
        if not self._native_against(layer_id, parent):
            return None
        return tar_tree(self._upper(layer_id), whiteouts="overlay" if parent else "none",
                        opaque_xattr=self.opaque_xattr,
                        uid_map=self.ctx.uid_map, gid_map=self.ctx.gid_map)

    def changes(self, layer_id: str, parent: str | None) -> list[Change] | None:
        if not self._native_against(layer_id, parent):
            return None
        lowers = [self._upper(p) for p in (self._lower_ids(layer_id) or [])]
        return changes_overlay(self._upper(layer_id), lowers, opaque_xattr=self.opaque_xattr)

    def diff_size(self, layer_id: str, parent: str | None) -> int | None:
        if not self._native_against(layer_id, parent):
            return None
        return tree_size(self._upper(layer_id))

    def diff_getter(self, layer_id: str) -> FileGetter:
        return DirFileGetter(self._upper(layer_id))

    # -- information and housekeeping ----------------------------------------------------

    def status(self) -> list[tuple[str, str]]:
        f = self.features
        if f.quota == "project":
            quota_text = "project quotas"
        elif f.quota == "loop":
            quota_text = "sparse ext4 image on a loop device per limited layer"
        else:
            quota_text = f"unavailable ({f.quota_reason})"
        if f.lowerdir_plus:
            deep = f"fsconfig lowerdir+ (chains of up to {self.max_depth + 1} layers)"
        else:
            deep = f"mount(2) with l/ short links (chains of up to {self.max_depth + 1} layers)"
        if f.userxattr:
            rootless = "in use (user namespace, userxattr)"
        else:
            why = self._rootless_reason()
            rootless = "supported (overlay in user namespaces with userxattr)" if not why else f"unavailable ({why})"
        return [
            ("Backing Filesystem", f.backing_fs),
            ("Supports d_type", str(f.d_type).lower()),
            ("Using metacopy", "false"),
            ("Native Overlay Diff", "true"),
            ("userxattr", str(f.userxattr).lower()),
            ("Quota", quota_text),
            ("Deep Chains", deep),
            ("Rootless", rootless),
        ]

    def _rootless_reason(self) -> str:
        cache = self.ctx.root / "overlay" / "rootless.json"
        key = _features_key()
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return str(saved["reason"])
        except (OSError, ValueError, KeyError):
            pass
        reason = userns_overlay_reason() or ""
        try:
            cache.write_text(json.dumps({"key": key, "reason": reason}))
        except OSError:
            pass
        return reason

    def metadata(self, layer_id: str) -> dict[str, str]:
        d = self.layer_dir(layer_id)
        upper = self._upper(layer_id)
        meta = {"WorkDir": str(upper.parent / "work"), "MergedDir": str(d / "merged"),
                "UpperDir": str(upper)}
        ids = self._lower_ids(layer_id)
        if ids:
            meta["LowerDir"] = ":".join(os.path.realpath(self._upper(p)) for p in ids)
        return meta

    def cleanup(self, known: set[str]) -> list[str]:
        done: list[str] = []
        for entry in sorted(self.ctx.layers.iterdir()) if self.ctx.layers.is_dir() else []:
            if entry.name not in known:
                self._discard(entry)
                done.append(f"removed overlay layer directory {entry.name} that no record names")
        for entry in sorted(self.ctx.tmp.iterdir()) if self.ctx.tmp.is_dir() else []:
            # a "~creating" dir whose layer still has a record may be in use right now
            owner, _, what = entry.name.partition("~")
            if what.startswith("removing") or (what == "creating" and owner not in known):
                if mounts_under(entry):
                    self._discard(entry)
                    done.append(f"unmounted and removed leftover tmp/{entry.name}")
        links = self.ctx.root / "l"
        wanted = {}
        for layer_id in known:
            short = self._link(layer_id)
            if short:
                wanted[short] = f"../layers/{layer_id}/diff"
        for entry in sorted(links.iterdir()):
            target = wanted.get(entry.name)
            try:
                current = os.readlink(entry)
            except OSError:
                current = None
            owner = Path(current).parts[2] if current and current.startswith("../layers/") else ""
            if owner in known and (self.ctx.tmp / f"{owner}~creating").exists():
                continue  # a layer being made right now: its link comes before its dir
            if target is None or current != target:
                entry.unlink()
                done.append(f"removed stale short link l/{entry.name}")
        for short, target in sorted(wanted.items()):
            if not os.path.lexists(links / short):
                os.symlink(target, links / short)
                done.append(f"restored short link l/{short}")
        return done


def _parse_options(options: dict[str, str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for key, value in options.items():
        short = key.split(".", 1)[1] if key.startswith(("overlay.", "overlay2.")) else key
        if short == "size":
            from lamina.ids import parse_size
            parsed["size"] = parse_size(value) or None
        elif short == "quota":
            if value not in ("auto", "project", "loop"):
                raise InvalidOption(f"overlay.quota={value}: use auto, project or loop")
            parsed["quota"] = value
        elif short == "mount_api":
            if value not in ("auto", "legacy"):
                raise InvalidOption(f"overlay.mount_api={value}: use auto or legacy")
            parsed["mount_api"] = value
        elif key.startswith(("overlay.", "overlay2.")):
            raise InvalidOption(f"unknown overlay option {key!r}")
    return parsed


def _unavailable_error(reason: str) -> LaminaError:
    if "backing filesystem" in reason or "d_type" in reason:
        return UnsupportedFilesystem(reason)
    return DriverUnavailable(reason)


def _rmtree(path: Path) -> None:
    """Remove a tree even where modes forbid it (overlay's work/work is mode 000)."""

    def onerror(func: Any, p: str, exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700, follow_symlinks=False)
        except OSError:
            pass
        try:
            func(p)
        except FileNotFoundError:
            pass

    shutil.rmtree(path, onerror=onerror)
