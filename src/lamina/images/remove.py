"""``image rm``: drop a name or an image, and the layers nothing else uses.

Like ``docker rmi``: removing one of several names only untags; removing the last name
(or the image by ID) deletes the record and then walks the image's chain from the top,
removing each layer that no other image lists and that has no children (a container's
read-write layer, or a layer someone built by hand). The walk stops at the first layer
still in use, since everything below it is in use too.

An image with a container (any layer outside every image record) on one of its layers
is refused unless forced, because its record is what tells a user what that container
runs; forced, the record goes and the used layers stay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lamina.errors import ImageError, LayerBusy, LayerHasChildren, LayerNotFound
from lamina.images.records import ImageRecord, ImageRecords
from lamina.images.refs import try_normalize

if TYPE_CHECKING:
    from lamina.layerstore import LayerStore

log = logging.getLogger(__name__)


class ImageInUse(ImageError):
    """The image has a container (or another layer not from an image) on it."""


@dataclass
class RemoveResult:
    untagged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    layers_removed: list[str] = field(default_factory=list)
    #: layers of deleted images kept because a container (or a mount) still uses them
    layers_kept: list[str] = field(default_factory=list)


def _users(store: LayerStore, rec: ImageRecord, image_layers: set[str]) -> list[str]:
    """Layers built on ``rec``'s chain that belong to no image (containers, mostly)."""
    own = set(rec.layer_ids)
    out = []
    for lid in rec.layer_ids:
        if not store.exists(lid):
            continue
        out.extend(k for k in store.children(lid) if k not in own and k not in image_layers)
    return out


def remove_images(store: LayerStore, refs: list[str], *, force: bool = False) -> RemoveResult:
    """Remove the images (or names) ``refs``; see the module doc."""
    records = ImageRecords(store.root)
    result = RemoveResult()
    with records.lock():
        for ref in refs:
            rec = records.resolve(ref)
            name = try_normalize(ref)
            if name is not None and name in rec.names and len(rec.names) > 1:
                rec.names.remove(name)
                records.put(rec)
                result.untagged.append(name)
                continue
            others = [r for r in records.all() if r.id != rec.id]
            image_layers = {lid for r in others for lid in r.layer_ids}
            users = _users(store, rec, image_layers)
            if users and not force:
                raise ImageInUse(f"image {ref} ({rec.short_id}) is in use by layer {users[0]}"
                                 f"{f' and {len(users) - 1} more' if len(users) > 1 else ''}; "
                                 "remove it first or use --force")
            result.untagged.extend(rec.names)
            records.delete(rec.id)
            result.deleted.append(rec.id)
            _collect(store, rec, image_layers, result)
    return result


def _collect(store: LayerStore, rec: ImageRecord, in_use: set[str], result: RemoveResult) -> None:
    chain = list(reversed(rec.layer_ids))
    for n, lid in enumerate(chain):
        if lid in in_use:
            return  # another image's layer: it and everything below stay
        try:
            if store.exists(lid):
                store.remove(lid)
                result.layers_removed.append(lid)
        except LayerNotFound:
            continue
        except (LayerHasChildren, LayerBusy) as e:
            log.info("keeping layer %s: %s", lid, e)
            result.layers_kept.extend(chain[n:])
            return
