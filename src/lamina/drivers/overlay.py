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

What the kernel can do, and the mounting itself, are in :mod:`lamina.fs.overlayfs`,
shared with windowsfilter; this module is the overlay2 layout on top of it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from lamina.archive.apply import ApplyOptions, apply_tar
from lamina.archive.change import Change
from lamina.archive.changes import changes_overlay, tree_size
from lamina.archive.export import tar_tree
from lamina.drivers.base import (
    ApplyPlan,
    ContentTree,
    CreateOptions,
    Driver,
    DriverContext,
    FileGetter,
    LayerHold,
    MountSpec,
    refuse_unknown,
)
from lamina.errors import (
    ChainTooDeep,
    DriverUnavailable,
    InvalidOption,
    LaminaError,
    MountKept,
    QuotaNotSupported,
    UnsupportedFilesystem,
)
from lamina.fs import quota, staging
from lamina.fs.backingfs import NO_UPPER, existing_ancestor
from lamina.fs.durable import fsync_all
from lamina.fs.getter import DirFileGetter
from lamina.fs.mount import MS_BIND, MS_RDONLY, is_mountpoint, mount, mounts_under, umount
from lamina.fs.overlayfs import (
    KERNEL_MAX_LOWERS,
    features_key,
    mount_overlay,
    overlay_in_kernel,
    probe,
    userns_overlay_reason,
)
from lamina.fs.private import private_dir
from lamina.fs.relax import force_rmtree
from lamina.fs.usage import disk_usage

log = logging.getLogger(__name__)

MS_REMOUNT = 32

LINK_LEN = 26
#: bytes of the one-page mount(2) option string kept for everything but the lowers: the
#: fixed options plus relative upperdir/workdir paths of a 128-character layer ID in a
#: sized layer come to about 370
OPTION_HEADROOM = 384


# -- the driver ----------------------------------------------------------------------------


