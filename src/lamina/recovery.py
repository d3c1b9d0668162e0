"""One recovery engine: :func:`scan` finds what crashes, reboots and careless hands left,
:func:`repair` mends what can be mended. ``Store.cleanup`` and ``lamina check`` are two
faces of it, so they can never disagree about what is wrong.

Modelled on borg's ``Repository.check(repair=...)``: the scan reads and changes nothing;
each :class:`Problem` has a :class:`Kind`, the layer (or path) at fault, one line saying
what is wrong, and whether it is repairable. Repairs never lose a complete layer: a
layer whose content no longer matches its DiffID, or whose parent's record is lost, is
reported and left for the user to decide.

Nothing is judged from a stale picture. Work in progress is told from work that died by
the layer's work lock (:mod:`lamina.worklocks`): a creating record, a ``tmp/`` entry or
an orphan directory whose lock is held is somebody's work, not a problem. Each repair
checks its problem again under the locks it takes (the scan may be seconds old, other
processes go on working) and does nothing if the problem has gone. Mounts are judged
while no mount is in flight (:meth:`lamina.mounts.Mounts.no_mount_in_flight`).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lamina import liveness
from lamina.archive.tar.split import reassemble
from lamina.errors import LaminaError, MountKept
from lamina.fs import staging
from lamina.fs.mount import mounts_under, umount
from lamina.fs.relax import force_rmtree
from lamina.ids import check_id
from lamina.records import LayerRecord, LayerState, MountRef, SnapshotRecord

if TYPE_CHECKING:
    from lamina.store import Store
    from lamina.treecheck import Finding

log = logging.getLogger(__name__)


class Kind(enum.Enum):
    """What is wrong. Listed in the order :func:`repair` mends them."""

    EARLIER_BOOT = "mount reference or mount record from an earlier boot"
    DEAD_REFERENCE = "mount reference held by a process that is gone"
    UNREFERENCED_MOUNT = "view recorded as mounted that no reference holds"
    LEAKED_MOUNT = "mount under the root that no record names"
    HALF_MADE = "layer whose creation was interrupted"
    HALF_REMOVED = "layer whose removal was interrupted"
    SNAPSHOT_WITHOUT_LAYER = "containerd snapshot whose layer has no record"
    SNAPSHOT_UNFINISHED = "containerd snapshot whose layer's creation or removal was interrupted"
    SNAPSHOT_MISMATCH = "containerd snapshot that disagrees with its layer"
    LEFTOVER = "work of an interrupted operation left in tmp/"
    ORPHAN_DIRECTORY = "layer directory with no record"
    ORPHAN_TARSPLIT = "tar-split with no layer"
    LOST_TARSPLIT = "layer whose tar-split is gone"
    LOST_PARENT = "layer whose parent has no record"
    MISSING_CONTENT = "layer whose content directory is gone"
    CONTENT_MISMATCH = "layer whose content does not match its DiffID"
    TREE_MISMATCH = "read-only layer whose files differ from the tar it was made from"
    OVERLAY_XATTR = "layer holding overlayfs xattrs that the store did not set"

    @property
    def repairable(self) -> bool:
        return self not in _NOT_REPAIRABLE


_NOT_REPAIRABLE = {Kind.LOST_PARENT, Kind.MISSING_CONTENT, Kind.CONTENT_MISMATCH, Kind.SNAPSHOT_MISMATCH,
                   Kind.TREE_MISMATCH, Kind.OVERLAY_XATTR}


@dataclass(frozen=True)
class Problem:
    """One thing wrong: its kind, the layer at fault (None when only a path names it),
    one line for a user, and what a repair acts on (a reference, a path, a file name)."""

    kind: Kind
    layer: str | None
    message: str
    subject: object = None

    @property
    def repairable(self) -> bool:
        return self.kind.repairable

    def __str__(self) -> str:
        where = f"layer {self.layer}: " if self.layer else ""
        return f"{where}{self.message}"


# -- the scan ------------------------------------------------------------------------------


def scan(store: Store, *, content: bool = False, trees: bool = False) -> list[Problem]:
    """Everything wrong with the store; ``content`` also re-hashes every imported layer
    against its DiffID (slow: it reads every byte); ``trees`` walks every read-only
    layer's tree against its tar's headers (:mod:`lamina.treecheck`; ``check`` asks for
    it, cleanup does not: it repairs nothing there and would walk every layer)."""
    with store.records.read() as db:
        records = {r.id: r for r in db.layers()}
        refs = db.refs()
        mounts = db.mounts()
        snapshots = db.snapshots(ready_only=False)
    problems = _layers(store, records) + _snapshots(store, records, snapshots)
    problems += _references(store, refs, mounts) + _leaks(store)
    problems += _files(store, records)
    if content:
        problems += _content(store, records)
    if trees:
        problems += [Problem(Kind.OVERLAY_XATTR if f.overlay_xattr else Kind.TREE_MISMATCH, f.layer, f.message)
                     for f in _check_trees(store, records, content)]
    return problems


def _layers(store: Store, records: dict[str, LayerRecord]) -> list[Problem]:
    out: list[Problem] = []
    for rec in records.values():
        if not rec.complete:
            if store.work_locks.is_idle(rec.id):  # else its maker or remover is at work
                if rec.state is LayerState.CREATING:
                    out.append(Problem(Kind.HALF_MADE, rec.id, "half-made (an import or create was interrupted)"))
                else:
                    out.append(Problem(Kind.HALF_REMOVED, rec.id, "removal was interrupted"))
            continue
        if rec.parent is not None and rec.parent not in records:
            out.append(Problem(Kind.LOST_PARENT, rec.id, f"parent {rec.parent} has no record"))
        where = store.driver.layer_dir(rec.id)
        if not where.exists():
            out.append(Problem(Kind.MISSING_CONTENT, rec.id, f"content directory {where} is missing"))
        if rec.has_tarsplit and not store.tarsplits.exists(rec.id):
            out.append(Problem(Kind.LOST_TARSPLIT, rec.id,
                               "tar-split record is missing (diff will not be byte-exact)"))
    return out


def _snapshots(store: Store, records: dict[str, LayerRecord], snapshots: list[SnapshotRecord]) -> list[Problem]:
    """The containerd snapshotter's rows against the layers they name. A row is written
    in the transaction of its layer's first record and dropped in that of its last, so
    a row whose layer has no record, or an unfinished one nobody is at work on, is what
    a crash (or a cleanup that finished a removal without the snapshotter) left; a row
    that disagrees with its layer (kind, parent) is damage no repair can undo."""
    out: list[Problem] = []
    by_key = {s.key: s for s in snapshots}
    for snap in snapshots:
        rec = records.get(snap.layer)
        named = f"containerd snapshot {snap.key!r}"
        if rec is None:
            out.append(Problem(Kind.SNAPSHOT_WITHOUT_LAYER, snap.layer, f"{named} names this layer, which has no record",
                               snap.key))
            continue
        if not rec.complete:
            if store.work_locks.is_idle(rec.id):  # else a Prepare or Remove is at work
                what = "creation" if rec.state is LayerState.CREATING else "removal"
                out.append(Problem(Kind.SNAPSHOT_UNFINISHED, snap.layer,
                                   f"{named} names this layer, whose {what} was interrupted", snap.key))
            continue
        wrong = _snapshot_disagrees(snap, rec, by_key)
        if wrong:
            out.append(Problem(Kind.SNAPSHOT_MISMATCH, snap.layer, f"{named}: {wrong}", snap.key))
    return out


def _snapshot_disagrees(snap: SnapshotRecord, rec: LayerRecord, by_key: dict[str, SnapshotRecord]) -> str:
    """What is wrong between a snapshot row and its complete layer ("" if nothing): an
    active snapshot is a read-write layer, a view or committed one a read-only layer,
    and the parent snapshot's layer is the layer's parent."""
    if rec.rw != (snap.kind == "active"):
        return f"it is {snap.kind} but its layer is {'read-write' if rec.rw else 'read-only'}"
    if snap.parent is None:
        return f"it has no parent but its layer has parent {rec.parent}" if rec.parent is not None else ""
    parent = by_key.get(snap.parent)
    if parent is None:
        return f"its parent snapshot {snap.parent!r} has no record"
    if parent.layer != rec.parent:
        return f"its parent {snap.parent!r} is layer {parent.layer}, but its layer's parent is {rec.parent}"
    return ""


def _references(store: Store, refs: list[MountRef], mounts: list) -> list[Problem]:  # type: ignore[type-arg]
    out: list[Problem] = []
    boot = liveness.boot_id()
    for ref in refs:
        if ref.boot_id != boot:
            out.append(Problem(Kind.EARLIER_BOOT, ref.layer, "mount reference from an earlier boot", ref))
        elif not ref.persistent and not liveness.alive(ref.pid, ref.pid_start):
            out.append(Problem(Kind.DEAD_REFERENCE, ref.layer, f"mount reference held by dead process {ref.pid}", ref))
    held = {r.layer for r in refs}
    for m in mounts:
        if m.layer in held:
            continue
        kind = Kind.EARLIER_BOOT if m.boot_id != boot else Kind.UNREFERENCED_MOUNT
        out.append(Problem(kind, m.layer, "recorded as mounted with no reference"))
    return out


def _leaks(store: Store) -> list[Problem]:
    """Mounts under the root that neither a record nor the driver accounts for."""
    with store.mounts.no_mount_in_flight() as quiet:
        if not quiet:
            log.info("mounts kept being made; leaked mounts are judged next time")
            return []
        return [Problem(Kind.LEAKED_MOUNT, None, f"mount at {point} is not recorded (leaked mount)", point)
                for point in _unaccounted_mounts(store)]


def _unaccounted_mounts(store: Store) -> list[str]:
    """Caller holds off mounts in flight. Mounts in ``tmp/`` of work still going on
    (an overlay layer being made with its size image) are that work's."""
    with store.records.read() as db:
        known = {os.path.realpath(m.path) for m in db.mounts()}
    known |= {os.path.realpath(p) for p in store.driver.own_mounts()}
    root = os.path.realpath(store.root)
    tmp = os.path.realpath(store.root / "tmp") + "/"
    out = []
    for point in mounts_under(root):
        if point == root or point in known:
            continue
        if point.startswith(tmp):
            owner = staging.owner(point[len(tmp):].split("/", 1)[0])
            if not store.work_locks.is_idle(owner):
                continue
        out.append(point)
    return out


