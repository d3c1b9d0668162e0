"""``image load``: docker-save archives and OCI layouts into the store.

The path of one layer, read once::

    archive member --pread--> HashingReader (blob digest, if compressed) --> decompress
        --> store.chain_apply().add(chain ID, parent chain ID), which hashes the tar (DiffID)

The store reads the tar to its very end (padding included) and records its sha256; we
read whatever follows a compressed stream through the blob hash, then compare both
digests with what the manifest and the config promise. A mismatch removes every layer this load made for the
image (never one that was there before), so a failed load leaves the store as it was.

Layers are named by chain ID, so a layer already in the store (shared with an image
loaded before, or the same image loaded again) is not read at all: a second load of an
image costs a few JSON reads. Loads and removals hold the images lock, so one load
cannot remove or reuse a layer another is still making.

Where the store's driver allows it (overlay) and the source can be read in several
places at once (an archive on disk, a layout), the layers of an image are unpacked
side by side (:mod:`lamina.chainapply`: the layers above the bottom one in worker
processes), each made ready only after its parent, and checked in chain order as
before; a failure anywhere still leaves nothing of the image.

A load killed outright cannot roll back: before making each layer it names it in a
journal (:mod:`lamina.images.journal`), deleted once the image records are written, and
every load first undoes the journals of dead loads (:mod:`lamina.images.recover`), as
``lamina cleanup`` does. So a killed load leaves no layer that no image owns.
"""

from __future__ import annotations

import collections
import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from lamina import compression as compress
from lamina.errors import DiffIDMismatch, ImageError, LaminaError, LayerNotFound
from lamina.images import dockersave, oci
from lamina.images.digest import layer_id, split_digest
from lamina.images.journal import LoadJournal
from lamina.images.records import ImageRecord, ImageRecords
from lamina.images.recover import recover_locked
from lamina.images.refs import normalize
from lamina.images.source import Source, open_source
from lamina.images.spec import ImageSpec, LayerBlob
from lamina.streams import CountingReader, HashingReader

if TYPE_CHECKING:
    from lamina.layerstore import ChainApplier, LayerStore

log = logging.getLogger(__name__)

_BUFFER = 1 << 20


class ProgressSink(Protocol):
    """What the loader tells a progress bar (lamina.progress.Progress fits)."""

    label: str
    total: int | None
    done: int

    def update(self, n: int) -> None: ...


@dataclass
class LoadResult:
    """What a load did."""

    images: list[ImageRecord] = field(default_factory=list)
    #: layers made by this load
    layers_loaded: int = 0
    #: layers that were already in the store
    layers_reused: int = 0
    #: bytes of layer blobs read from the archive
    bytes_read: int = 0
    #: what undoing earlier loads that were killed did first (one line each)
    recovered: list[str] = field(default_factory=list)


def read_archive(src: Source) -> list[ImageSpec]:
    """The images of an archive, in either format (docker-save wins when both are there:
    its manifest carries full names)."""
    if dockersave.is_docker_save(src):
        return dockersave.read_images(src)
    if oci.is_layout(src):
        return oci.read_images(src)
    raise ImageError(f"{src.label}: no manifest.json (docker save) or index.json (OCI layout) "
                     "in the archive")


def load(store: LayerStore, path: str | Path | None, *, stdin: IO[bytes] | None = None,
         progress: ProgressSink | None = None, tag: str | None = None,
         jobs: int | None = None) -> LoadResult:
    """Load every image of the archive at ``path`` (``-``/None: ``stdin``) into ``store``.

    ``tag`` names the image when the archive gives it no name (only with one image).
    ``jobs``: layers unpacked side by side where the store's driver allows it (None:
    one per CPU; 1: one after the other).
    """
    records = ImageRecords(store.root)
    spool_progress = progress.update if progress is not None else None
    with open_source(path, stdin=stdin, tmpdir=store.root / "tmp", progress=spool_progress) as src:
        specs = read_archive(src)
        if tag is not None:
            if len(specs) != 1:
                raise ImageError(f"{src.label}: --tag needs an archive of one image, this one has {len(specs)}")
            specs[0].names = [normalize(tag)]
        return load_specs(store, src, specs, progress=progress, records=records, jobs=jobs)


