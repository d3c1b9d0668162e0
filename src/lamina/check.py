"""``lamina check``: does the store on disk agree with its records?

Modelled on borg's ``check``: it reads everything, changes nothing unless asked, and says
what is wrong one line per problem. ``repair`` mends only what can be mended without
losing a complete layer (stale references, half-made layers, interrupted removals,
orphans, a lost tar-split); a layer whose content no longer matches its DiffID is
reported, never deleted, because the user may still want what is there.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from lamina import liveness
from lamina.archive.tar.split import reassemble
from lamina.errors import LaminaError
from lamina.fs.mount import mounts_under
from lamina.records import LayerState
from lamina.store import Store


@dataclass(frozen=True)
class Problem:
    """One thing wrong. ``repairable`` says whether ``check --repair`` mends it."""

    layer: str | None
    message: str
    repairable: bool

    def __str__(self) -> str:
        where = f"layer {self.layer}: " if self.layer else ""
        return f"{where}{self.message}"


def check(store: Store, *, repair: bool = False, content: bool = True) -> tuple[list[Problem], list[str]]:
    """Return (problems found, repairs made). ``content=False`` skips re-hashing layers."""
    problems = _structure(store) + _mounts(store)
    if content:
        problems += _content(store)
    repairs: list[str] = []
    if repair and any(p.repairable for p in problems):
        repairs = store.cleanup()
        repairs += _drop_lost_tarsplit(store, problems)
    return problems, repairs


def remaining(store: Store, *, content: bool = True) -> list[Problem]:
    """What is still wrong: run after a repair, so nothing is reported mended that was not."""
    return check(store, repair=False, content=content)[0]


def _structure(store: Store) -> list[Problem]:
    out: list[Problem] = []
    with store.records.read() as db:
        records = {r.id: r for r in db.layers()}
    for rec in records.values():
        if rec.state is LayerState.CREATING:
            out.append(Problem(rec.id, "half-made (an import or create was interrupted)", True))
            continue
        if rec.state is LayerState.REMOVING:
            out.append(Problem(rec.id, "removal was interrupted", True))
            continue
        if rec.parent is not None and rec.parent not in records:
            out.append(Problem(rec.id, f"parent {rec.parent} has no record", False))
        if not store.driver.layer_dir(rec.id).exists():
            out.append(Problem(rec.id, f"content directory {store.driver.layer_dir(rec.id)} is missing", False))
        if rec.has_tarsplit and not store._tarsplit_path(rec.id).exists():
            out.append(Problem(rec.id, "tar-split record is missing (diff will not be byte-exact)", True))
    parents = {r.parent for r in records.values() if r.parent}
    layers_dir = store.driver.ctx.layers
    if layers_dir.is_dir():
        for entry in sorted(layers_dir.iterdir()):
            name = entry.name
            if name in parents and name not in records:
                continue  # reported above as a lost parent record; its content must stay
            if name not in records and "~" not in name and not name.endswith("-removing"):
                out.append(Problem(None, f"orphan directory {entry} has no record", True))
    return out


def _mounts(store: Store) -> list[Problem]:
    out: list[Problem] = []
    boot = liveness.boot_id()
    with store.records.read() as db:
        refs = db.refs()
        mounts = {m.layer: m.path for m in db.mounts()}
    for ref in refs:
        if ref.boot_id != boot:
            out.append(Problem(ref.layer, "mount reference from an earlier boot", True))
        elif not ref.persistent and not liveness.alive(ref.pid, ref.pid_start):
            out.append(Problem(ref.layer, f"mount reference held by dead process {ref.pid}", True))
    for layer_id in mounts:
        if not any(r.layer == layer_id for r in refs):
            out.append(Problem(layer_id, "recorded as mounted with no reference", True))
    recorded_paths = {os.path.realpath(p) for p in mounts.values()}
    recorded_paths |= {os.path.realpath(p) for p in store.driver.own_mounts()}
    for point in mounts_under(store.root):
        if point not in recorded_paths and os.path.realpath(store.root) != point:
            out.append(Problem(None, f"mount at {point} is not recorded (leaked mount)", True))
    return out


def _content(store: Store) -> list[Problem]:
    out: list[Problem] = []
    for rec in store.layers():
        if rec.rw or not rec.has_tarsplit or not rec.diff_id:
            continue
        path = store._tarsplit_path(rec.id)
        if not path.exists():
            continue
        digest = hashlib.sha256()
        try:
            with store.diff_getter(rec.id) as getter, gzip.open(path, "rb") as ts:
                for chunk in reassemble(ts, getter):
                    digest.update(chunk)
        except (LaminaError, OSError) as e:
            out.append(Problem(rec.id, f"content cannot be rebuilt from its tar-split: {e}", False))
            continue
        if "sha256:" + digest.hexdigest() != rec.diff_id:
            out.append(Problem(rec.id, f"content does not match its DiffID {rec.diff_id}", False))
    return out


def _drop_lost_tarsplit(store: Store, problems: list[Problem]) -> list[str]:
    done = []
    for p in problems:
        if p.layer and p.message.startswith("tar-split record is missing"):
            with store.records.write() as db:
                db.forget_tarsplit(p.layer)
            done.append(f"layer {p.layer}: diff will be computed from the files (tar-split was lost)")
    return done


def leaked_mounts(root: Path) -> list[str]:
    """Mount points under a store root (for tests and the crash harness)."""
    return [m for m in mounts_under(root) if m != os.path.realpath(root)]
