"""Recovering from killed image loads: drop the layers they made that no image owns.

A load journals each layer before it makes it (:mod:`lamina.images.journal`). For the
journal of a load that is dead (its process is gone, or it ran in an earlier boot) this
removes, top first, every journalled layer that no image record names: what the load
made is then gone, as if it had never run, and a later load of the image makes it again.
A layer that something now builds on (a container, a hand-made layer) or that is
mounted is kept and reported, since removing it would break its user; it is then a
layer like any other made by hand. A layer an image record names (the load got that
far, or another load reused it since) is never touched.

Recovery holds the images lock, so it never sees a live load half-way: every load
takes that lock and runs recovery first, so loads, removals and recoveries take turns.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.errors import LayerBusy, LayerHasChildren, LayerNotFound
from lamina.images.journal import JournalFile, read_journals, stale_temps
from lamina.images.records import ImageRecords

if TYPE_CHECKING:
    from lamina.layerstore import LayerStore

log = logging.getLogger(__name__)


def recover(store: LayerStore) -> list[str]:
    """Undo the loads that died half-way; one line per thing done (``lamina cleanup``).

    Looks first without the lock: with no journal of a dead load there is nothing to do,
    and a store without images is not given an ``images/`` directory.
    """
    images_dir = store.root / "images"
    if not _anything_dead(images_dir):
        return []
    records = ImageRecords(store.root)
    with records.lock():
        return recover_locked(store, records)


def _anything_dead(images_dir: Path) -> bool:
    return any(not j.owner_alive() for j in read_journals(images_dir)) or bool(stale_temps(images_dir))


def recover_locked(store: LayerStore, records: ImageRecords) -> list[str]:
    """:func:`recover` for a caller that already holds the images lock (a load)."""
    done: list[str] = []
    for tmp in stale_temps(records.dir):
        tmp.unlink(missing_ok=True)
        done.append(f"removed the half-written image-load journal {tmp.name}")
    dead = [j for j in read_journals(records.dir) if not j.owner_alive()]
    if not dead:
        return done
    owned = {lid for rec in records.all() for lid in rec.layer_ids}
    for journal in dead:
        if journal.unreadable:
            done.append(f"removed the unreadable image-load journal {journal.path.name} "
                        f"({journal.unreadable}); its layers, if any, are left as they are")
        else:
            done += _drop(store, journal, owned)
        journal.path.unlink(missing_ok=True)
    return done


def _drop(store: LayerStore, journal: JournalFile, owned: set[str]) -> list[str]:
    """Remove the journal's layers that no image owns, last made first (children first)."""
    done: list[str] = []
    what = f"of an interrupted image load (pid {journal.pid})"
    for lid in reversed(list(dict.fromkeys(journal.layers))):
        if lid in owned:
            continue
        complete = store.exists(lid)
        try:
            # a half-made layer (its creating record) goes too: the store's cleanup would
            # drop it anyway, and until then it would keep its parent from being removed
            store.remove(lid)
        except LayerNotFound:
            continue  # never made, or gone already
        except LayerHasChildren:
            users = store.children(lid) if complete else []
            done.append(f"kept layer {lid} {what}: layer(s) {', '.join(users[:3]) or '?'} build on it")
            continue
        except LayerBusy as e:
            done.append(f"kept layer {lid} {what}: {e}")
            continue
        kind = "layer" if complete else "half-made layer"
        done.append(f"dropped {kind} {lid} {what}")
        log.info("dropped %s %s %s", kind, lid, what)
    return done
