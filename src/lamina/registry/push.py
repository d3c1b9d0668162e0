"""``image push``: an image of the store into a registry, blobs first, then the manifest.

Each layer's tar is the store's ``diff`` of it, which for a pulled or loaded layer is
rebuilt from tar-split byte for byte: its sha256 is the DiffID in the config, so the
config (and the image ID) go out unchanged. Per layer, cheapest first:

1. a compressed blob the layer arrived as (:mod:`lamina.registry.distribution`) that
   the target repository already has (HEAD), or that a repository of the same registry
   has and the registry mounts (``?mount=&from=``);
2. with ``compression="none"``, the tar itself, if the repository has it (HEAD);
3. a foreign layer (a Windows base layer, named by URL) is not pushed, as Docker does:
   the manifest names it with its URLs;
4. otherwise the tar is compressed as it streams out of the store (gzip by ISA-L, or
   zstd) and uploaded in chunks; the new blob is remembered for the next push.

Layers go side by side (several threads: compression releases the GIL). The manifest:
if every layer went out as the very blob a pulled manifest names, that manifest's own
bytes are pushed, so pushing an image pulled from a registry back to it (any
repository) gives the manifest digest the user pulled; otherwise a new manifest (Docker
schema 2 by default, OCI with ``fmt="oci"`` or when a layer is zstd) is made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina import compression as compress
from lamina.errors import ImageError, InvalidArchive
from lamina.images.digest import layer_id
from lamina.images.records import ImageRecord, ImageRecords
from lamina.registry import distribution, manifests
from lamina.registry.distribution import BlobPlace, KnownManifest
from lamina.registry.reference import Reference, parse
from lamina.registry.transport import ClientOptions, RegistryClient, session
from lamina.registry.upload import (
    DEFAULT_CHUNK,
    blob_exists,
    mount,
    put_manifest,
    scope_push,
    upload_bytes,
    upload_stream,
)

if TYPE_CHECKING:
    from lamina.store import Store

log = logging.getLogger(__name__)

FORMATS = ("docker", "oci")
COMPRESSIONS = ("gzip", "zstd", "none")
PARALLEL = 3
_CHUNK = 1 << 20
_LAYER_TYPES = {
    ("docker", "gzip"): manifests.MT_DOCKER_LAYER_GZIP,
    ("docker", "none"): manifests.MT_DOCKER_LAYER_TAR,
    ("oci", "gzip"): manifests.MT_OCI_LAYER_GZIP,
    ("oci", "none"): manifests.MT_OCI_LAYER,
    ("oci", "zstd"): manifests.MT_OCI_LAYER_ZSTD,
}
#: the same compression under the other format's name
_EQUIVALENT = {
    manifests.MT_OCI_LAYER_GZIP: manifests.MT_DOCKER_LAYER_GZIP,
    manifests.MT_DOCKER_LAYER_GZIP: manifests.MT_OCI_LAYER_GZIP,
    manifests.MT_OCI_LAYER: manifests.MT_DOCKER_LAYER_TAR,
    manifests.MT_DOCKER_LAYER_TAR: manifests.MT_OCI_LAYER,
}


class PushEvents:
    """What a push tells a progress display."""

    def layers(self, layers: list[tuple[str, int | None]]) -> None:
        """(label, size if known) of every layer, bottom first."""

    def state(self, label: str, state: str) -> None:
        """"exists", "mounted", "uploading", "pushed"."""

    def sent(self, label: str, n: int) -> None:
        """``n`` more bytes of a layer went out (uncompressed bytes read from the store)."""


@dataclass
class PushResult:
    reference: str
    image_id: str
    manifest_digest: str
    manifest_size: int
    #: True when the pulled manifest's own bytes were pushed (same digest as pulled)
    manifest_reused: bool = False
    layers_uploaded: int = 0
    layers_mounted: int = 0
    layers_existing: int = 0
    #: foreign layers named by URL, not pushed
    layers_foreign: int = 0
    bytes_uploaded: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "id": self.image_id, "digest": self.manifest_digest,
                "size": self.manifest_size, "manifest_reused": self.manifest_reused,
                "layers_uploaded": self.layers_uploaded, "layers_mounted": self.layers_mounted,
                "layers_existing": self.layers_existing, "layers_foreign": self.layers_foreign,
                "bytes_uploaded": self.bytes_uploaded,
                "layers": self.layers}


def push(store: Store, name: str, ref: str | Reference, *, options: ClientOptions | None = None,
         fmt: str = "docker", compression: str | None = None, events: PushEvents | None = None,
         parallel: int = PARALLEL, chunk_size: int = DEFAULT_CHUNK) -> PushResult:
    """Push the store's image ``name`` (name or ID) to ``ref``; return what was sent."""
    if fmt not in FORMATS:
        raise ImageError(f"unknown manifest format {fmt!r}: use docker or oci")
    if compression is not None and compression not in COMPRESSIONS:
        raise ImageError(f"unknown compression {compression!r}: use gzip, zstd or none")
    reference = parse(ref) if isinstance(ref, str) else ref
    rec = ImageRecords(store.root).resolve(name)
    what = str(reference)
    with session(reference, options) as client:
        return _push(store, client, rec, reference, what, fmt, compression,
                     events or PushEvents(), parallel, chunk_size)


