"""vfs: every layer a whole tree; a child starts as a copy of its parent.

The simplest driver and the one that works anywhere, unprivileged: no mounts, no kernel
features. The view of a layer is its own directory. Copies share blocks where the
filesystem supports reflinks, so on btrfs/xfs a child costs metadata only.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from lamina.archive.apply import ApplyOptions, apply_tar
from lamina.drivers.base import (
    ContentTree,
    CreateOptions,
    Driver,
    DriverContext,
    FileGetter,
    MountSpec,
    refuse_unknown,
)
from lamina.errors import LayerUnreadable, QuotaNotSupported
from lamina.fs import staging
from lamina.fs.backingfs import backing_fs
from lamina.fs.copy import copy_tree
from lamina.fs.getter import DirFileGetter
from lamina.fs.relax import force_rmtree, readable_tree
from lamina.fs.usage import disk_usage


class VfsDriver(Driver):
    """Full copies per layer (Docker's vfs)."""

    name = "vfs"

    def __init__(self, ctx: DriverContext) -> None:
        super().__init__(ctx)
        # vfs has no driver options: any given is a mistake (a key meant for another
        # driver, a typo), said now rather than ignored
        refuse_unknown(ctx.options, (), "driver option", self.name)

    def create(self, layer_id: str, parent: str | None, *, rw: bool, opts: CreateOptions) -> None:
        if opts.size:
            raise QuotaNotSupported(
                f"layer {layer_id}: the vfs driver cannot limit a layer's size; use the overlay driver"
            )
        work = staging.creating(self.ctx.tmp, layer_id)
        force_rmtree(work)
        if parent is None:
            os.mkdir(work, 0o755)
            os.chmod(work, 0o755)  # mkdir is subject to umask
        else:
            try:
                copy_tree(self.layer_dir(parent), work)
            except OSError as e:
                force_rmtree(work)  # no half-made copy stays behind
                if e.errno in (errno.EACCES, errno.EPERM):
                    raise LayerUnreadable(f"layer {layer_id}: cannot copy {e.filename or '.'} of parent "
                                          f"{parent}: {e.strerror}") from None
                e.add_note(f"while copying parent {parent} for layer {layer_id}")
                raise
        os.rename(work, self.layer_dir(layer_id))

    def remove(self, layer_id: str) -> None:
        target = self.layer_dir(layer_id)
        doomed = staging.removing(self.ctx.tmp, layer_id)
        try:
            os.rename(target, doomed)
        except FileNotFoundError:
            pass
        else:
            _remove(layer_id, doomed)
        _remove(layer_id, staging.creating(self.ctx.tmp, layer_id))

    def mount(self, layer_id: str, chain: Sequence[str], *, rw: bool, mount_label: str = "") -> Path:
        return self.layer_dir(layer_id)

    def unmount(self, layer_id: str) -> None:
        return None

    def mount_specs(self, layer_id: str, chain: Sequence[str], *, writable: bool) -> list[MountSpec]:
        """A bind mount of the layer's own full tree (containerd's ``native``)."""
        return [MountSpec("bind", str(self.layer_dir(layer_id)), ("rw" if writable else "ro", "rbind"))]

    def disk_usage(self, layer_id: str) -> tuple[int, int]:
        """The whole tree: a vfs layer holds a full copy (``native`` counts it so too)."""
        return disk_usage(self.layer_dir(layer_id))

    def apply_diff(self, layer_id: str, parent: str | None, chain: Sequence[str], stream: IO[bytes],
                   tarsplit: IO[bytes] | None = None) -> int:
        # the layer dir already holds a copy of the parent: unpack straight into it
        opts = ApplyOptions(
            whiteouts="delete",
            uid_map=self.ctx.uid_map,
            gid_map=self.ctx.gid_map,
            tarsplit=tarsplit,
        )
        return apply_tar(self.layer_dir(layer_id), stream, opts)

    def diff_getter(self, layer_id: str) -> FileGetter:
        return DirFileGetter(self.layer_dir(layer_id))

    def content_tree(self, layer_id: str, parent: str | None) -> ContentTree:
        """The layer's directory: its whole chain, whiteouts applied by deleting."""
        return ContentTree(self.layer_dir(layer_id), whole_chain=True, whiteouts="delete")

    @contextlib.contextmanager
    def readable(self, layer_id: str) -> Iterator[None]:
        """An unprivileged owner's layer may hold 0000 directories (from the image, or a
        container's chmod): they are widened for the reader and put back after
        (:func:`lamina.fs.relax.readable_tree`); nothing happens for root."""
        try:
            with readable_tree(self.layer_dir(layer_id)):
                yield
        except PermissionError as e:
            raise LayerUnreadable(f"layer {layer_id}: cannot read {e.filename or '.'}: {e.strerror}") from None

    def status(self) -> list[tuple[str, str]]:
        # statfs's name, as overlay's status says it (Docker's spelling: "extfs" for ext4)
        return [("Backing Filesystem", backing_fs(self.ctx.root))]

    def metadata(self, layer_id: str) -> dict[str, str]:
        return {"Dir": str(self.layer_dir(layer_id))}


def _remove(layer_id: str, path: Path) -> None:
    """Remove a tree even where modes forbid it (a layer may hold 0000 dirs, which an
    unprivileged owner widens first); what cannot go is named with its layer."""
    try:
        force_rmtree(path)
    except OSError as e:
        raise LayerUnreadable(f"layer {layer_id}: cannot remove {e.filename or path}: "
                              f"{e.strerror}") from None
