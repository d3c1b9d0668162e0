"""The contract between the store and a driver, told first as a story.

The lifecycle
-------------
A user imports an image of two layers. The store checks the IDs, writes a record that
says layer ``A`` is *creating*, and asks the driver to ``create("A", None, rw=False)``:
the driver makes ``layers/A/`` in whatever shape it likes. The store then feeds the first
layer tar: a driver that can unpack straight into its own layout (it is a
:class:`NativeApply`) does so and returns the size; otherwise (or if it declines, with
``None``) the store mounts the layer and lets the archive engine unpack into the mounted
view. Only when that has finished and been synced does the store mark ``A`` *ready*. A
crash before then leaves a *half-made* layer (a creating record whose maker is gone),
which :meth:`Store.cleanup` finds and removes with :meth:`Driver.remove`. The second
layer ``B`` is made the same way with parent ``A``.

The user then runs a container: ``create("C", "B", rw=True, size=...)`` makes a
read-write layer, and ``mount("C", ["C", "B", "A"], rw=True)`` returns one directory that
shows the union of the chain, nearest layer first. The store counts references across
processes and calls ``mount`` only for the first and ``unmount`` only for the last, so a
driver never sees a second mount of the same layer. The container writes; the user asks
for changes and a diff. A driver that can answer from its own layout (overlay reads its
upper directory: a :class:`NativeDiff`, :class:`NativeChanges`, :class:`NativeDiffSize`)
does so; for the others, and where a driver declines, the store compares the mounted
layer against its mounted parent with the archive engine (:mod:`lamina.naive`).

At the end the store refuses to remove a layer that has children or is mounted, and
otherwise calls :meth:`Driver.remove`, which must tolerate a half-made layer: it is also
how crash leftovers go.

The words
---------
*layer*: an ID, an optional parent, content. *chain*: a layer and its ancestors, nearest
first. *read-only layer*: image content, made by ``create`` (+ ``apply_diff``).
*read-write layer*: a container's changes, made by ``create_rw``; it may have a *size*
limit. *view*: the directory ``mount`` returns. *diff*: a layer's changes as a tar.
*record*: what the store keeps about a layer (parent, kind, state); drivers never write
records, and the store never looks inside ``layers/<id>/``. *state*
(:class:`lamina.records.LayerState`): *creating* while a layer is made or filled,
*ready* once complete (the only state anyone else sees), *removing* while it goes;
*half-made*: creating, and its maker is gone.

What the store guarantees a driver
----------------------------------
IDs are valid (:func:`lamina.ids.check_id`); ``create`` is never called for an existing
ID and its parent is complete (for an :class:`ApplyPlanner`, the parent may still be
being filled by the same caller, which never marks the child ready before it); calls that change one layer are serialised per layer by
the store's locks; ``mount``/``unmount`` calls are paired and never nested per layer.

What a driver may do beyond the contract
----------------------------------------
Each optional operation is a small :class:`typing.Protocol` below; a driver has the
capability if it has the method (the store asks once, with ``isinstance``). A method may
still decline for particular arguments by returning ``None`` (overlay's native diff only
describes a layer against its own parent); the store then does it the naive way.
"""

from __future__ import annotations

import abc
import contextlib
import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, Literal, Protocol, runtime_checkable

from lamina.archive.apply import ApplyOptions
from lamina.archive.change import Change
from lamina.errors import InvalidOption
from lamina.fs.durable import syncfs
from lamina.fs.getter import FileGetter  # part of the contract: diff_getter returns one


class LayerHold(Protocol):
    """Cleanup's hold on one layer, lent by the store to :meth:`Driver.cleanup`.

    ``with hold(layer_id) as recorded:`` yields None when work on the layer is going on
    (leave everything of it alone), else whether the layer has a record; for the block
    nobody can start making, filling or removing it. Why a driver needs it: a layer
    made after cleanup listed the records would otherwise look like a stray and be
    deleted, and a removal in progress would be raced to the same files."""

    def __call__(self, layer_id: str) -> contextlib.AbstractContextManager[bool | None]: ...


@dataclass(frozen=True)
class MountSpec:
    """One mount for someone else to perform: mount(2)'s type, source and fstab-style
    options (containerd's ``Mount``). A face that hands mounts out (the containerd
    snapshotter) returns these instead of mounting; the store counts no reference."""

    type: str
    source: str
    options: tuple[str, ...]


