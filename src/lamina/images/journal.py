"""The load journal: which layers a running ``image load`` has made and not yet given an owner.

Why a journal: a load makes an image's layers one by one and writes the image record
(which owns them) only at the end. A load killed in between leaves complete layers that
no record names, so ``image rm`` can never reach them. The store knows nothing of images
and cannot tell such a layer from one a user made by hand; the journal is what can.

The file is ``ROOT/images/.load-<pid>-<start>-<nonce>.json`` (a dotfile, so record
listings skip it), rewritten atomically each time the load is about to make a layer, so
the layer is always named in the journal *before* its store record exists: a crash at
any instant leaves no made layer unjournaled (a journalled layer may never have been
made; recovery shrugs at that). It names the process by pid and start time and the boot
it ran in, so a recovery can tell a dead load from a live one (a pid alone is reused).
The load deletes the journal once its image records are written (or its failure has
been rolled back); :mod:`lamina.images.recover` deals with the rest.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from lamina import liveness
from lamina.fs.durable import atomic_write

JOURNAL_VERSION = 1

#: ``.load-<pid>-<start>-<nonce>.json``; also found inside the temp name of a half-written one
_NAME = re.compile(r"\.load-(\d+)-(\d*)-([0-9a-f]+)\.json")


class LoadJournal:
    """The journal of the load running in this process; written on the first :meth:`add`.

    A load that only reuses layers never writes one. The nonce keeps two loads of one
    process apart (a failed load whose rollback could not remove a layer leaves its
    journal for recovery, and the process may load again).
    """

    def __init__(self, images_dir: Path) -> None:
        self.pid, self.start = liveness.me()
        self.path = images_dir / f".load-{self.pid}-{self.start}-{secrets.token_hex(4)}.json"
        self.layers: list[str] = []

    def add(self, layer_id: str) -> None:
        """Journal ``layer_id`` durably; call before the layer is created."""
        self.layers.append(layer_id)
        doc = {"version": JOURNAL_VERSION, "pid": self.pid, "start": self.start,
               "boot": liveness.boot_id(), "layers": self.layers}
        atomic_write(self.path, json.dumps(doc).encode() + b"\n", 0o600)

    def discard(self) -> None:
        """Delete the journal: every layer it names now has an owner or is gone.

        No directory fsync: a journal that comes back after a power cut names layers
        that an image record owns or that the rollback removed, and recovery then only
        deletes it again.
        """
        self.path.unlink(missing_ok=True)


@dataclass
class JournalFile:
    """A journal found on disk, perhaps of a load that died."""

    path: Path
    pid: int
    start: str
    #: the boot it was written in; "" if the file could not be read
    boot: str
    #: layers the load made (or was about to make), in the order it made them
    layers: list[str]
    #: why the file could not be read, if it could not
    unreadable: str = ""

    def owner_alive(self) -> bool:
        """True if the load that wrote it may still be running.

        An unreadable journal does not say its boot; its name still gives pid and start
        time, and a live process that matches both is given the benefit of the doubt.
        """
        if self.boot and self.boot != liveness.boot_id():
            return False
        return liveness.alive(self.pid, self.start)


def read_journals(images_dir: Path) -> list[JournalFile]:
    """Every load journal under ``images_dir`` (none if the directory does not exist)."""
    out = []
    try:
        paths = sorted(p for p in images_dir.iterdir() if p.name.startswith(".load-"))
    except FileNotFoundError:
        return []
    for path in paths:
        m = _NAME.fullmatch(path.name)
        if m is None:
            continue
        pid, start = int(m.group(1)), m.group(2)
        try:
            doc = json.loads(path.read_bytes())
            layers = [str(lid) for lid in doc["layers"]]
            out.append(JournalFile(path, pid, start, str(doc["boot"]), layers))
        except FileNotFoundError:
            continue  # its load finished while we listed
        except (ValueError, KeyError, TypeError) as e:
            out.append(JournalFile(path, pid, start, "", [], unreadable=str(e) or type(e).__name__))
    return out


def stale_temps(images_dir: Path) -> list[Path]:
    """Half-written journals (temp files of :func:`atomic_write`) whose writer is gone.

    A load killed while rewriting its journal leaves one; the journal before it is whole
    and the layer being added was not made yet, so the temp file holds nothing to undo.
    """
    out = []
    try:
        names = sorted(p for p in images_dir.iterdir() if p.name.startswith("..load-"))
    except FileNotFoundError:
        return []
    for path in names:
        m = _NAME.search(path.name)
        if m is not None and path.name != m.group(0) and not liveness.alive(int(m.group(1)), m.group(2)):
            out.append(path)
    return out