def _files(store: Store, records: dict[str, LayerRecord]) -> list[Problem]:
    """Leftovers in ``tmp/``, layer directories and tar-splits that no record owns."""
    out: list[Problem] = []
    # a parent named by a record is never an orphan, even if its own record is lost:
    # its content is part of the child's chain
    known = set(records) | {r.parent for r in records.values() if r.parent}
    for entry in sorted((store.root / "tmp").iterdir()):
        owner = staging.owner(entry.name)
        if owner not in known or store.work_locks.is_idle(owner):
            rel = entry.relative_to(store.root)
            out.append(Problem(Kind.LEFTOVER, None, f"leftover {rel} of interrupted work", entry))
    layers = store.driver.ctx.layers
    for entry in sorted(layers.iterdir()) if layers.is_dir() else []:
        name = entry.name
        if name in known or staging.in_progress(name):
            continue  # a layer, or a driver's own work in progress (its cleanup's job)
        try:
            check_id(name)
        except LaminaError:
            continue
        if store.work_locks.is_idle(name):
            out.append(Problem(Kind.ORPHAN_DIRECTORY, None, f"orphan directory {entry} has no record", name))
    for name in store.tarsplits.names():
        if store.tarsplits.owner(name) not in known:
            out.append(Problem(Kind.ORPHAN_TARSPLIT, None, f"orphan tar-split {name} has no layer", name))
    return out