@dataclass
class CreateOptions:
    """Options for a new layer (Docker's CreateOpts, parsed)."""

    #: size limit in bytes for a read-write layer (StorageOpt "size"); None = unlimited
    size: int | None = None
    mount_label: str = ""
    #: every StorageOpt as given, for driver-specific keys
    storage_opt: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ContentTree:
    """Where a driver keeps a layer's files as the layer's tar put them, for ``check``
    to compare with the tar's headers (:mod:`lamina.treecheck`)."""

    path: Path
    #: the tree holds the layer's whole chain (vfs); else the layer's own changes only
    whole_chain: bool
    #: how whiteouts were applied into it (lamina.archive.apply.ApplyOptions.whiteouts)
    whiteouts: Literal["delete", "overlay"]
    #: the xattr that marks an opaque directory, in "overlay" mode
    opaque_xattr: str = ""


@dataclass
class DriverContext:
    """What a driver is given at start: where it lives and how it was configured."""

    #: the store root; the driver owns ``root/"layers"/<id>`` and may keep private
    #: state under ``root/<driver name>/`` (overlay's ``l/`` short links live at ``root/"l"``)
    root: Path
    #: driver options (``--storage-opt`` / ``Init``'s ``Opts``), already split at '='
    options: dict[str, str] = field(default_factory=dict)
    #: Docker-style ID maps: (container_id, host_id, size) triples
    uid_map: Sequence[tuple[int, int, int]] = ()
    gid_map: Sequence[tuple[int, int, int]] = ()

    # cached: every layer path is made from these, several times per call
    @functools.cached_property
    def layers(self) -> Path:
        return self.root / "layers"

    @functools.cached_property
    def tmp(self) -> Path:
        return self.root / "tmp"