def load_specs(store: LayerStore, src: Source, specs: list[ImageSpec], *,
               progress: ProgressSink | None = None,
               records: ImageRecords | None = None, jobs: int | None = None) -> LoadResult:
    """Load ``specs`` (images already read and checked) whose blobs ``src`` holds.

    The path every image source shares (an archive, a registry): under the images lock,
    undo killed loads, then stream each layer in, journalled, and write the records.
    Layers are unpacked side by side (``jobs``, see :func:`load`) only from a source
    whose blobs can be read at once (:attr:`Source.concurrent`); a registry's arrive
    in order, each cancelling the downloads before it.
    """
    if not getattr(src, "concurrent", False):
        jobs = 1
    records = records or ImageRecords(store.root)
    result = LoadResult()
    with records.lock():
        result.recovered = recover_locked(store, records)
        for line in result.recovered:
            log.warning("%s", line)
        if progress is not None:
            progress.done = 0  # the spooling (if any) counted other bytes
            progress.total = _bytes_to_read(store, src, specs) or None
        journal = LoadJournal(records.dir)
        try:
            for n, spec in enumerate(specs, 1):
                rec = _load_image(store, records, src, spec, progress, result, journal,
                                  f"image {n}/{len(specs)}" if len(specs) > 1 else "", jobs)
                result.images.append(rec)
        except BaseException:
            # the failed image was rolled back; if a layer of it could not be removed,
            # the journal stays and recovery removes it once this process is gone
            if not _unowned(store, records, journal.layers):
                journal.discard()
            raise
        journal.discard()
    return result


def _unowned(store: LayerStore, records: ImageRecords, layers: list[str]) -> list[str]:
    """The layers of ``layers`` still in the store that no image record names."""
    if not layers:
        return []
    owned = {lid for rec in records.all() for lid in rec.layer_ids}
    return [lid for lid in layers if lid not in owned and store.exists(lid)]


def _bytes_to_read(store: LayerStore, src: Source, specs: list[ImageSpec]) -> int:
    total = 0
    seen: set[str] = set()
    for spec in specs:
        for blob, chain in zip(spec.layers, spec.chain_ids, strict=True):
            lid = layer_id(chain)
            if lid not in seen and not store.exists(lid):
                total += src.size(blob.path)
            seen.add(lid)
    return total


def _load_image(store: LayerStore, records: ImageRecords, src: Source, spec: ImageSpec,
                progress: ProgressSink | None, result: LoadResult, journal: LoadJournal,
                prefix: str, jobs: int | None) -> ImageRecord:
    chains = spec.chain_ids
    made: list[str] = []
    inflight: collections.deque[_InFlight] = collections.deque()
    on_read = _locked_updates(progress)
    try:
        todo = [src.size(b.path) for b, c in zip(spec.layers, chains, strict=True)
                if not store.exists(layer_id(c))]
        with store.chain_apply(jobs, sizes=todo) as batch:
            parent: str | None = None
            for i, (blob, chain) in enumerate(zip(spec.layers, chains, strict=True), 1):
                lid = layer_id(chain)
                what = f"{src.label}: layer {i} ({blob.path})"
                if store.exists(lid) and _reusable(store, records, lid, parent, blob.diff_id, what):
                    result.layers_reused += 1
                else:
                    while len(inflight) >= batch.jobs:
                        result.bytes_read += _settle(store, src, batch, inflight.popleft())
                    inflight.append(_start_layer(src, batch, blob, lid, parent, what, on_read,
                                                 made, journal, i))
                    if progress is not None:
                        progress.label = " ".join(x for x in (prefix, _layers_label(inflight, len(chains))) if x)
                    result.layers_loaded += 1
                parent = lid
            while inflight:
                result.bytes_read += _settle(store, src, batch, inflight.popleft())
    except BaseException:
        _undo(store, made)  # the batch has abandoned the layers it had not made ready
        raise
    finally:
        for layer in inflight:
            layer.close()
    old = records.get(spec.config_digest)
    names = list(dict.fromkeys((old.names if old else []) + spec.names))
    rec = ImageRecord(id=spec.config_digest, names=names, diff_ids=spec.diff_ids,
                      chain_ids=chains, config=spec.config.decode("utf-8"))
    records.take_names(spec.names, rec.id)
    records.put(rec)
    return rec