@dataclass
class _Layer:
    index: int
    diff_id: str
    lid: str
    label: str
    desc: manifests.Descriptor | None = None
    how: str = ""


def _push(store: Store, client: RegistryClient, rec: ImageRecord, ref: Reference, what: str,
          fmt: str, compression: str | None, events: PushEvents, parallel: int,
          chunk_size: int) -> PushResult:
    repo = ref.repository
    for lid in rec.layer_ids:
        if not store.exists(lid):
            raise ImageError(f"image {rec.short_id}: layer {lid} is missing from the store")
    layers = [_Layer(i, diff, layer_id(chain), f"layer {i}/{len(rec.diff_ids)}")
              for i, (diff, chain) in enumerate(zip(rec.diff_ids, rec.chain_ids, strict=True), 1)]
    sources = sorted({p.repository for layer in layers for p in distribution.blob_places(store.root, layer.diff_id)
                      if p.registry == ref.registry and p.repository != repo})
    scopes = (scope_push(repo), *(f"repository:{s}:pull" for s in sources))
    events.layers([(layer.label, store.layer(layer.lid).size) for layer in layers])
    result = PushResult(reference=what, image_id=rec.id, manifest_digest="", manifest_size=0)
    lock = threading.Lock()

    def one(layer: _Layer) -> None:
        layer.desc, layer.how = _push_layer(store, client, ref, layer, compression, fmt, scopes,
                                            events, chunk_size, what)
        with lock:
            if layer.how == "uploaded":
                result.layers_uploaded += 1
                result.bytes_uploaded += layer.desc.size
            elif layer.how == "mounted":
                result.layers_mounted += 1
            elif layer.how == "foreign":
                result.layers_foreign += 1
            else:
                result.layers_existing += 1

    # the config first: a registry may refuse a manifest whose blobs are not all there
    config = rec.config.encode("utf-8")
    if blob_exists(client, repo, rec.id, scopes) is None:
        upload_bytes(client, repo, config, rec.id, scopes, f"{what}: config")
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="push") as pool:
        for fut in [pool.submit(one, layer) for layer in layers]:
            fut.result()
    descs = [layer.desc for layer in layers if layer.desc is not None]
    data, media, reused = _manifest(store, rec, ref, descs, config, fmt)
    digest = put_manifest(client, repo, ref.digest or ref.tag or "latest", data, media, scopes, what)
    if ref.digest and digest != ref.digest:
        raise ImageError(f"{what}: the pushed manifest has digest {digest}")
    distribution.add_manifest(store.root, rec.id, KnownManifest(ref.registry, repo, digest, media, data))
    result.manifest_digest, result.manifest_size, result.manifest_reused = digest, len(data), reused
    result.layers = [{"diff_id": layer.diff_id, "digest": layer.desc.digest, "size": layer.desc.size,
                      "mediaType": layer.desc.media_type, "how": layer.how}
                     for layer in layers if layer.desc is not None]
    return result


