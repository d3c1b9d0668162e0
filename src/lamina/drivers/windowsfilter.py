"""windowsfilter: Docker's Windows graph driver, re-created on Linux.

For people who build, inspect or patch Windows container images from a Linux machine.
The on-disk layout and the behaviour are the seed's (moby
``daemon/graphdriver/windows/windows.go``); what Windows does in the kernel (the
filter driver, ``sandbox.vhdx``) is done with Linux's own tools:

=========================  ===========================================================
``<id>/Files/``            the layer's part of C:, each file's Windows metadata in
                           the ``trusted.lamina.win`` xattr (:mod:`.windowsfilter_meta`);
                           deletions are overlay whiteouts (0/0 character devices)
``<id>/Hives/``            the registry deltas, plain files
``<id>/UtilityVM/Files/``  the utility VM's files (cloned from the parent on import)
``<id>/layerchain.json``   JSON list of the parent layer folders, nearest first;
                           ``null`` for none (the seed's exact bytes)
``<id>/layerID``           an alternate ID to use instead (``layerId`` read too: the
                           seed writes that spelling and NTFS does not care)
``<id>/bcd*.bak``          the BCD files as imported (a UVM import mutates them)
``<id>/tar-split.json.gz`` the import child's tar-split, there only until the import
                           returns: the store keeps the one copy (``tarsplit/``)
``<id>/sandbox.img``       a read-write layer's sized ext4 image (the ``sandbox.vhdx``
                           analogue), mounted at ``<id>/sandbox/`` with ``upper/``
                           and ``work/`` inside
``<id>/mnt/``              the union view: overlayfs over the chain's ``Files/``
``<id>-removing``          a layer being removed; ``cleanup`` finishes the job
=========================  ===========================================================

A parent whose folder has no ``Files/`` (a read-write ``-init`` layer) is left out of
its children's chains, as the seed does. Imports run in a child process
(:mod:`.windowsfilter_import`).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import lamina
from lamina.archive import wintar
from lamina.archive.change import Change, ChangeKind
from lamina.archive.winexport import ExportItem, write_tar
from lamina.drivers.base import (
    CreateOptions,
    Driver,
    DriverContext,
    FileGetter,
    LayerHold,
    refuse_unknown,
)
from lamina.drivers.windowsfilter_meta import TAR_RECORD, XATTR_NAME, read_meta
from lamina.errors import (
    InvalidOption,
    LaminaError,
    LayerBusy,
    LayerExists,
    MountKept,
    ParentNotFound,
    StoreCorrupt,
    UnsupportedFilesystem,
)
from lamina.fs import quota
from lamina.fs.backingfs import backing_fs, supports_d_type
from lamina.fs.durable import atomic_write
from lamina.fs.mount import is_mountpoint, mounts_under, umount
from lamina.fs.overlayfs import mount_overlay, probe
from lamina.fs.private import private_dir
from lamina.fs.staging import REMOVING_SUFFIX
from lamina.ids import check_id, parse_size

log = logging.getLogger(__name__)

#: what the platform's CreateSandboxLayer gives a sandbox when no size is asked for
DEFAULT_SANDBOX_SIZE = 20 << 30
SANDBOX_IMAGE = "sandbox.img"
SANDBOX_MOUNT = "sandbox"
VIEW = "mnt"
LAYER_CHAIN = "layerchain.json"
#: the file resolveID reads, and the spelling setID writes (the seed's own mismatch)
LAYER_ID_NAMES = ("layerID", "layerId")
NOREEXEC_ENV = "LAMINA_WINDOWSFILTER_NOREEXEC"

def parse_storage_opt(storage_opt: dict[str, str], what: str = "storage option") -> int:
    """The seed's parseStorageOpt: keys case-blind, ``size`` in RAMInBytes units; 0
    when no size is given. Other keys are refused (the seed ignored them, so a
    misspelt ``siz`` made a sandbox of the default size without a word)."""
    refuse_unknown(storage_opt, ("size",), what, "windowsfilter")
    size = 0
    for key, value in storage_opt.items():
        if key.lower() == "size":
            try:
                size = parse_size(value)
            except LaminaError as e:
                raise InvalidOption(f"Failed to parse storage options - {e}") from None
    return size


def _go_json(chain: list[str]) -> bytes:
    """``json.Marshal`` of a Go ``[]string``: ``null`` when empty, compact, HTML-escaped."""
    if not chain:
        return b"null"
    text = json.dumps(chain, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode()


class WindowsFilterDriver(Driver):
    """Windows layers in the seed's layout; see the module docstring."""

    name = "windowsfilter"
    content_model = "windows"
    exports_against_own_chain = True
    #: its import keeps no Linux xattr from a tar at all (only Windows records)
    shows_through_overlayfs = True

    @classmethod
    def unavailable_reason(cls, root: Path) -> str | None:
        if os.geteuid() != 0:
            return ("windowsfilter needs root: overlay mounts, trusted.* xattrs, "
                    "whiteout devices and loop-mounted sandboxes")
        try:
            with open("/proc/filesystems") as f:
                if "overlay" not in f.read():
                    return "the kernel has no overlayfs"
        except OSError as e:
            return f"cannot read /proc/filesystems: {e}"
        return quota.loop_image_reason()

    def __init__(self, ctx: DriverContext) -> None:
        super().__init__(ctx)
        ctx.layers.mkdir(mode=0o700, parents=True, exist_ok=True)
        reason = _filesystem_problem(ctx.layers)
        if reason:
            raise UnsupportedFilesystem(
                f"{ctx.layers} is on a {backing_fs(ctx.layers)} filesystem, which {reason} - "
                "it is not supported by windowsfilter")
        #: the size every sandbox has at least (driver option ``size``, seed parsing)
        self.sandbox_size = parse_storage_opt(ctx.options, "driver option") or DEFAULT_SANDBOX_SIZE
        private_dir(ctx.root / self.name)  # the driver's own state (lamina.fs.private)
        self._empty = ctx.root / self.name / "empty"
        self._empty.mkdir(parents=True, exist_ok=True)
        #: what overlayfs can do here, probed as for the overlay driver (cached beside _empty)
        self._overlay = probe(ctx.root, cache_dir=ctx.root / self.name)

    # -- the seed's helpers --------------------------------------------------------------

    def dir(self, layer_id: str) -> Path:
        """The layer folder (the seed's ``dir``: home joined with the ID's base name)."""
        return self.ctx.layers / Path(layer_id).name

    def resolve_id(self, layer_id: str | None) -> str:
        """The ID a layer's ``layerID`` (or ``layerId``) file points at, else the ID."""
        if not layer_id:
            return ""
        folder = self.dir(layer_id)
        for name in LAYER_ID_NAMES:
            try:
                text = (folder / name).read_text()
            except (FileNotFoundError, NotADirectoryError):
                continue
            return check_id(text.strip(), f"{name} of layer {layer_id}")
        return layer_id

    def set_id(self, layer_id: str, alt_id: str) -> None:
        """Store an alternate ID for ``layer_id`` (the seed's ``setID``, which writes
        ``layerId``)."""
        check_id(alt_id)
        atomic_write(self.dir(layer_id) / LAYER_ID_NAMES[1], alt_id.encode(), mode=0o600)

    def get_layer_chain(self, layer_id: str) -> list[str]:
        """The parent layer folders recorded for ``layer_id``, nearest first."""
        path = self.dir(layer_id) / LAYER_CHAIN
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreCorrupt(f"Unable to read layerchain file - {e}") from None
        try:
            chain = json.loads(content)
        except ValueError as e:
            raise StoreCorrupt(f"Failed to unmarshall layerchain json - {path}: {e}") from None
        if chain is None:
            return []
        if not isinstance(chain, list) or not all(isinstance(p, str) for p in chain):
            raise StoreCorrupt(f"Failed to unmarshall layerchain json - {path}: not a list of paths")
        return chain

    def set_layer_chain(self, layer_id: str, chain: Sequence[str]) -> None:
        """Write ``layerchain.json`` atomically, byte for byte as the seed's json.Marshal."""
        atomic_write(self.dir(layer_id) / LAYER_CHAIN, _go_json(list(chain)), mode=0o600)

    def exists(self, layer_id: str) -> bool:
        """Whether the layer (after ID resolution) has a folder here."""
        try:
            return self.dir(self.resolve_id(layer_id)).is_dir()
        except LaminaError:
            return False

    def _chain_folder(self, path: str) -> Path:
        """A folder from a chain file; a store that moved finds it by its base name."""
        p = Path(path)
        return p if p.is_dir() else self.dir(p.name)

    def _lowers(self, rid: str) -> list[Path]:
        """The ``Files/`` folders of the view, nearest first."""
        folders = [self.dir(rid), *map(self._chain_folder, self.get_layer_chain(rid))]
        return [f / wintar.FILES for f in folders if (f / wintar.FILES).is_dir()]

    # -- create / remove -------------------------------------------------------------------

    def create(self, layer_id: str, parent: str | None, *, rw: bool, opts: CreateOptions) -> None:
        rpid = self.resolve_id(parent)
        if parent and not os.path.lexists(self.dir(parent)):
            raise ParentNotFound(f"Cannot create layer {layer_id} with missing parent {parent}")
        chain: list[str] = []
        if rpid and (self.dir(rpid) / wintar.FILES).is_dir():
            # a legitimate parent, not an empty "-init" layer: it goes in the chain
            chain.append(str(self.dir(rpid)))
        if rpid:
            chain += self.get_layer_chain(rpid)
        size = 0
        if rw:
            size = parse_storage_opt(opts.storage_opt) or (opts.size or 0)
        folder = self.dir(layer_id)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            raise LayerExists(f"layer {layer_id} already exists in {self.ctx.layers}") from None
        try:
            if rw:
                self._make_sandbox(folder, max(self.sandbox_size, size))
            else:
                (folder / wintar.FILES).mkdir(mode=0o755)
            self.set_layer_chain(layer_id, chain)
        except BaseException:
            self._destroy(folder)
            raise

    def _make_sandbox(self, folder: Path, size: int) -> None:
        """A sparse ext4 image with at least ``size`` bytes free, holding the overlay's
        upper and work directories (CreateSandboxLayer, then ExpandSandboxSize)."""
        mnt = folder / SANDBOX_MOUNT
        mnt.mkdir(mode=0o700)
        try:
            quota.create_image(folder / SANDBOX_IMAGE, mnt, size)
        except LaminaError as e:
            raise InvalidOption(f"cannot make a {size}-byte sandbox for {folder.name}: {e}") from None
        try:
            (mnt / "upper").mkdir(mode=0o755)
            (mnt / "work").mkdir(mode=0o700)
        finally:
            quota.unmount_image(mnt)

    def remove(self, layer_id: str) -> None:
        """Rename to ``<id>-removing``, then delete (the seed's Remove + DestroyLayer).

        A mount left by a crash is released first, as the seed detaches a
        ``sandbox.vhdx`` that is still attached. The folder named by ``layer_id`` goes
        too when its ``layerID`` pointed elsewhere (the seed leaves it behind).
        """
        try:
            rid = self.resolve_id(layer_id)
        except LaminaError:
            rid = layer_id
        for target in dict.fromkeys((rid, layer_id)):
            folder = self.dir(target)
            removing = self.ctx.layers / f"{Path(target).name}{REMOVING_SUFFIX}"
            if os.path.lexists(removing):
                self._destroy(removing)
            self._release_mounts(folder)
            try:
                os.rename(folder, removing)
            except FileNotFoundError:
                continue
            self._destroy(removing)

    def _release_mounts(self, folder: Path) -> None:
        if not folder.exists():
            return
        for point in mounts_under(folder):
            umount(point)
        left = mounts_under(folder)
        if left:
            raise LayerBusy(f"{folder.name} still has mounts after unmounting: {', '.join(left)}")

    def _destroy(self, folder: Path) -> None:
        """Delete a layer folder, never through a mount still inside it."""
        self._release_mounts(folder)
        shutil.rmtree(folder, ignore_errors=False, onerror=_ignore_missing)

    # -- mount / unmount ----------------------------------------------------------------------

    def own_mounts(self) -> set[str]:
        """A sandbox's image is mounted under its folder while its view is mounted."""
        return {str(img.parent / SANDBOX_MOUNT) for img in self.ctx.layers.glob(f"*/{SANDBOX_IMAGE}")}

    def mount(self, layer_id: str, chain: Sequence[str], *, rw: bool, mount_label: str = "") -> Path:
        """Overlayfs over the chain's ``Files/`` (``layerchain.json`` is the chain, as in
        the seed; the store's ``chain`` may hold ``-init`` layers that have no files)."""
        rid = self.resolve_id(layer_id)
        folder = self.dir(rid)
        view = folder / VIEW
        view.mkdir(mode=0o755, exist_ok=True)
        if is_mountpoint(view):
            return view
        lowers = [str(p) for p in self._lowers(rid)]
        image = folder / SANDBOX_IMAGE
        if image.exists():
            sandbox = folder / SANDBOX_MOUNT
            sandbox.mkdir(mode=0o700, exist_ok=True)
            quota.mount_image(image, sandbox)
            try:
                self._mount_view(view, lowers or [str(self._empty)], sandbox / "upper", sandbox / "work")
            except BaseException:
                quota.unmount_image(sandbox)
                raise
        else:
            # a lowerdir-only overlay needs two lowers; the empty one makes up the count
            self._mount_view(view, [*lowers, str(self._empty)])
        return view

    def _mount_view(self, view: Path, lowers: Sequence[str], upper: Path | None = None,
                    work: Path | None = None) -> None:
        """Overlayfs at ``view`` as the overlay driver mounts it (:mod:`lamina.fs.overlayfs`):
        redirects, metacopy and the index off, which a Windows diff could not express;
        chains past one page of options through ``lowerdir+``. Read-only with no upper."""
        mount_overlay(view, [Path(p) for p in lowers], upper, work, feats=self._overlay,
                      readonly=upper is None)

    def release_own_mounts(self, layer_id: str) -> list[str]:
        """A sandbox image left mounted with no view over it (an export that died)."""
        folder = self.dir(self.resolve_id(layer_id))
        if not is_mountpoint(folder / SANDBOX_MOUNT) or is_mountpoint(folder / VIEW):
            return []
        if not quota.release_image(folder / SANDBOX_MOUNT, folder / SANDBOX_IMAGE):
            raise MountKept(f"layer {layer_id}: its sandbox image is still in use; kept mounted")
        return [f"released the sandbox image of layer {layer_id}"]

    def unmount(self, layer_id: str) -> None:
        folder = self.dir(self.resolve_id(layer_id))
        umount(folder / VIEW)
        if is_mountpoint(folder / SANDBOX_MOUNT):
            quota.unmount_image(folder / SANDBOX_MOUNT)

    def is_mounted(self, layer_id: str) -> bool:
        return is_mountpoint(self.dir(self.resolve_id(layer_id)) / VIEW)

    @contextlib.contextmanager
    def _sandbox_upper(self, rid: str) -> Iterator[Path]:
        """The sandbox's upper directory, mounting its image for the duration if the
        layer is not mounted already."""
        sandbox = self.dir(rid) / SANDBOX_MOUNT
        if is_mountpoint(sandbox):
            yield sandbox / "upper"
            return
        sandbox.mkdir(mode=0o700, exist_ok=True)
        quota.mount_image(self.dir(rid) / SANDBOX_IMAGE, sandbox)
        try:
            yield sandbox / "upper"
        finally:
            if not is_mountpoint(self.dir(rid) / VIEW):
                quota.unmount_image(sandbox)

    # -- import ------------------------------------------------------------------------------

    def apply_diff(self, layer_id: str, parent: str | None, chain: Sequence[str], stream: IO[bytes],
                   tarsplit: IO[bytes] | None = None) -> int:
        """Import a Windows layer tar (the seed's ApplyDiff: the chain is the parent and
        the parent's chain, written after the import succeeds)."""
        parents: list[str] = []
        if parent:
            rpid = self.resolve_id(parent)
            parents = [str(self.dir(rpid)), *self.get_layer_chain(rpid)]
        size = self.import_layer(layer_id, stream, parents)
        self.set_layer_chain(layer_id, parents)
        # the import child records the tar-split beside the files; the store keeps the one
        # copy (lamina.tarsplits), so it leaves the layer folder here
        record_path = self.dir(layer_id) / TAR_RECORD
        if tarsplit is not None:
            with gzip.open(record_path, "rb") as record:
                shutil.copyfileobj(record, tarsplit, 1 << 20)
        record_path.unlink()
        return size

    def import_layer(self, layer_id: str, stream: IO[bytes], parents: Sequence[str]) -> int:
        """Run the import in a child process (the seed's importLayer re-exec) and return
        the size it reports; its failure is raised with the child's own message."""
        folders = [self._chain_folder(p) for p in parents]
        if os.environ.get(NOREEXEC_ENV):
            from lamina.drivers.windowsfilter_import import write_layer

            return write_layer(stream, self.ctx.layers, layer_id, folders)
        cmd = [sys.executable, "-m", "lamina.drivers.windowsfilter_import",
               str(self.ctx.layers), layer_id, *map(str, folders)]
        env = dict(os.environ)
        src = str(Path(lamina.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env)
            assert child.stdin is not None
            try:
                try:
                    while chunk := stream.read(1 << 20):
                        child.stdin.write(chunk)
                except BrokenPipeError:
                    pass  # the child stopped reading: its exit status says why
                finally:
                    with contextlib.suppress(BrokenPipeError):
                        child.stdin.close()
                status = child.wait()
            except BaseException:
                child.kill()
                child.wait()
                raise
            out.seek(0)
            err.seek(0)
            output, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if status != 0:
            raise _child_error(layer_id, status, errors)
        try:
            return int(output)
        except ValueError:
            raise LaminaError(f"windowsfilter import of {layer_id}: child printed {output!r}, not a size") from None

    # -- export, changes, sizes ------------------------------------------------------------------

    def diff(self, layer_id: str, parent: str | None) -> Iterator[bytes]:
        """The layer as a Windows layer tar. ``parent`` is not used, as in the seed: a
        Windows layer is always exported against its own chain.

        A sandbox, and a layer whose tar the store cannot replay, are written as
        hcsshim's exporter writes a diff layer; an imported layer is rebuilt by the store
        from its tar-split (same bytes), whatever parent is asked for
        (:attr:`exports_against_own_chain`).
        """
        rid = self.resolve_id(layer_id)
        if (self.dir(rid) / SANDBOX_IMAGE).exists():
            return self._export_sandbox(rid)
        return write_tar(self._layer_items(rid), read_meta)

    def _export_sandbox(self, rid: str) -> Iterator[bytes]:
        with self._sandbox_upper(rid) as upper:
            yield from write_tar(self._sandbox_items(rid, upper), read_meta)

    def _sandbox_items(self, rid: str, upper: Path) -> Iterator[ExportItem]:
        lowers = self._lowers(rid)
        yield ExportItem(wintar.FILES, upper)
        yield ExportItem(wintar.HIVES, None)
        yield from _walk_children(wintar.FILES, upper, "", lowers)

    def _layer_items(self, rid: str) -> Iterator[ExportItem]:
        folder = self.dir(rid)
        files = folder / wintar.FILES
        yield ExportItem(wintar.FILES, files if files.is_dir() else None)
        hives = folder / wintar.HIVES
        yield ExportItem(wintar.HIVES, hives if hives.is_dir() else None)
        if files.is_dir():
            yield from _walk_children(wintar.FILES, files, "", ())
        if hives.is_dir():
            yield from _walk_children(wintar.HIVES, hives, "", ())
        uvm = folder / wintar.UTILITY_VM
        if uvm.is_dir():
            yield ExportItem(wintar.UTILITY_VM, uvm)
            yield from _walk_children(wintar.UTILITY_VM, uvm, "", ())

    @contextlib.contextmanager
    def _items(self, rid: str) -> Iterator[Iterator[ExportItem]]:
        if (self.dir(rid) / SANDBOX_IMAGE).exists():
            with self._sandbox_upper(rid) as upper:
                yield self._sandbox_items(rid, upper)
        else:
            yield self._layer_items(rid)

    def changes(self, layer_id: str, parent: str | None) -> list[Change]:
        """What the layer's own export holds, as the seed's Changes reads it from the
        layer reader: deletions are Delete, everything else Modify (Windows cannot tell
        an add from a modify). Paths are the tar names made absolute (``/Files/...``)."""
        rid = self.resolve_id(layer_id)
        with self._items(rid) as items:
            return sorted(
                Change("/" + item.name, ChangeKind.DELETE if item.deleted else ChangeKind.MODIFY)
                for item in items
            )

    def diff_size(self, layer_id: str, parent: str | None) -> int:
        """Bytes of the regular files among the changes, each hard-linked file once
        (the seed's ChangesSize over the mounted layer)."""
        rid = self.resolve_id(layer_id)
        seen: set[tuple[int, int]] = set()
        total = 0
        with self._items(rid) as items:
            for item in items:
                if item.deleted or item.path is None:
                    continue
                st = item.path.lstat()
                if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
        return total

    def diff_getter(self, layer_id: str) -> FileGetter:
        return LayerFileGetter(self.dir(self.resolve_id(layer_id)))

    # -- information and housekeeping ------------------------------------------------------------

    def status(self) -> list[tuple[str, str]]:
        return [("Windows", "")]

    def metadata(self, layer_id: str) -> dict[str, str]:
        return {"dir": str(self.dir(layer_id))}

    def cleanup(self, known: set[str], hold: LayerHold) -> list[str]:
        """Finish removals a crash interrupted (``*-removing`` folders) and drop the
        staging folders of imports that died. A ``-removing`` folder whose removal is
        still at work (its layer held) is left to it."""
        from lamina.drivers.windowsfilter_import import is_staging, staging_in_use

        done: list[str] = []
        try:
            entries = sorted(os.scandir(self.ctx.layers), key=lambda e: e.name)
        except FileNotFoundError:
            return done
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name.endswith(REMOVING_SUFFIX):
                with hold(entry.name.removesuffix(REMOVING_SUFFIX)) as recorded:
                    if recorded is None or not os.path.lexists(entry.path):
                        continue
                    try:
                        self._destroy(Path(entry.path))
                    except (OSError, LaminaError) as e:
                        log.warning("Failed to cleanup %s: %s", entry.name, e)
                        continue
                done.append(f"removed {entry.name} (an interrupted removal)")
                continue
            for inner in os.scandir(entry.path):
                if is_staging(inner.name) and inner.is_dir(follow_symlinks=False):
                    if staging_in_use(Path(entry.path), inner.name):
                        continue
                    shutil.rmtree(inner.path, ignore_errors=True)
                    Path(inner.path + ".lock").unlink(missing_ok=True)
                    done.append(f"removed {entry.name}/{inner.name} (an import that died)")
        return done


# -- helpers --------------------------------------------------------------------------------------


def _ignore_missing(func: object, path: str, exc_info: tuple) -> None:  # type: ignore[type-arg]
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def _filesystem_problem(folder: Path) -> str | None:
    """What this driver needs of the filesystem holding the layers and it lacks:
    trusted xattrs (the metadata), character devices (whiteouts), d_type (overlayfs)."""
    probe = folder / f".windowsfilter-probe-{os.getpid()}"
    try:
        probe.touch()
        try:
            os.setxattr(probe, XATTR_NAME, b"")
        except OSError as e:
            return f"cannot hold trusted.* xattrs ({e.strerror})"
        probe.unlink()
        try:
            os.mknod(probe, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        except OSError as e:
            return f"cannot hold whiteouts (character devices: {e.strerror})"
    finally:
        probe.unlink(missing_ok=True)
    if not supports_d_type(folder):
        return "does not report file types in directory entries (d_type), which overlayfs needs"
    return None


def _child_error(layer_id: str, status: int, stderr: str) -> LaminaError:
    """The child's failure, as the error type it reported, its message kept whole."""
    from lamina import errors

    prefix = f"windowsfilter import of layer {layer_id} failed (exit status {status})"
    for line in reversed(stderr.strip().splitlines()):
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if not isinstance(report, dict) or "message" not in report:
            continue
        kind = getattr(errors, str(report.get("type")), None)
        message = f"{prefix}: {report['message']}"
        if kind is errors.InvalidArchive:
            return errors.InvalidArchive(message, report.get("entry"))
        if isinstance(kind, type) and issubclass(kind, LaminaError) and kind is not errors.QuotaExceeded:
            return kind(message)
        if report.get("errno") in (errno.ENOSPC, errno.EDQUOT):
            return errors.QuotaExceeded(message)
        return LaminaError(message)
    return LaminaError(f"{prefix}: {stderr.strip() or 'no output'}")


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _lower_names(lowers: Sequence[Path], rel: str) -> set[str]:
    """Names visible at ``rel`` in the union of ``lowers`` (nearest first)."""
    names: set[str] = set()
    masked: set[str] = set()
    for lower in lowers:
        folder = lower / rel if rel else lower
        if folder.is_symlink() or not folder.is_dir():
            break
        for entry in os.scandir(folder):
            if entry.name in names or entry.name in masked:
                continue
            if _is_whiteout(entry.stat(follow_symlinks=False)):
                masked.add(entry.name)
            elif ":" not in entry.name:
                names.add(entry.name)
        if _is_opaque(folder):
            break
    return names


def _inherit_streams(folder: Path, rel: str, lowers: Sequence[Path], upper_names: set[str],
                     streams: dict[str, list[tuple[str, Path]]]) -> None:
    """Give a file copied up into a sandbox the alternate data streams it has below.

    Overlayfs copies up the file, not its ``file:stream`` siblings, but on Windows a
    changed file keeps its streams and the exported diff must carry them. A file with
    recorded Windows metadata came up from a lower layer; one without was made from
    Linux and has no streams below.
    """
    masked = set(upper_names)
    found: dict[str, dict[str, Path]] = {}
    for lower in lowers:
        below = lower / rel if rel else lower
        if below.is_symlink() or not below.is_dir():
            break
        for entry in os.scandir(below):
            if entry.name in masked:
                continue
            masked.add(entry.name)
            split = wintar.stream_split(entry.name)
            if split and not _is_whiteout(entry.stat(follow_symlinks=False)):
                found.setdefault(split[0], {}).setdefault(split[1], Path(entry.path))
        if _is_opaque(below):
            break
    for base, lower_streams in found.items():
        path = folder / base
        if base not in upper_names or path.is_symlink() or not read_meta(path):
            continue
        own = {s for s, _ in streams.get(base, [])}
        streams.setdefault(base, []).extend((s, p) for s, p in lower_streams.items() if s not in own)


def _walk_children(top: str, folder: Path, rel: str, lowers: Sequence[Path]) -> Iterator[ExportItem]:
    """Pre-order walk in byte order, as hcsshim's layer reader walks: each folder's
    deletions right after the folder's own entry, then its children; ``name:stream``
    files go with their file as its alternate data streams."""
    entries = sorted(os.scandir(folder), key=lambda e: os.fsencode(e.name))
    stats = {e.name: e.stat(follow_symlinks=False) for e in entries}
    present = {n for n, st in stats.items() if not _is_whiteout(st)}
    deleted = {n for n, st in stats.items() if _is_whiteout(st)}
    if lowers and _is_opaque(folder):
        # an opaque folder (deleted and made again): Windows needs one deletion per name
        deleted |= _lower_names(lowers, rel) - present
    prefix = f"{top}/{rel}" if rel else top
    for name in sorted(deleted, key=os.fsencode):
        yield ExportItem(f"{prefix}/{name}", None, deleted=True)
    streams: dict[str, list[tuple[str, Path]]] = {}
    for name in present:
        split = wintar.stream_split(name)
        if split and split[0] in present:
            streams.setdefault(split[0], []).append((split[1], folder / name))
    if lowers:
        _inherit_streams(folder, rel, lowers, present | deleted, streams)
    attached = {f"{base}:{s}" for base, lst in streams.items() for s, _ in lst}
    for entry in entries:
        if entry.name not in present or entry.name in attached:
            continue
        child_rel = f"{rel}/{entry.name}" if rel else entry.name
        yield ExportItem(f"{top}/{child_rel}", Path(entry.path),
                    streams=sorted(streams.get(entry.name, []), key=lambda s: os.fsencode(s[0])))
        if stat.S_ISDIR(stats[entry.name].st_mode):
            yield from _walk_children(top, Path(entry.path), child_rel, lowers)


class LayerFileGetter(FileGetter):
    """Opens a layer's files by tar name (the seed's fileGetCloserWithBackupPrivileges):
    the BCD files from their pristine ``bcd*.bak`` copies, everything else from the layer
    folder, names matched case-blind as NTFS does, never through a symlink."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, name: str) -> IO[bytes]:
        parts = wintar.split_name(name)
        backup = wintar.MUTATED_FILES.get("/".join(parts))
        if backup is not None and (self.folder / backup).is_file():
            return open(self.folder / backup, "rb")
        dfd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
                try:
                    fd = os.open(part, flags, dir_fd=dfd)
                except FileNotFoundError:
                    folded = part.casefold()
                    match = next((n for n in os.listdir(dfd) if n.casefold() == folded), None)
                    if match is None:
                        raise FileNotFoundError(errno.ENOENT, f"{name}: not in layer {self.folder.name}") from None
                    fd = os.open(match, flags, dir_fd=dfd)
                os.close(dfd)
                dfd = fd
            return os.fdopen(os.dup(dfd), "rb")
        finally:
            os.close(dfd)