def _layers_label(inflight: collections.deque[_InFlight], total: int) -> str:
    first, last = inflight[0].index, inflight[-1].index
    return f"layer {first}/{total}" if first == last else f"layers {first}-{last}/{total}"


def _locked_updates(progress: ProgressSink | None) -> Callable[[int], None] | None:
    """``progress.update`` safe to call from the threads that feed layers side by side."""
    if progress is None:
        return None
    lock = threading.Lock()

    def update(n: int) -> None:
        with lock:
            progress.update(n)

    return update


def _reusable(store: LayerStore, records: ImageRecords, lid: str, parent: str | None, diff_id: str,
              what: str) -> bool:
    """Whether the layer already named ``lid`` is this image's layer and can be reused.

    It must be a read-only layer on the expected parent holding the expected DiffID (the
    store records the DiffID of every applied tar, and a load applies each layer against
    the DiffID its config names, so a load never leaves a layer with other content
    under a chain ID: one made so by hand is an error, never silently replaced).
    """
    rec = store.layer(lid)
    if rec.rw or (rec.parent or None) != parent:
        raise ImageError(f"{what}: layer {lid} exists in the store but is not this image's layer "
                         f"(parent {rec.parent or 'none'}, expected {parent or 'none'})")
    held = getattr(rec, "diff_id", None)
    if held is None or held == diff_id:
        return True
    used = store.children(lid) or any(lid in r.layer_ids for r in records.all())
    advice = ("and is in use; remove what uses it and load again" if used else
              "and was not made by a load; remove it and load again")
    raise ImageError(f"{what}: layer {lid} exists in the store with DiffID {held}, not {diff_id}, {advice}")


@dataclass(eq=False)
class _InFlight:
    """A layer handed to the chain apply, and what checking it needs once it is made."""

    lid: str
    blob: LayerBlob
    what: str
    kind: str
    size: int
    index: int
    raw: IO[bytes]
    #: hashes the compressed blob (None: an uncompressed sha256 blob, hashed by the store)
    outer: HashingReader | None

    def close(self) -> None:
        if self.outer is not None:
            self.outer.close()  # the hashing thread, if the load failed before the digest
        self.raw.close()


