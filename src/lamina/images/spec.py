"""What an archive reader hands the loader: images as configs plus ordered layer blobs.

Both archive formats (docker-save and OCI layout) reduce to this, so the loader has one
path: verify the config, then for each layer stream its blob into the store and compare
digests. A reader has already checked everything it could without reading a layer (JSON
shapes, config digests, one DiffID per layer); the layer bytes are checked by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lamina import jsontext
from lamina.errors import ImageError
from lamina.images.digest import chain_ids, check_digest, sha256_digest


@dataclass(frozen=True)
class LayerBlob:
    """One layer of an image as stored in the archive."""

    #: the member name inside the archive ("<id>/layer.tar", "blobs/sha256/<hex>")
    path: str
    #: the uncompressed digest the config promises
    diff_id: str
    #: the digest of the blob as stored, when the format names one (OCI; docker-save
    #: archives of Docker 25+ whose paths are blobs/sha256/<hex>); None = not known
    digest: str | None = None
    #: the blob's size as the manifest states it, when it does
    size: int | None = None


@dataclass
class ImageSpec:
    """One image found in an archive."""

    #: ``sha256:<hex>`` of the config bytes: the image ID
    config_digest: str
    #: the config exactly as stored (its digest must not change on the way through)
    config: bytes
    layers: list[LayerBlob]
    #: names (``repo:tag``) the archive gives this image; may be empty
    names: list[str] = field(default_factory=list)

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def chain_ids(self) -> list[str]:
        return chain_ids(self.diff_ids)


def load_json(data: bytes, what: str) -> Any:
    """A JSON document from an archive, or ImageError naming it.

    JSON on the wire is UTF-8 (RFC 8259). A document nested deeper than the parser's
    recursion allows (``[[[[...`` a hundred thousand times) is refused like any other
    bad JSON, not let through as Python's RecursionError.
    """
    try:
        return jsontext.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ImageError(f"{what} is not valid JSON ({e})") from e
    except jsontext.JSONTextError as e:
        raise ImageError(f"{what} is not valid JSON ({e})") from None


def expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is of ``kind`` (bool is not an int here), else ImageError: a
    string where a list belongs must not be read one character at a time."""
    if isinstance(value, kind) and not (isinstance(value, bool) and bool not in
                                         (kind if isinstance(kind, tuple) else (kind,))):
        return value
    names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise ImageError(f"{what} is a {type(value).__name__}, not a {names}")


def parse_config(data: bytes, what: str) -> tuple[str, dict[str, Any], list[str]]:
    """Check an image config; return (its digest, the parsed JSON, its DiffIDs)."""
    config = load_json(data, f"{what}: config")
    if not isinstance(config, dict):
        raise ImageError(f"{what}: config is not a JSON object")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImageError(f"{what}: config has no rootfs of type \"layers\"")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise ImageError(f"{what}: config rootfs.diff_ids is not a list")
    for i, d in enumerate(diff_ids):
        check_digest(d, f"DiffID {i + 1} in {what}")
        if not d.startswith("sha256:"):
            raise ImageError(f"{what}: DiffID {i + 1} is not sha256 (chain IDs need sha256)")
    return sha256_digest(data), config, list(diff_ids)
