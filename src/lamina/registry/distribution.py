"""What a pull remembers for a later push: compressed blobs per DiffID, and manifests.

Why: the store keeps a layer as files plus its tar-split record, so ``image push`` can
give back the exact uncompressed tar, but not the compressed blob it arrived as
(gzip output depends on the compressor, its version and its settings; no one can make
the same bytes again in general). Docker has the same problem and the same answer
(its ``v2metadata`` per DiffID): remember which compressed blob, in which repository
of which registry, holds each DiffID. A push then asks the target registry whether it
has that blob (HEAD), or mounts it from the repository it came from (same registry),
and only compresses anew what the registry has nowhere. Remembering the manifest
itself lets a push whose every blob is found send the pulled manifest's own bytes, so
the pushed image has the digest the user pulled.

Files (small, written atomically; a lost or stale one only costs a push a re-upload):

    ROOT/registry/blobs/<DiffID hex>.json       [{digest, size, mediaType, registry, repository}]
    ROOT/registry/manifests/<config hex>.json   [{registry, repository, digest, mediaType, manifest}]
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina.fs.durable import atomic_write
from lamina.images.digest import split_digest
from lamina.registry.manifests import Manifest
from lamina.registry.reference import Reference

log = logging.getLogger(__name__)

#: how many places per DiffID (and manifests per image) are remembered
_KEEP = 8


@dataclass(frozen=True)
class BlobPlace:
    digest: str
    size: int
    media_type: str
    registry: str
    repository: str
    #: where a foreign layer lives (its descriptor's urls); such a blob is never pushed
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class KnownManifest:
    registry: str
    repository: str
    digest: str
    media_type: str
    data: bytes


def _dir(root: Path, kind: str) -> Path:
    return root / "registry" / kind


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return []
    return [d for d in doc if isinstance(d, dict)] if isinstance(doc, list) else []


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(entries[:_KEEP], indent=1).encode() + b"\n", 0o600)


def blob_places(root: Path, diff_id: str) -> list[BlobPlace]:
    """Where compressed blobs of ``diff_id`` have been seen, most recent first."""
    out = []
    for d in _read(_dir(root, "blobs") / f"{split_digest(diff_id)[1]}.json"):
        try:
            urls = tuple(str(u) for u in d.get("urls") or [])
            out.append(BlobPlace(str(d["digest"]), int(d["size"]), str(d["mediaType"]),
                                 str(d["registry"]), str(d["repository"]), urls))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def add_blob_place(root: Path, diff_id: str, place: BlobPlace) -> None:
    path = _dir(root, "blobs") / f"{split_digest(diff_id)[1]}.json"
    entry = {"digest": place.digest, "size": place.size, "mediaType": place.media_type,
             "registry": place.registry, "repository": place.repository}
    if place.urls:
        entry["urls"] = list(place.urls)
    old = [d for d in _read(path) if not (d.get("digest") == place.digest and
                                          d.get("registry") == place.registry and
                                          d.get("repository") == place.repository)]
    _write(path, [entry, *old])


def known_manifests(root: Path, config_digest: str) -> list[KnownManifest]:
    out = []
    for d in _read(_dir(root, "manifests") / f"{split_digest(config_digest)[1]}.json"):
        try:
            out.append(KnownManifest(str(d["registry"]), str(d["repository"]), str(d["digest"]),
                                     str(d["mediaType"]), str(d["manifest"]).encode("utf-8")))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def add_manifest(root: Path, config_digest: str, km: KnownManifest) -> None:
    path = _dir(root, "manifests") / f"{split_digest(config_digest)[1]}.json"
    try:
        text = km.data.decode("utf-8")
    except UnicodeDecodeError:
        return  # a manifest that is not UTF-8 JSON cannot be sent back as it was anyway
    entry = {"registry": km.registry, "repository": km.repository, "digest": km.digest,
             "mediaType": km.media_type, "manifest": text}
    old = [d for d in _read(path) if not (d.get("digest") == km.digest and
                                          d.get("registry") == km.registry and
                                          d.get("repository") == km.repository)]
    _write(path, [entry, *old])


def remember(root: Path, ref: Reference, manifest: Manifest, diff_ids: list[str]) -> None:
    """After a pull: the manifest, and where each layer's compressed blob lives."""
    for desc, diff_id in zip(manifest.layers, diff_ids, strict=True):
        add_blob_place(root, diff_id, BlobPlace(desc.digest, desc.size, desc.media_type,
                                                ref.registry, ref.repository, desc.urls))
    add_manifest(root, manifest.config.digest, KnownManifest(
        ref.registry, ref.repository, manifest.digest, manifest.media_type, manifest.data))
