"""Images: ``docker save`` archives and OCI layouts in and out of a store.

An image is a config (whose sha256 is the image ID) and a chain of layers. lamina keeps
the layers as ordinary store layers named by their chain IDs (Docker's rule, see
:mod:`lamina.images.digest`), so images that share a base share its layers, and keeps a
small record per image (:mod:`lamina.images.records`): names -> config -> chain.

The modules, one idea each: :mod:`digest` (chain IDs, hashing readers), :mod:`source`
(files of an archive, tar or directory; layers are decompressed by
:mod:`lamina.compression`, which the CLI's ``apply`` shares), :mod:`dockersave` and
:mod:`oci` (the two formats, read and written), :mod:`spec` (what a reader hands the loader), :mod:`load`, :mod:`save`, :mod:`remove`,
:mod:`records`, :mod:`refs` (names), :mod:`tarwriter`, :mod:`journal` (what a running
load has made) and :mod:`recover` (undoing killed loads), and :mod:`cli` (the verbs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lamina.images.digest import chain_ids
from lamina.images.load import LoadResult, load
from lamina.images.records import ImageNotFound, ImageRecord, ImageRecords
from lamina.images.recover import recover
from lamina.images.remove import ImageInUse, RemoveResult, remove_images
from lamina.images.save import SaveResult, save

if TYPE_CHECKING:
    from lamina.layerstore import LayerStore

__all__ = [
    "ImageInUse", "ImageNotFound", "ImageRecord", "LoadResult", "RemoveResult", "SaveResult",
    "chain_ids", "images", "inspect", "load", "recover", "remove_images", "resolve_image",
    "resolve_image_top", "save",
]


def images(store: LayerStore) -> list[ImageRecord]:
    """Every image in the store, newest load first."""
    return ImageRecords(store.root).all()


def resolve_image(store: LayerStore, ref: str) -> ImageRecord:
    """The image named ``ref`` (name, ID or unique ID prefix); ImageNotFound if none."""
    return ImageRecords(store.root).resolve(ref)


def resolve_image_top(store: LayerStore, ref: str) -> str:
    """The layer ID a container on image ``ref`` goes on: the image's top layer.

    ``create-rw ID --image NAME`` uses this as the parent of the new layer.
    """
    return resolve_image(store, ref).top_layer


def inspect(store: LayerStore, ref: str) -> dict[str, Any]:
    """What ``image inspect`` shows: IDs, names, layers, sizes and the parsed config."""
    rec = resolve_image(store, ref)
    config = rec.config_json()
    layers = []
    size = 0
    for lid, diff in zip(rec.layer_ids, rec.diff_ids, strict=True):
        lsize = store.layer(lid).size if store.exists(lid) else None
        size += lsize or 0
        layers.append({"id": lid, "diff_id": diff, "size": lsize, "present": lsize is not None})
    return {
        "Id": rec.id,
        "RepoTags": rec.names,
        "Created": config.get("created"),
        "Architecture": config.get("architecture"),
        "Os": config.get("os"),
        "Size": size,
        "TopLayer": rec.top_layer,
        "RootFS": {"Type": "layers", "Layers": rec.diff_ids},
        "ChainIDs": rec.chain_ids,
        "Layers": layers,
        "Config": config.get("config") or {},
    }
