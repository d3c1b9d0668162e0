"""``lamina check``: does the store on disk agree with its records?

Modelled on borg's ``check``: it reads everything, changes nothing unless asked, and says
what is wrong one line per problem. It is a face over the store's one recovery engine
(:mod:`lamina.recovery`): the problems are what :func:`~lamina.recovery.scan` finds, with
content re-hashed against each layer's DiffID, and ``repair`` is what ``cleanup`` does:
mend what can be mended without losing a complete layer (stale references, half-made
layers, interrupted removals, leaks, orphans, a lost tar-split). A layer whose content
no longer matches its DiffID is reported, never deleted: the user may still want it.
"""

from __future__ import annotations

import os
from pathlib import Path

from lamina.fs.mount import mounts_under
from lamina.recovery import Kind, Problem, scan
from lamina.store import Store


def check(store: Store, *, repair: bool = False, content: bool = True) -> tuple[list[Problem], list[str]]:
    """Return (problems found, repairs made). Every read-only layer's tree is compared
    with its tar's headers (entries, types, modes, owners, sizes, links); ``content=False``
    skips re-hashing layers (metadata only: ``check --fast``)."""
    problems = scan(store, content=content, trees=True)
    repairs: list[str] = []
    if repair and any(p.repairable for p in problems):
        repairs = store.cleanup()
    return problems, repairs


def remaining(store: Store, *, content: bool = True) -> list[Problem]:
    """What is still wrong: run after a repair, so nothing is reported mended that was not."""
    return check(store, repair=False, content=content)[0]


def leaked_mounts(root: Path) -> list[str]:
    """Mount points under a store root (for tests and the crash harness)."""
    return [m for m in mounts_under(root) if m != os.path.realpath(root)]


__all__ = ["Kind", "Problem", "check", "leaked_mounts", "remaining"]