class OverlayDriver(Driver):
    """Kernel overlayfs, overlay2's layout, deep chains, rootless, sizes anywhere.

    Driver options (``--storage-opt``): ``overlay.size`` (default limit for read-write
    layers, as ``overlay2.size``), ``overlay.quota`` (``auto``, ``project``, ``loop``)
    and ``overlay.mount_api`` (``auto``, or ``legacy`` to use mount(2) and ``l/`` links
    even where the new API exists).
    """

    name = "overlay"
    shows_through_overlayfs = True

    def __init__(self, ctx: DriverContext) -> None:
        super().__init__(ctx)
        self._opts = _parse_options(ctx.options)
        reason = self.unavailable_reason(ctx.root)
        if reason:
            raise _unavailable_error(reason)
        for d in (ctx.layers, ctx.tmp, ctx.root / "l", ctx.root / "overlay"):
            private_dir(d)  # l/ names every layer: 0700, as overlay2's (lamina.fs.private)
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
        """The sized images under read-write layers with a size limit: mounted while the
        layer is in use, and on demand (:meth:`_upper`) until released."""
        return {str(img.parent / "sized") for img in self.ctx.layers.glob("*/size.img")}

    def _ensure_image(self, d: Path) -> None:
        sized = d / "sized"
        try:
            if os.stat(sized).st_dev != os.stat(d).st_dev:
                return
        except FileNotFoundError:
            sized.mkdir()
        quota.mount_image(d / "size.img", sized)

    def release_own_mounts(self, layer_id: str) -> list[str]:
        """Unmount a sized layer's image (and with it its loop device) unless its
        filesystem is still in use, such as under a container that containerd mounted
        from this layer's snapshot (:func:`lamina.fs.quota.release_image`); the next use
        of the layer mounts it again (:meth:`_upper`). Raises :class:`MountKept` when
        it stays."""
        d = self.layer_dir(layer_id)
        sized = d / "sized"
        if not (d / "size.img").exists() or not is_mountpoint(sized) or is_mountpoint(d / "merged"):
            return []
        if not quota.release_image(sized, d / "size.img"):
            raise MountKept(f"layer {layer_id}: its size-limit image {sized} is still in use (a mount "
                            "outside the store, such as a container's, or a process inside it); kept mounted")
        return [f"released the size-limit image of layer {layer_id}"]

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
        work = staging.creating(self.ctx.tmp, layer_id)
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

    def make_durable(self, layer_id: str, parent: str | None) -> None:
        """An overlay layer is born empty: what :meth:`create` made is a handful of
        names (its directory with ``diff/``, ``work/``, ``link`` and ``lower``, its
        ``l/`` short link, the parent's ``committed`` marker), so those are fsynced, not
        the whole filesystem (a Prepare's ``syncfs`` also waited for every other
        writer's dirty pages). A layer with a size image (a fresh ext4 made by
        mkfs and mounted) is flushed whole, as by default."""
        d = self.layer_dir(layer_id)
        if (d / "size.img").exists():
            super().make_durable(layer_id, parent)
            return
        # the files' content, the layer directory's names, the rename into layers/,
        # the short link, the parent's marker (the rename's source in tmp/ may come
        # back after a power loss: cleanup removes it as a leftover)
        names = [d / "link", d, self.ctx.layers, self.ctx.root / "l"]
        if parent is not None:
            names += [d / "lower", self.layer_dir(parent)]
        fsync_all(names)

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
        self._discard(staging.creating(self.ctx.tmp, layer_id))
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
        doomed = staging.removing(self.ctx.tmp, layer_id)
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
            mount_overlay(
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

    def apply_plan(self, layer_id: str, parent: str | None, chain: Sequence[str]) -> ApplyPlan | None:
        """Each layer into its own upper directory; the lowers are only read (hardlink
        copy-up, symlink checks), so layers of one chain can be unpacked side by side."""
        if list(chain[1:2]) != ([parent] if parent else []) or self.is_mounted(layer_id):
            return None
        opts = ApplyOptions(
            whiteouts="overlay" if len(chain) > 1 else "delete",
            opaque_xattr=self.opaque_xattr,
            uid_map=self.ctx.uid_map, gid_map=self.ctx.gid_map,
            lower_roots=[self._upper(p) for p in chain[1:]],
            drop_overlay_xattrs=True,  # a base layer (delete mode) is a lower dir too
        )
        return ApplyPlan(self._upper(layer_id), opts)

    def apply_diff(self, layer_id: str, parent: str | None, chain: Sequence[str],
                   stream: IO[bytes], tarsplit: IO[bytes] | None = None) -> int | None:
        plan = self.apply_plan(layer_id, parent, chain)
        if plan is None:
            return None
        return apply_tar(plan.root, stream, dataclasses.replace(plan.options, tarsplit=tarsplit))

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

    def content_tree(self, layer_id: str, parent: str | None) -> ContentTree:
        """The upper directory: the layer's own changes, as apply_diff wrote them."""
        return ContentTree(self._upper(layer_id), whole_chain=False,
                           whiteouts="overlay" if parent else "delete", opaque_xattr=self.opaque_xattr)

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
        key = features_key()
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

    def cleanup(self, known: set[str], hold: LayerHold) -> list[str]:
        done: list[str] = []
        for entry in sorted(self.ctx.layers.iterdir()) if self.ctx.layers.is_dir() else []:
            if entry.name not in known:
                with hold(entry.name) as recorded:
                    if recorded is False:  # not made meanwhile, nor being made
                        self._discard(entry)
                        done.append(f"removed overlay layer directory {entry.name} that no record names")
        for entry in sorted(self.ctx.tmp.iterdir()) if self.ctx.tmp.is_dir() else []:
            owner, what = staging.owner(entry.name), staging.kind(entry.name)
            if what not in ("removing", "creating") or (what == "creating" and owner in known):
                continue
            with hold(owner) as recorded:
                # a removal or creation still at work, or a creating dir whose layer has a
                # record (it may be in use right now), stays
                if recorded is None or (what == "creating" and recorded) or not os.path.lexists(entry):
                    continue
                if mounts_under(entry):
                    self._discard(entry)
                    done.append(f"unmounted and removed leftover tmp/{entry.name}")
        return done + self._mend_links(known, hold)

    def _mend_links(self, known: set[str], hold: LayerHold) -> list[str]:
        """Drop the short links in ``l/`` that name no recorded layer's ``diff``, and
        restore a recorded layer's missing one; each change decided under the layer's hold."""
        done: list[str] = []
        links = self.ctx.root / "l"
        wanted = {}
        for layer_id in known:
            short = self._link(layer_id)
            if short:
                wanted[short] = layer_id
        for entry in sorted(links.iterdir()):
            try:
                current = os.readlink(entry)
            except OSError:
                current = None
            if entry.name in wanted and current == f"../layers/{wanted[entry.name]}/diff":
                continue
            owner = Path(current).parts[2] if current and current.startswith("../layers/") else ""
            with hold(owner) if owner else contextlib.nullcontext(False) as recorded:
                if recorded is None:
                    continue  # its layer is being made (the link comes before the dir) or removed
                if recorded and self._link(owner) == entry.name:
                    continue  # made since cleanup began
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    done.append(f"removed stale short link l/{entry.name}")
        for short, layer_id in sorted(wanted.items()):
            if os.path.lexists(links / short):
                continue
            with hold(layer_id) as recorded:
                if recorded and self._link(layer_id) == short and not os.path.lexists(links / short):
                    os.symlink(f"../layers/{layer_id}/diff", links / short)
                    done.append(f"restored short link l/{short}")
        return done


#: the driver options overlay knows, each also as ``overlay.KEY`` and ``overlay2.KEY``
OPTION_KEYS = ("size", "quota", "mount_api")


def _parse_options(options: dict[str, str]) -> dict[str, Any]:
    """The driver options; an unknown key is refused, prefixed or not (overlay2 says
    "Unknown option"), and keys match case-blind as overlay2's do."""
    known = [f"{prefix}{k}" for prefix in ("", "overlay.", "overlay2.") for k in OPTION_KEYS]
    refuse_unknown(options, known, "driver option", "overlay")
    parsed: dict[str, Any] = {}
    for key, value in options.items():
        key = key.lower()
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
    return parsed


def _unavailable_error(reason: str) -> LaminaError:
    if "backing filesystem" in reason or "d_type" in reason:
        return UnsupportedFilesystem(reason)
    return DriverUnavailable(reason)


def _rmtree(path: Path) -> None:
    """Remove a tree even where modes forbid it (overlay's work/work is mode 000)."""
    force_rmtree(path)