class Driver(abc.ABC):
    """One way of keeping layer content. One module per driver, one subclass each."""

    #: the name users pass to ``--driver`` and that the store records
    name: ClassVar[str]
    #: what a layer's files are: "linux" (POSIX modes, owners, xattrs, whiteouts: the
    #: moby graphtest trees) or "windows" (``Files/``, ``Hives/``, Windows PAX records);
    #: the shared conformance suite runs every registered driver of the Linux model
    content_model: ClassVar[str] = "linux"
    #: whether a diff is always of the layer against its own parent, whatever parent is
    #: asked for (a Windows layer is exported against its own chain), so the store
    #: replays an imported layer's tar-split for any parent
    exports_against_own_chain: ClassVar[bool] = False
    #: whether layers are shown through overlayfs (overlay, windowsfilter): then the
    #: xattrs overlayfs reads as its own (``trusted.overlay.*``, ``user.overlay.*``) must
    #: never come from a tar, on any layer, and ``check`` reports them
    shows_through_overlayfs: ClassVar[bool] = False
    #: the per-layer storage options (``--storage-opt``, Docker's StorageOpt) the driver
    #: knows, lower case; keys match case-blind, as overlay2's do. Any other key is
    #: refused (:func:`refuse_unknown`): a misspelt ``siz=10G`` must not make an
    #: unlimited layer
    storage_opt_keys: ClassVar[frozenset[str]] = frozenset({"size"})

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx

    # -- availability -------------------------------------------------------------

    @classmethod
    def unavailable_reason(cls, root: Path) -> str | None:
        """Why this driver cannot run for a store at ``root`` here, or None if it can.

        Checked before the store is opened with this driver, and used to pick the
        default driver; the reason is shown by ``lamina info``.
        """
        return None

    # -- layer lifecycle ----------------------------------------------------------

    def layer_dir(self, layer_id: str) -> Path:
        """Where the driver keeps ``layer_id``'s content."""
        return self.ctx.layers / layer_id

    @abc.abstractmethod
    def create(self, layer_id: str, parent: str | None, *, rw: bool, opts: CreateOptions) -> None:
        """Make the content of a new, empty layer over ``parent`` (complete, not None).

        Raise :class:`~lamina.errors.QuotaNotSupported` if ``opts.size`` is set and the
        driver cannot enforce it.
        """

    @abc.abstractmethod
    def remove(self, layer_id: str) -> None:
        """Delete the layer's content, whole or half-made. Must not fail if it is gone."""

    @abc.abstractmethod
    def mount(self, layer_id: str, chain: Sequence[str], *, rw: bool, mount_label: str = "") -> Path:
        """Return a directory showing the union of ``chain`` (``chain[0] == layer_id``,
        nearest first). Called only for the first reference. A read-only layer's view
        should be read-only where the driver can make it so."""

    @abc.abstractmethod
    def unmount(self, layer_id: str) -> None:
        """Undo :meth:`mount`. Called for the last reference, and by cleanup for stale
        mounts: must not fail if nothing is mounted."""

    def make_durable(self, layer_id: str, parent: str | None) -> None:
        """Make what :meth:`create` just made for ``layer_id`` survive a power loss; the
        store calls it before it records the layer ready. The default flushes the store's
        whole filesystem (``syncfs``), right whatever ``create`` wrote (vfs copies the
        parent's files); a driver that knows the few things it made may fsync just
        those, sparing the flush of everything else being written meanwhile."""
        syncfs(self.ctx.root)

    def own_mounts(self) -> set[str]:
        """Mount points the driver keeps by itself, outside :meth:`mount` (e.g. the sized
        filesystem image under a read-write layer), so ``check`` does not call them leaked."""
        return set()

    def release_own_mounts(self, layer_id: str) -> list[str]:
        """Unmount what the driver keeps mounted by itself for ``layer_id`` (its part of
        :meth:`own_mounts`), to be mounted again when the layer is next used; one line
        per thing released. The store calls it at the end of use (``cleanup`` with
        ``unmount_all``) for a layer it holds idle: no view of it, or of a layer built on
        it, is mounted, and nobody is at work on it. Something the store cannot see may
        still use it (a mount containerd made from the layer's snapshot): then it is
        left as it is and :class:`lamina.errors.MountKept` is raised, never a lazy
        unmount that would let a later use attach it a second time."""
        return []

    def content_tree(self, layer_id: str, parent: str | None) -> ContentTree | None:
        """Where the layer's files are as its tar made them (the layer has a parent
        ``parent``), or None if the driver keeps them otherwise (Windows layers)."""
        return None

    def readable(self, layer_id: str) -> contextlib.AbstractContextManager[None]:
        """Make the layer's own files readable to this process while the context lasts
        (a reader of its content is inside): for a driver whose unprivileged owner may
        hold directories of mode 0000. Nothing, by default."""
        return contextlib.nullcontext()

    def is_mounted(self, layer_id: str) -> bool:
        """Whether the view of ``layer_id`` is mounted now (for cleanup and check)."""
        return False

    # -- information and housekeeping ---------------------------------------------

    def status(self) -> list[tuple[str, str]]:
        """Docker's Status pairs, e.g. ``[("Backing Filesystem", "extfs")]``."""
        return []

    def metadata(self, layer_id: str) -> dict[str, str]:
        """Docker's GetMetadata for one layer (paths the user may want to know)."""
        return {}

    def cleanup(self, known: set[str], hold: LayerHold) -> list[str]:
        """Remove the driver's own leftovers and return one line per thing removed.

        Cleanup runs beside other work (containerd calls it after every garbage
        collection), so ``known`` (the IDs recorded when it began) is only a first sort:
        whatever it suggests removing or restoring is decided again inside
        ``hold(owner)``, which stops work on that layer from starting meanwhile."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook: most drivers hold nothing
        """Release process resources (open fds); the store's mounts stay."""


def refuse_unknown(given: Iterable[str], known: Iterable[str], what: str, driver: str) -> None:
    """Raise :class:`InvalidOption` for the first key of ``given`` that is not one of
    ``known`` (compared case-blind), naming it and listing the known ones: an option
    nobody reads is a mistake the user should hear about, as overlay2 says so."""
    allowed = {k.lower() for k in known}
    for key in given:
        if key.lower() not in allowed:
            listing = ", ".join(sorted(allowed)) if allowed else "none"
            raise InvalidOption(f"unknown {what} {key!r} for driver {driver} (known: {listing})")


# -- optional capabilities -------------------------------------------------------------


@runtime_checkable
class NativeApply(Protocol):
    """Unpacks a layer tar into its own layout, without mounting (vfs, overlay)."""

    def apply_diff(self, layer_id: str, parent: str | None, chain: Sequence[str], stream: IO[bytes],
                   tarsplit: IO[bytes] | None = None) -> int | None:
        """Unpack a layer tar into the new, empty layer ``layer_id``; return the size
        applied (sum of regular-file sizes in the tar), or None to let the store mount
        the layer and unpack into the view. ``chain`` is the new layer's chain (for
        hardlinks into lower layers). When ``tarsplit`` is given, the tar's headers and
        padding are recorded into it (:mod:`lamina.archive.tar.split`)."""