def _content(store: Store, records: dict[str, LayerRecord]) -> list[Problem]:
    out: list[Problem] = []
    for rec in records.values():
        if not rec.complete or rec.rw or not rec.has_tarsplit or not rec.diff_id:
            continue
        if not store.tarsplits.exists(rec.id):
            continue
        digest = hashlib.sha256()
        try:
            with store.diff_getter(rec.id) as getter, store.tarsplits.open(rec.id) as ts:
                for chunk in reassemble(ts, getter):
                    digest.update(chunk)
        except (LaminaError, OSError) as e:
            out.append(Problem(Kind.CONTENT_MISMATCH, rec.id, f"content cannot be rebuilt from its tar-split: {e}"))
            continue
        if "sha256:" + digest.hexdigest() != rec.diff_id:
            out.append(Problem(Kind.CONTENT_MISMATCH, rec.id, f"content does not match its DiffID {rec.diff_id}"))
    return out


# -- the repairs ---------------------------------------------------------------------------


def repair(store: Store, problems: list[Problem]) -> list[str]:
    """Mend the repairable ``problems``, in the order of :class:`Kind`; one line per
    thing mended. A problem that has gone since the scan is left alone."""
    done: list[str] = []
    todo = [p for p in problems if p.repairable]
    order = list(Kind)
    todo.sort(key=lambda p: order.index(p.kind))
    if any(p.kind is Kind.EARLIER_BOOT for p in todo):
        done += _reset_boot(store)
    for p in todo:
        fix = _REPAIRS.get(p.kind)
        if fix is not None:
            done += fix(store, p)
    return done