def _push_layer(store: Store, client: RegistryClient, ref: Reference, layer: _Layer,
                compression: str | None, fmt: str, scopes: tuple[str, ...], events: PushEvents,
                chunk_size: int, what: str) -> tuple[manifests.Descriptor, str]:
    repo = ref.repository
    known = distribution.blob_places(store.root, layer.diff_id)
    places = [p for p in known if p.registry == ref.registry]
    for place in places:
        if not _fits(place.media_type, compression):
            continue  # the user asked for another compression than this blob has
        desc = manifests.Descriptor(place.media_type, place.digest, place.size)
        if blob_exists(client, repo, place.digest, scopes) is not None:
            events.state(layer.label, "exists")
            return desc, "exists"
        if place.repository and place.repository != repo and \
                mount(client, repo, place.digest, place.repository, scopes):
            events.state(layer.label, "mounted")
            distribution.add_blob_place(store.root, layer.diff_id, BlobPlace(
                place.digest, place.size, place.media_type, ref.registry, repo))
            return desc, "mounted"
    foreign = [p for p in known if p.urls]
    if foreign and compression is None:
        # a foreign layer (a Windows base layer) is not pushed, as Docker does: the
        # manifest names it with its URLs, and pullers fetch it from there
        f = foreign[0]
        events.state(layer.label, "foreign")
        return manifests.Descriptor(f.media_type, f.digest, f.size, f.urls), "foreign"
    compression = compression or "gzip"
    media = _LAYER_TYPES.get((fmt, compression)) or _LAYER_TYPES[("oci", compression)]
    if compression == "none":
        size = blob_exists(client, repo, layer.diff_id, scopes)
        if size is not None and size >= 0:
            events.state(layer.label, "exists")
            return manifests.Descriptor(media, layer.diff_id, size), "exists"
    events.state(layer.label, "uploading")
    diff_hash = hashlib.sha256()
    chunks = _compressed(_diff_chunks(store, layer, diff_hash, events), compression)
    digest, size = upload_stream(client, repo, chunks, scopes, f"{what}: {layer.label}",
                                 chunk_size=chunk_size)
    got = "sha256:" + diff_hash.hexdigest()
    if got != layer.diff_id:
        raise ImageError(f"{layer.label} (layer {layer.lid}): its diff has digest {got}, not its "
                         f"DiffID {layer.diff_id} (changed since it was made, or made without "
                         "tar-split); the uploaded blob is not referenced by any manifest")
    distribution.add_blob_place(store.root, layer.diff_id, BlobPlace(digest, size, media,
                                                                     ref.registry, repo))
    events.state(layer.label, "pushed")
    return manifests.Descriptor(media, digest, size), "uploaded"


def _fits(media_type: str, compression: str | None) -> bool:
    """Whether a blob of ``media_type`` is what ``compression`` asks for (None: anything)."""
    if compression is None:
        return True
    if compression == "none":
        return "gzip" not in media_type and "zstd" not in media_type
    return compression in media_type


def _diff_chunks(store: Store, layer: _Layer, h: Any, events: PushEvents) -> Iterator[bytes]:
    stream = store.diff(layer.lid)
    try:
        while True:
            try:
                chunk = stream.read(_CHUNK)
            except InvalidArchive as e:
                raise ImageError(f"layer {layer.lid}: {e}") from e
            if not chunk:
                return
            h.update(chunk)
            events.sent(layer.label, len(chunk))
            yield chunk
    finally:
        stream.close()


def _compressed(chunks: Iterator[bytes], compression: str) -> Iterator[bytes]:
    if compression == "none":
        yield from chunks
        return
    c = compress.compressor(compress.GZIP if compression == "gzip" else compress.ZSTD)
    for chunk in chunks:
        out = c.compress(chunk)
        if out:
            yield out
    tail = c.flush()
    if tail:
        yield tail


def _manifest(store: Store, rec: ImageRecord, ref: Reference, descs: list[manifests.Descriptor],
              config: bytes, fmt: str) -> tuple[bytes, str, bool]:
    """(bytes, media type, reused): a pulled manifest if it names exactly these blobs."""
    wanted = [d.digest for d in descs]
    for km in distribution.known_manifests(store.root, rec.id):
        try:
            doc = json.loads(km.data)
            got = [layer["digest"] for layer in doc["layers"]]
            cfg = doc["config"]["digest"]
        except (ValueError, KeyError, TypeError):
            continue
        if got == wanted and cfg == rec.id:
            return km.data, km.media_type, True
    if any("zstd" in d.media_type for d in descs):
        fmt = "oci"
    if fmt == "oci":
        media, cmedia = manifests.MT_OCI_MANIFEST, manifests.MT_OCI_CONFIG
    else:
        media, cmedia = manifests.MT_DOCKER_MANIFEST, manifests.MT_DOCKER_CONFIG
    layers = []
    for d in descs:
        mt = d.media_type
        if (fmt == "docker") != mt.startswith("application/vnd.docker."):
            mt = _EQUIVALENT.get(mt, mt)
        layers.append(manifests.Descriptor(mt, d.digest, d.size, d.urls).to_json())
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": media,
                           "config": {"mediaType": cmedia, "digest": rec.id, "size": len(config)},
                           "layers": layers}
    return json.dumps(doc, indent=3).encode(), media, False
