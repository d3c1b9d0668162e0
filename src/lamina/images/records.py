"""Image records: which names point at which config, and which chain of layers it uses.

One small JSON file per image, ``ROOT/images/<config hex>.json``, written atomically
(temp file, fsync, rename, fsync the directory): a crash leaves the old record or the new
one, and an image load never rewrites a shared index. The config is kept verbatim
inside the record because its bytes are the image ID: ``image save`` must give back the
very same bytes.

Changes to records (and the layer removals that ``image rm`` does) happen under one
lock, ``ROOT/locks/images.lock``; readers take no lock, since every file they can see is
whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lamina.errors import ImageError, StoreCorrupt
from lamina.fs.durable import fsync_dir
from lamina.fs.locks import locked
from lamina.images.digest import check_digest, split_digest
from lamina.images.refs import try_normalize

log = logging.getLogger(__name__)

RECORD_VERSION = 1


class ImageNotFound(ImageError):
    """No image has this name or ID."""


@dataclass
class ImageRecord:
    """What lamina knows of one image."""

    #: ``sha256:<hex>`` of the config: the image ID
    id: str
    #: familiar ``name:tag`` names; empty for a dangling image
    names: list[str]
    #: DiffIDs, bottom layer first
    diff_ids: list[str]
    #: chain IDs (``sha256:<hex>``), bottom first; the layer ID is the hex part
    chain_ids: list[str]
    #: the config, exactly as loaded (its sha256 is ``id``)
    config: str
    #: when it was loaded (seconds since the epoch)
    loaded: float = field(default_factory=time.time)

    @property
    def top_layer(self) -> str:
        """The lamina layer ID of the image's top layer."""
        return split_digest(self.chain_ids[-1])[1]

    @property
    def layer_ids(self) -> list[str]:
        return [split_digest(c)[1] for c in self.chain_ids]

    @property
    def short_id(self) -> str:
        return split_digest(self.id)[1][:12]

    def config_json(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.config)
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ImageRecord:
        return cls(id=check_digest(doc["id"], "image ID"), names=list(doc["names"]),
                   diff_ids=list(doc["diff_ids"]), chain_ids=list(doc["chain_ids"]),
                   config=str(doc["config"]), loaded=float(doc.get("loaded", 0)))


class ImageRecords:
    """The image records of one store."""

    def __init__(self, store_root: Path) -> None:
        self.dir = store_root / "images"
        self._lock_path = store_root / "locks" / "images.lock"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self._lock_path.parent.mkdir(mode=0o700, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the images lock: for loads, removals and name changes."""
        with locked(self._lock_path):
            yield

    def _path(self, image_id: str) -> Path:
        return self.dir / f"{split_digest(check_digest(image_id, 'image ID'))[1]}.json"

    def all(self) -> list[ImageRecord]:
        """Every image, newest load first."""
        out = []
        for path in self.dir.glob("*.json"):
            if path.name.startswith("."):
                continue
            try:
                out.append(ImageRecord.from_json(json.loads(path.read_bytes())))
            except FileNotFoundError:
                continue  # removed while we listed
            except (ValueError, KeyError, TypeError, ImageError) as e:
                log.warning("skipping unreadable image record %s: %s", path, e)
        out.sort(key=lambda r: (-r.loaded, r.id))
        return out

    def get(self, image_id: str) -> ImageRecord | None:
        path = self._path(image_id)
        try:
            return ImageRecord.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise StoreCorrupt(f"image record {path} is unreadable ({e})") from e

    def put(self, rec: ImageRecord) -> None:
        """Write ``rec`` atomically (caller holds the lock)."""
        path = self._path(rec.id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = json.dumps(rec.to_json(), indent=1).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(self.dir)

    def delete(self, image_id: str) -> None:
        """Remove the record (caller holds the lock)."""
        self._path(image_id).unlink(missing_ok=True)
        fsync_dir(self.dir)

    def by_name(self, name: str) -> ImageRecord | None:
        for rec in self.all():
            if name in rec.names:
                return rec
        return None

    def resolve(self, ref: str) -> ImageRecord:
        """The image a user means by ``ref``: a name, an ID, or a unique ID prefix."""
        ref = ref.strip()
        name = try_normalize(ref)
        if name is not None:
            rec = self.by_name(name)
            if rec is not None:
                return rec
        hexpart = ref[len("sha256:"):] if ref.startswith("sha256:") else ref
        if hexpart and all(c in "0123456789abcdef" for c in hexpart):
            matches = [r for r in self.all() if split_digest(r.id)[1].startswith(hexpart)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise ImageError(f"image ID prefix {ref} is ambiguous ({len(matches)} images)")
        raise ImageNotFound(f"image {ref} not found")

    def take_names(self, names: list[str], new_owner: str) -> None:
        """Move ``names`` to image ``new_owner``: strip them from every other record.

        Like ``docker load``: loading an image under a name that another image had
        leaves the other one with its remaining names (or none: dangling).
        """
        wanted = set(names)
        for rec in self.all():
            if rec.id != new_owner and wanted & set(rec.names):
                rec.names = [n for n in rec.names if n not in wanted]
                self.put(rec)