@dataclass(frozen=True)
class ApplyPlan:
    """Where and how a layer tar is unpacked: a directory and the archive engine's options
    (without the tar-split stream, which the caller supplies), plain data that a worker
    process can act on."""

    root: Path
    options: ApplyOptions


@runtime_checkable
class ApplyPlanner(Protocol):
    """Unpacks each layer into a directory of its own that no other layer's unpacking
    writes to, and can make a layer over a parent that is still being filled (overlay:
    each layer into its own ``diff/``; ``create`` only reads the parent's short name). The
    store may then unpack several layers of one chain at once (:mod:`lamina.chainapply`).
    vfs cannot: a child starts as a copy of its whole parent."""

    def apply_plan(self, layer_id: str, parent: str | None, chain: Sequence[str]) -> ApplyPlan | None:
        """How :meth:`NativeApply.apply_diff` would unpack into the new, empty layer
        ``layer_id``; None where it would decline. The options' ``lower_roots`` are the
        chain's directories below, which the engine reads only through
        ``wait_for_lowers``."""


@runtime_checkable
class NativeDiff(Protocol):
    """Writes a layer's changes as a tar from its own layout (overlay's upper dir)."""

    def diff(self, layer_id: str, parent: str | None) -> Iterator[bytes] | None:
        """The layer's changes against ``parent`` as tar chunks, or None."""


@runtime_checkable
class NativeChanges(Protocol):
    """Lists a layer's changes from its own layout."""

    def changes(self, layer_id: str, parent: str | None) -> list[Change] | None:
        """The layer's changes against ``parent``, or None."""


@runtime_checkable
class NativeDiffSize(Protocol):
    """Sizes a layer's changes from its own layout."""

    def diff_size(self, layer_id: str, parent: str | None) -> int | None:
        """Bytes of regular-file content changed against ``parent``, or None."""


@runtime_checkable
class NativeFileGetter(Protocol):
    """Opens a layer's own files by tar name without mounting (for tar-split replay)."""

    def diff_getter(self, layer_id: str) -> FileGetter:
        """A getter for the layer's own files (the store mounts the view for drivers
        without one)."""


@runtime_checkable
class MountDescriber(Protocol):
    """Describes its views as mounts for another program to perform (containerd)."""

    def mount_specs(self, layer_id: str, chain: Sequence[str], *, writable: bool) -> list[MountSpec]:
        """The mounts that show ``chain``'s union (nearest first). ``writable`` asks for
        a view whose writes land in ``layer_id`` (a read-write layer); otherwise the
        view must be read-only. Nothing is mounted here."""


@runtime_checkable
class UsageMeter(Protocol):
    """Measures the disk a layer's own content takes."""

    def disk_usage(self, layer_id: str) -> tuple[int, int]:
        """(bytes of disk, inodes), as ``du`` counts them (allocated blocks, hard links
        once)."""


@dataclass(frozen=True)
class Capabilities:
    """What one driver can do beyond the contract, asked once (``isinstance`` on a
    runtime-checkable Protocol looks at every method, too slow for every call)."""

    apply: NativeApply | None
    plan: ApplyPlanner | None
    diff: NativeDiff | None
    changes: NativeChanges | None
    diff_size: NativeDiffSize | None
    files: NativeFileGetter | None
    mount_specs: MountDescriber | None
    usage: UsageMeter | None

    @classmethod
    def of(cls, driver: Driver) -> Capabilities:
        def cap(proto: type) -> object:
            return driver if isinstance(driver, proto) else None

        return cls(apply=cap(NativeApply), plan=cap(ApplyPlanner), diff=cap(NativeDiff), changes=cap(NativeChanges),  # type: ignore[arg-type]
                   diff_size=cap(NativeDiffSize), files=cap(NativeFileGetter),  # type: ignore[arg-type]
                   mount_specs=cap(MountDescriber), usage=cap(UsageMeter))  # type: ignore[arg-type]


__all__ = ["ApplyPlan", "ApplyPlanner", "Capabilities", "ContentTree", "CreateOptions", "Driver", "DriverContext",
           "FileGetter", "MountDescriber",
           "MountSpec", "NativeApply", "NativeChanges", "NativeDiff", "NativeDiffSize", "NativeFileGetter",
           "UsageMeter", "refuse_unknown"]
