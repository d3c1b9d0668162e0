"""The ``docker save`` archive format, read and written.

The format (moby ``image/tarexport``): ``manifest.json`` is a list of
``{"Config": "<hex>.json", "RepoTags": ["name:tag"], "Layers": ["<v1 id>/layer.tar", ...]}``;
the config is the image config whose sha256 is the image ID; each ``<v1 id>/`` holds a
``VERSION`` ("1.0"), a legacy v1 ``json`` and the uncompressed ``layer.tar``; and
``repositories`` maps ``{name: {tag: <v1 id of the top layer>}}`` for pre-1.10 Docker.
A layer that occurs twice is written once, the second ``layer.tar`` a symlink to the
first. Docker 25+ writes the same manifest inside an OCI layout, with ``Layers`` naming
``blobs/sha256/<hex>`` files; both shapes are read here.

What lamina writes is accepted by ``docker load`` (which reads ``manifest.json`` and the
files it names, and checks each layer against the config's DiffIDs). The v1 IDs are
lamina's own (a sha256 over the layer's chain ID, its parent and, for the top layer,
the image ID): Docker's v1 IDs hash a Go rendering of the legacy config that nothing
reads any more, and ``docker load`` ignores them.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lamina.errors import ImageError
from lamina.images.digest import check_digest, split_digest
from lamina.images.refs import try_normalize
from lamina.images.source import Source, explain_missing, read_json_bytes
from lamina.images.spec import ImageSpec, LayerBlob, load_json, parse_config
from lamina.images.tarwriter import TarWriter

MANIFEST = "manifest.json"
REPOSITORIES = "repositories"
_BLOB_PATH_RE = re.compile(r"blobs/(sha256|sha512)/([0-9a-f]+)")
_CONFIG_NAME_RE = re.compile(r"([0-9a-f]{64})\.json")


def is_docker_save(src: Source) -> bool:
    return src.has(MANIFEST)


def _digest_in_path(path: str) -> str | None:
    """The digest a path promises: ``blobs/sha256/<hex>`` or ``<hex>.json`` (configs)."""
    m = _BLOB_PATH_RE.fullmatch(path)
    if m:
        return check_digest(f"{m.group(1)}:{m.group(2)}", f"blob name {path}")
    m = _CONFIG_NAME_RE.fullmatch(posixpath.basename(path))
    if m:
        return f"sha256:{m.group(1)}"
    return None


def read_images(src: Source) -> list[ImageSpec]:
    """Every image of a docker-save archive, checked as far as can be without its layers."""
    manifest = load_json(read_json_bytes(src, MANIFEST, "manifest"), f"{src.label}: {MANIFEST}")
    if not isinstance(manifest, list) or not manifest:
        raise ImageError(f"{src.label}: {MANIFEST} lists no images")
    legacy = _legacy_names(src)
    images = []
    for n, item in enumerate(manifest, 1):
        what = f"{src.label}: image {n} of {MANIFEST}"
        if not isinstance(item, dict) or not isinstance(item.get("Config"), str):
            raise ImageError(f"{what}: entry has no Config")
        config_path = item["Config"]
        config_bytes = read_json_bytes(src, config_path, "config")
        digest, _config, diff_ids = parse_config(config_bytes, f"{src.label}: {config_path}")
        promised = _digest_in_path(config_path)
        if promised is not None and promised.startswith("sha256:") and promised != digest:
            raise ImageError(f"{src.label}: config {config_path} has digest {digest}, "
                             f"not the {promised} its name promises")
        paths = item.get("Layers") or []
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ImageError(f"{what}: Layers is not a list of paths")
        if len(paths) != len(diff_ids):
            raise ImageError(f"{what}: {len(paths)} layers listed but the config has "
                             f"{len(diff_ids)} DiffIDs")
        if not paths:
            raise ImageError(f"{what}: image has no layers")
        layers = []
        for i, (path, diff_id) in enumerate(zip(paths, diff_ids, strict=True), 1):
            if not src.has(path):
                raise ImageError(f"{src.label}: layer {i} ({path}) {explain_missing(src, path)}")
            layers.append(LayerBlob(path=path, diff_id=diff_id, digest=_digest_in_path(path)
                                    if _BLOB_PATH_RE.fullmatch(path) else None))
        tags = item.get("RepoTags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ImageError(f"{what}: RepoTags is not a list of names ({type(tags).__name__})")
        names = [t for t in (try_normalize(x) for x in tags) if t]
        if not names:
            top_v1 = posixpath.dirname(paths[-1])
            names = legacy.get(top_v1, [])
        images.append(ImageSpec(config_digest=digest, config=config_bytes, layers=layers,
                                names=names))
    return images


def _legacy_names(src: Source) -> dict[str, list[str]]:
    """``repositories``: top-layer v1 ID -> names, for archives whose RepoTags are empty."""
    if not src.has(REPOSITORIES):
        return {}
    try:
        repos = load_json(read_json_bytes(src, REPOSITORIES, "repositories file"), REPOSITORIES)
    except ImageError:
        return {}  # advisory only: a damaged legacy file must not block a valid manifest
    out: dict[str, list[str]] = {}
    if isinstance(repos, dict):
        for repo, tags in repos.items():
            if not isinstance(tags, dict):
                continue
            for tag, v1 in tags.items():
                name = try_normalize(f"{repo}:{tag}")
                if name and isinstance(v1, str):
                    out.setdefault(v1, []).append(name)
    return out


# -- writing ---------------------------------------------------------------------------


@dataclass
class SaveImage:
    """An image to write: its config as stored and its layers' IDs, bottom first."""

    config_digest: str
    config: bytes
    names: list[str]
    diff_ids: list[str]
    chain_ids: list[str]

    @property
    def created(self) -> int:
        """The config's creation time in seconds since the epoch (0 if absent)."""
        try:
            text = json.loads(self.config).get("created") or ""
        except (ValueError, AttributeError):
            return 0
        return _epoch(text)


