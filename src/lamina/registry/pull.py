"""``image pull``: an image from a registry into the store, layer by layer as it arrives.

The steps::

    reference --> manifest (through an index, for the platform) --> config (verified)
        --> the image's layers by chain ID: those already in the store are not fetched
        --> RegistrySource downloads the rest, several at once, within a memory budget
            (lamina.registry.prefetch: no blob is written to disk)
        --> images.load.load_specs applies them in chain order, verifying every blob
            digest and DiffID while it streams, journalled like an image load
        --> the image record; the manifest and blob descriptors kept for push

So a pull is an image load whose archive is the registry: the same journal makes a pull
killed at any instant leave no layer that no image owns (the next pull or ``lamina
cleanup`` removes it), and the same rollback makes a blob whose bytes do not match its
digest leave nothing of the image. What a pull keeps besides the image record is the
manifest it pulled and, per DiffID, the compressed blob it came as
(:mod:`lamina.registry.distribution`): that lets ``image push`` to the same registry
send the very manifest back (same digest) instead of recompressing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina.errors import ImageError
from lamina.images.digest import layer_id
from lamina.images.load import ProgressSink, load_specs
from lamina.images.recover import recover as recover_images
from lamina.images.spec import ImageSpec, LayerBlob, parse_config
from lamina.registry import distribution, manifests
from lamina.registry.blobs import fetch_small_blob
from lamina.registry.manifests import Platform
from lamina.registry.prefetch import MEMORY_BUDGET, PARALLEL, RegistrySource
from lamina.registry.reference import Reference, parse
from lamina.registry.transport import ClientOptions, RegistryClient, session

if TYPE_CHECKING:
    from lamina.store import Store

log = logging.getLogger(__name__)


class PullEvents:
    """What a pull tells a progress display; every method is optional to override."""

    def layers(self, layers: list[tuple[str, int, str]]) -> None:
        """(digest, size, state) of every layer; state "exists" or "waiting"."""

    def state(self, digest: str, state: str) -> None:
        """A layer's download moved on ("downloading", "downloaded", "failed")."""

    def downloaded(self, digest: str, n: int) -> None:
        """``n`` more bytes of a blob arrived."""


@dataclass
class PullResult:
    reference: str
    image_id: str
    manifest_digest: str
    #: the index the manifest was chosen from (multi-platform images)
    index_digest: str | None
    platform: str
    names: list[str] = field(default_factory=list)
    layers_pulled: int = 0
    layers_reused: int = 0
    bytes_downloaded: int = 0
    #: the most bytes of blobs held in memory at once (within the pull's memory budget)
    peak_memory: int = 0
    #: how many times a download ahead of its turn stopped reading because that budget was full
    pauses: int = 0
    recovered: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"reference": self.reference, "id": self.image_id, "digest": self.manifest_digest,
                "index_digest": self.index_digest, "platform": self.platform, "names": self.names,
                "layers_pulled": self.layers_pulled, "layers_reused": self.layers_reused,
                "bytes_downloaded": self.bytes_downloaded, "peak_memory": self.peak_memory,
                "pauses": self.pauses}


def pull(store: Store, ref: str | Reference, *, platform: str | Platform | None = None,
         options: ClientOptions | None = None, progress: ProgressSink | None = None,
         events: PullEvents | None = None, parallel: int = PARALLEL,
         memory: int = MEMORY_BUDGET) -> PullResult:
    """Pull ``ref`` into ``store``; return what was pulled.

    ``platform``: ``os/arch[/variant]`` (default: this machine, or windows/amd64 for a
    windowsfilter store). ``parallel``: blobs downloaded at once; ``memory``: the bytes
    of blobs they may hold together before the ones ahead of their turn stop reading
    (:class:`lamina.registry.prefetch.Budget`). Errors are
    :class:`~lamina.errors.ImageError` naming ``ref``.
    """
    reference = parse(ref) if isinstance(ref, str) else ref
    explicit = platform is not None
    want = (Platform.parse(platform) if isinstance(platform, str) else platform) or \
        Platform.host(store.driver.name)
    what = str(reference)
    with session(reference, options) as client:
        return _pull(store, client, reference, want, explicit, what, progress,
                     events or PullEvents(), parallel, memory)


def _pull(store: Store, client: RegistryClient, ref: Reference, want: Platform, explicit: bool,
          what: str, progress: ProgressSink | None, events: PullEvents, parallel: int,
          memory: int) -> PullResult:
    repo = ref.repository
    manifest = manifests.resolve(client, repo, ref.target, want, what, explicit=explicit)
    if ref.digest and manifest.index_digest is None and manifest.digest != ref.digest:
        raise ImageError(f"{what}: the registry sent manifest {manifest.digest}")
    config = fetch_small_blob(client, repo, manifest.config.digest, manifest.config.size,
                              f"{what}: config")
    config_digest, config_doc, diff_ids = parse_config(config, f"{what}: config {manifest.config.digest}")
    if len(diff_ids) != len(manifest.layers):
        raise ImageError(f"{what}: the manifest lists {len(manifest.layers)} layers, the config "
                         f"{len(diff_ids)} DiffIDs")
    manifests.check_config_platform(config_doc, want, what, explicit)
    names = [ref.familiar] if ref.tag else []
    blobs = [LayerBlob(path=d.digest, diff_id=diff, digest=d.digest, size=d.size)
             for d, diff in zip(manifest.layers, diff_ids, strict=True)]
    spec = ImageSpec(config_digest=config_digest, config=config, layers=blobs, names=names)
    # undo killed loads and pulls first, so what we see in the store stays there
    recovered = recover_images(store)
    for line in recovered:
        log.info("%s", line)
    needed: list[tuple[str, int]] = []
    listing: list[tuple[str, int, str]] = []
    for blob, chain in zip(spec.layers, spec.chain_ids, strict=True):
        present = store.exists(layer_id(chain))
        listing.append((blob.path, blob.size or 0, "exists" if present else "waiting"))
        if not present:
            needed.append((blob.path, blob.size or 0))
    events.layers(listing)
    total = [0]
    counting = threading.Lock()

    def on_bytes(digest: str, n: int) -> None:  # called from the download threads
        with counting:
            total[0] += n
            events.downloaded(digest, n)

    known = {b.path: b.size or 0 for b in spec.layers}
    urls = {d.digest: d.urls for d in manifest.layers if d.urls}
    with RegistrySource(client, repo, needed, parallel=parallel, memory=memory, known=known,
                        urls=urls, on_bytes=on_bytes, on_state=events.state, label=what) as src:
        loaded = load_specs(store, src, [spec], progress=progress)
    rec = loaded.images[0]
    distribution.remember(store.root, ref, manifest, diff_ids)
    return PullResult(reference=what, image_id=rec.id, manifest_digest=manifest.digest,
                      index_digest=manifest.index_digest, platform=str(want) if manifest.platforms
                      else _config_platform(config_doc), names=rec.names,
                      layers_pulled=loaded.layers_loaded, layers_reused=loaded.layers_reused,
                      bytes_downloaded=total[0], peak_memory=src.budget.peak,
                      pauses=src.budget.pauses,
                      recovered=recovered + loaded.recovered)


def _config_platform(config: dict[str, Any]) -> str:
    parts = [config.get("os"), config.get("architecture"), config.get("variant")]
    return "/".join(str(p) for p in parts if isinstance(p, str) and p) or "unknown"