def _reset_boot(store: Store) -> list[str]:
    """References and mounts of earlier boots went with the reboot: forget them all."""
    boot = liveness.boot_id()
    with store.records.write() as db:
        n = db.drop_refs_of_other_boots(boot)
        db.drop_mounts_of_other_boots(boot)
    return [f"reset {n} mount reference(s) from an earlier boot"] if n else []


def _dead_reference(store: Store, p: Problem) -> list[str]:
    ref = p.subject
    assert isinstance(ref, MountRef)
    if not store.mounts.drop_ref(ref):
        return []
    done = [f"released a mount reference of layer {ref.layer} held by dead process {ref.pid}"]
    if store.mounts.unmount_unreferenced(ref.layer):
        done.append(f"unmounted layer {ref.layer}")
    return done


def _unreferenced_mount(store: Store, p: Problem) -> list[str]:
    assert p.layer is not None
    return [f"unmounted layer {p.layer}"] if store.mounts.unmount_unreferenced(p.layer) else []


def _leaked_mount(store: Store, p: Problem) -> list[str]:
    with store.mounts.no_mount_in_flight() as quiet:
        if not quiet or p.subject not in _unaccounted_mounts(store):
            return []
        umount(str(p.subject))
    return [f"unmounted leaked mount {p.subject}"]


def _unfinished_layer(store: Store, p: Problem) -> list[str]:
    layer_id = p.layer
    assert layer_id is not None
    with store.work_locks.idle(layer_id) as free:
        if not free:
            return []  # somebody took it up again
        with store.records.read() as db:
            rec = db.layer(layer_id)
        want = LayerState.CREATING if p.kind is Kind.HALF_MADE else LayerState.REMOVING
        if rec is None or rec.state is not want:
            return []
        try:
            if want is LayerState.CREATING:
                store.lifecycle.abandon(layer_id)
                return [f"dropped half-made layer {layer_id}"]
            store.lifecycle.finish_remove(layer_id)
            return [f"finished removing layer {layer_id}"]
        except OSError as e:
            # e.g. a child process of the dead maker still writing into it: what is
            # left is an orphan that the next cleanup removes; the rest goes on now
            return [f"could not yet remove all of layer {layer_id} ({e.strerror or e}); run cleanup again"]