def _start_layer(src: Source, batch: ChainApplier, blob: LayerBlob, lid: str, parent: str | None,
                 what: str, on_read: Callable[[int], None] | None, made: list[str],
                 journal: LoadJournal, index: int) -> _InFlight:
    """Open one blob and hand its uncompressed stream to the chain apply.

    The store hashes the uncompressed stream it applies (to the end, padding included)
    and records that DiffID; this reader hashes only what the store cannot see, the
    compressed blob. An uncompressed sha256 blob is hashed once, by the store.
    """
    size = src.size(blob.path)
    if blob.size is not None and blob.size != size:
        raise ImageError(f"{what}: blob is {size} bytes, the manifest says {blob.size}")
    with src.open(blob.path) as probe:
        kind = compress.sniff(probe.read(compress.SNIFF_BYTES))
    algorithm = split_digest(blob.digest)[0] if blob.digest else "sha256"
    raw = src.open(blob.path)
    outer: HashingReader | None = None
    try:
        if kind == compress.NONE and algorithm == "sha256":
            head: IO[bytes] = CountingReader(raw, on_read) if on_read else raw  # type: ignore[assignment]
        else:
            outer = HashingReader(raw, algorithm, on_read)
            head = outer  # type: ignore[assignment]
        buffered = io.BufferedReader(head, _BUFFER)  # type: ignore[arg-type]
        stream: IO[bytes] = buffered
        if kind != compress.NONE:
            stream = io.BufferedReader(compress.decompressed(buffered, kind, what), _BUFFER)  # type: ignore[arg-type]
        journal.add(lid)  # before the layer exists: a kill from here on leaves it journalled
        made.append(lid)
        # the blob's size: about the tar's, or the least of it when compressed
        batch.add(lid, parent, stream, expected_diff_id=blob.diff_id, size_hint=size)
    except BaseException:
        if outer is not None:
            outer.close()
        raw.close()
        raise
    return _InFlight(lid, blob, what, kind, size, index, raw, outer)


def _settle(store: LayerStore, src: Source, batch: ChainApplier, layer: _InFlight) -> int:
    """Wait for the oldest layer in flight to be made; verify both digests; its blob size."""
    blob, outer, kind, what = layer.blob, layer.outer, layer.kind, layer.what
    blob_digest: str | None = None
    try:
        try:
            batch.finish(layer.lid)
        except DiffIDMismatch as e:
            # the store kept nothing; a wrong blob digest explains it better, if wrong
            if outer is not None:
                outer.drain()
            _verify(blob, outer.digest() if outer is not None else e.actual, e.actual, kind, what)
            raise ImageError(f"{what}: {e}") from e
        except LaminaError as e:
            # a damaged blob often breaks the tar first; the digest says why, if it can
            _explain_failure(src, blob, outer, kind, what)
            raise ImageError(f"{what}: {e}") from e
        if outer is not None:
            outer.drain()  # whatever follows the compressed stream counts for the digest
            blob_digest = outer.digest()
    finally:
        layer.close()
    diff_id = store.layer(layer.lid).diff_id
    if outer is None:
        blob_digest = diff_id
    _verify(blob, blob_digest, diff_id, kind, what)
    return layer.size


def _explain_failure(src: Source, blob: LayerBlob, outer: HashingReader | None, kind: str,
                     what: str) -> None:
    """After a failed apply: raise the digest mismatch that explains it, if there is one."""
    if outer is not None:
        try:
            outer.drain()
        except LaminaError:
            return
        if blob.digest is not None and outer.digest() != blob.digest:
            _verify(blob, outer.digest(), None, kind, what)
        return
    # an uncompressed blob: hash it again (failure path only) to name a wrong DiffID
    with src.open(blob.path) as raw:
        hashed = HashingReader(raw)
        hashed.drain()
    _verify(blob, hashed.digest(), hashed.digest(), kind, what)


def _verify(blob: LayerBlob, blob_digest: str | None, diff_id: str | None, kind: str,
            what: str) -> None:
    if blob.digest is not None and blob_digest != blob.digest:
        raise ImageError(f"{what}: blob digest mismatch: the manifest says {blob.digest}, "
                         f"the blob is {blob_digest}")
    if diff_id is not None and diff_id != blob.diff_id:
        extra = f" ({kind}-compressed)" if kind != compress.NONE else ""
        raise ImageError(f"{what}: DiffID mismatch: the config says {blob.diff_id}, "
                         f"the layer{extra} is {diff_id}")


def _undo(store: LayerStore, made: list[str]) -> None:
    """Remove the layers this load made for a failed image, top first."""
    for lid in reversed(made):
        try:
            if store.exists(lid):
                store.remove(lid)
        except LayerNotFound:
            pass
        except LaminaError as e:  # pragma: no cover - mounted by someone meanwhile
            log.warning("could not remove layer %s after a failed load: %s", lid, e)