def _epoch(text: str) -> int:
    from datetime import datetime

    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)?$", str(text))
    if not m:
        return 0
    zone = m.group(2) or "Z"
    stamp = datetime.fromisoformat(m.group(1) + ("+00:00" if zone == "Z" else zone))
    return max(0, int(stamp.timestamp()))


def v1_id(chain_id: str, parent_v1: str | None, image_id: str | None) -> str:
    """A stable directory name for a layer in a docker-save archive (see module doc)."""
    doc = json.dumps({"layer_id": chain_id, "parent": parent_v1 or "", "image": image_id or ""},
                     sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def _v1_json(v1: str, parent: str | None, image: SaveImage | None) -> bytes:
    """The legacy per-layer ``json``: the top layer carries the image config's fields."""
    doc: dict[str, Any] = {}
    if image is not None:
        try:
            cfg = json.loads(image.config)
        except ValueError:
            cfg = {}
        doc = {k: v for k, v in cfg.items() if k not in ("rootfs", "history")}
    else:
        doc["created"] = "1970-01-01T00:00:00Z"
    doc["id"] = v1
    if parent:
        doc["parent"] = parent
    return json.dumps(doc, separators=(",", ":")).encode()


#: writes one layer's tar into the archive as member ``name`` and returns its size:
#: ``write_layer(writer, name, chain_id, diff_id, mtime)``
LayerWriter = Callable[[TarWriter, str, str, str, int], int]


def write(images: Iterable[SaveImage], out: TarWriter, write_layer: LayerWriter) -> None:
    """Write ``images`` as a docker-save archive.

    Metadata goes first (``manifest.json``, ``repositories``, configs), then the layers
    bottom-up, so that a reader streaming the archive knows the chain before the data.
    """
    images = list(images)
    manifest = []
    repos: dict[str, dict[str, str]] = {}
    plan: list[tuple[str, str | None, SaveImage | None, str, str, int]] = []
    planned: set[str] = set()
    for img in images:
        parent: str | None = None
        paths = []
        for i, (chain, diff) in enumerate(zip(img.chain_ids, img.diff_ids, strict=True)):
            top = i == len(img.chain_ids) - 1
            v1 = v1_id(chain, parent, img.config_digest if top else None)
            if v1 not in planned:
                planned.add(v1)
                plan.append((v1, parent, img if top else None, chain, diff, img.created))
            paths.append(f"{v1}/layer.tar")
            parent = v1
        for name in img.names:
            repo, _, tag = name.rpartition(":")
            repos.setdefault(repo, {})[tag] = paths[-1].split("/")[0]
        manifest.append({"Config": f"{split_digest(img.config_digest)[1]}.json",
                         "RepoTags": list(img.names) or None, "Layers": paths})
    out.add_bytes(MANIFEST, json.dumps(manifest, separators=(",", ":")).encode() + b"\n")
    if repos:
        out.add_bytes(REPOSITORIES, json.dumps(repos, separators=(",", ":")).encode() + b"\n")
    seen_configs: set[str] = set()
    for img in images:
        if img.config_digest in seen_configs:
            continue
        seen_configs.add(img.config_digest)
        out.add_bytes(f"{split_digest(img.config_digest)[1]}.json", img.config, mtime=img.created)
    written: dict[str, str] = {}  # DiffID -> v1 ID whose layer.tar holds it
    for v1, parent, top_image, chain, diff, mtime in plan:
        out.add_dir(v1, mtime=mtime)
        out.add_bytes(f"{v1}/VERSION", b"1.0", mtime=mtime)
        out.add_bytes(f"{v1}/json", _v1_json(v1, parent, top_image), mtime=mtime)
        if diff in written:
            out.add_symlink(f"{v1}/layer.tar", f"../{written[diff]}/layer.tar", mtime=mtime)
        else:
            write_layer(out, f"{v1}/layer.tar", chain, diff, mtime)
            written[diff] = v1