def _leftover(store: Store, p: Problem) -> list[str]:
    entry = p.subject
    assert isinstance(entry, os.PathLike)
    owner = staging.owner(os.path.basename(entry))
    with store.work_locks.idle(owner) as free:
        if not free:
            with store.records.read() as db:
                if db.layer(owner) is not None:
                    return []  # its layer's work goes on
        if not os.path.lexists(entry):
            return []
        rel = os.path.relpath(entry, store.root)
        try:
            force_rmtree(Path(entry))  # widens 0000 dirs an unprivileged owner may hold
        except OSError as e:  # said as it is: the leftover stays, and check says so
            return [f"could not remove leftover {rel} ({e.filename or rel}: {e.strerror or e}); "
                    "run cleanup again"]
    return [f"removed leftover {rel}"]


def _orphan_directory(store: Store, p: Problem) -> list[str]:
    name = str(p.subject)
    with store.work_locks.idle(name) as free:
        if not free:
            return []
        with store.records.read() as db:
            if db.layer(name) is not None or db.children(name):
                return []  # made meanwhile, or a lost parent after all
        if not os.path.lexists(store.driver.ctx.layers / name):
            return []
        store.driver.remove(name)
    return [f"removed orphan layer directory {name}"]


def _orphan_tarsplit(store: Store, p: Problem) -> list[str]:
    name = str(p.subject)
    owner = store.tarsplits.owner(name)
    with store.records.read() as db:
        if db.layer(owner) is not None:
            return []
    path = store.tarsplits.dir / name
    if not os.path.lexists(path):
        return []
    path.unlink()
    return [f"removed orphan tar-split {name}"]


def _forget_snapshot(store: Store, p: Problem) -> list[str]:
    """Forget a snapshot row whose layer has no record (any more: for an unfinished
    layer, its own repair runs first and may have dropped it)."""
    key = str(p.subject)
    with store.records.write() as db:
        snap = db.snapshot(key, ready_only=False)
        if snap is None or snap.layer != p.layer or db.layer(snap.layer) is not None:
            return []
        db.delete_snapshot(key)
    return [f"forgot snapshot {key!r}: its layer is gone"]


def _lost_tarsplit(store: Store, p: Problem) -> list[str]:
    assert p.layer is not None
    with store.records.write() as db:
        rec = db.layer(p.layer)
        if rec is None or not rec.has_tarsplit or store.tarsplits.exists(p.layer):
            return []
        db.forget_tarsplit(p.layer)
    return [f"layer {p.layer}: diff will be computed from the files (tar-split was lost)"]


_REPAIRS: dict[Kind, Callable[[Store, Problem], list[str]]] = {
    Kind.DEAD_REFERENCE: _dead_reference,
    Kind.UNREFERENCED_MOUNT: _unreferenced_mount,
    Kind.LEAKED_MOUNT: _leaked_mount,
    Kind.HALF_MADE: _unfinished_layer,
    Kind.HALF_REMOVED: _unfinished_layer,
    Kind.SNAPSHOT_WITHOUT_LAYER: _forget_snapshot,
    Kind.SNAPSHOT_UNFINISHED: _forget_snapshot,
    Kind.LEFTOVER: _leftover,
    Kind.ORPHAN_DIRECTORY: _orphan_directory,
    Kind.ORPHAN_TARSPLIT: _orphan_tarsplit,
    Kind.LOST_TARSPLIT: _lost_tarsplit,
}


