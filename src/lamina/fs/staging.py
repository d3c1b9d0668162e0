"""Work in progress on disk: the names it goes by.

A layer is built where nobody looks for layers and renamed into place when whole; it is
deleted by renaming it out of the way first and removing the tree after. Both leave
directories behind when a process dies, and cleanup must recognise them by name and
know whose they are, so the names are spelled here and nowhere else:

``tmp/<id>~creating``          a layer being built (vfs, overlay)
``tmp/<id>~removing-<8 hex>``  a layer being deleted (vfs, overlay)
``tmp/<id>~tarsplit``          the tar-split of a layer being applied (the store)
``layers/<id>-removing``       a Windows layer being deleted (the seed's own spelling)

Everything before the first ``~`` is the owner: the layer whose per-layer lock says
whether the work is still going on.
"""

from __future__ import annotations

import os
from pathlib import Path

SEP = "~"
#: what windowsfilter (as Docker's Windows driver) renames a layer folder to before deleting it
REMOVING_SUFFIX = "-removing"


def creating(tmp: Path, layer_id: str) -> Path:
    """Where ``layer_id`` is built before it is renamed into place."""
    return tmp / f"{layer_id}{SEP}creating"


def removing(tmp: Path, layer_id: str) -> Path:
    """A fresh name to rename ``layer_id``'s directory to before deleting it (fresh: an
    earlier interrupted removal of the same ID may still lie there)."""
    return tmp / f"{layer_id}{SEP}removing-{os.urandom(4).hex()}"


def tarsplit(tmp: Path, layer_id: str) -> Path:
    """Where the tar-split of an apply is written until the layer is synced."""
    return tmp / f"{layer_id}{SEP}tarsplit"


def owner(name: str) -> str:
    """The layer a staging entry belongs to (the name itself if it is no staging name)."""
    return name.split(SEP, 1)[0]


def kind(name: str) -> str:
    """What a staging entry is: ``creating``, ``removing``, ``tarsplit``; "" for none."""
    _, _, what = name.partition(SEP)
    return "removing" if what.startswith("removing") else what


def in_progress(name: str) -> bool:
    """Whether an entry of ``layers/`` is a driver's work in progress, not a layer."""
    return SEP in name or name.endswith(REMOVING_SUFFIX)