# -- cleanup ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _hold(store: Store, layer_id: str) -> Iterator[bool | None]:
    """The :class:`lamina.drivers.base.LayerHold` the store lends its driver's cleanup:
    None while work on the layer goes on, else whether it has a record (which cannot
    change meanwhile: a record is only written by work that holds the layer)."""
    with store.work_locks.idle(layer_id) as free:
        if not free:
            yield None
            return
        with store.records.read() as db:
            recorded = db.layer(layer_id) is not None
        yield recorded


def cleanup(store: Store, *, unmount_all: bool = False) -> list[str]:
    """``Store.cleanup``: repair every repairable problem the scan finds (content is not
    re-hashed), then let the driver tidy its own. With ``unmount_all`` every reference
    is dropped first, so every view is unmounted (dockerd's Cleanup at shutdown), and
    then the driver's own mounts go too; what is still in use stays mounted and is
    raised at the end as :class:`MountKept` (carrying what was mended meanwhile), so a
    face can never answer "all released" when it was not."""
    done: list[str] = []
    if unmount_all:
        done += _reset_boot(store)  # said as such, before the rest goes unsaid
        store.mounts.drop_every_reference()
    done += repair(store, scan(store))
    with store.records.read() as db:
        known = {r.id for r in db.layers()}
    done += store.driver.cleanup(known, functools.partial(_hold, store))
    if unmount_all:
        released, kept = release_own_mounts(store)
        done += released
        if kept:
            for line in kept:
                log.warning("not released: %s", line)
            raise MountKept(f"{len(kept)} mount(s) of the store could not be released: " + "; ".join(kept),
                            kept=kept, done=done)
    return done


def release_own_mounts(store: Store) -> tuple[list[str], list[str]]:
    """At the end of use, what the driver keeps mounted by itself goes too (overlay's
    size-limit images and their loop devices), for every layer held idle: no view of it
    or of a layer built on it is mounted, nobody is at work on it, and nothing outside
    the store still uses it (the driver checks that). New mounts wait meanwhile; the
    driver mounts what it needs again when a layer is next used.

    Returns (lines released, lines kept): each of the driver's own mounts still mounted
    afterwards is one kept line saying why."""
    done: list[str] = []
    kept: list[str] = []
    with store.mounts.no_mount_in_flight() as quiet:
        if not quiet:
            return done, ["the driver's own mounts (size-limit images) were not released: "
                          "the store's mounts kept being made for 2 s; run the cleanup again"]
        with store.records.read() as db:
            records = {r.id: r for r in db.layers()}
            mounted = {m.layer for m in db.mounts()}
        in_use: set[str] = set()
        for lid in mounted | {lid for lid in records if not store.work_locks.is_idle(lid)}:
            cur: str | None = lid
            while cur is not None and cur not in in_use:  # a view shows its whole chain
                in_use.add(cur)
                cur = records[cur].parent if cur in records else None
        refused: set[str] = set()
        for lid in sorted(set(records) - in_use):
            with store.work_locks.idle(lid) as free:
                if not free:
                    continue
                try:
                    done += store.driver.release_own_mounts(lid)
                except MountKept as e:
                    kept.append(str(e))
                    refused.add(lid)
        still = {os.path.realpath(p) for p in store.driver.own_mounts()} & set(mounts_under(store.root))
        for point in sorted(still):
            owner = next((lid for lid in records if point.startswith(
                os.path.realpath(store.driver.layer_dir(lid)) + "/")), None)
            if owner in refused:
                continue
            why = "in use by the store (a view of it or of a layer above it, or work on it)"
            kept.append(f"{'layer ' + owner + ': ' if owner else ''}{point} is still mounted: {why}")
    return done, kept


def _check_trees(store: Store, records: dict[str, LayerRecord], content: bool) -> list[Finding]:
    """:func:`lamina.treecheck.check_trees`, imported when a check walks trees (cleanup
    never does), not by every process that opens a store."""
    from lamina.treecheck import check_trees

    return check_trees(store, records, content=content)
