"""The OCI image layout (image-spec ``image-layout.md``), read and written.

A layout is ``oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``index.json`` (an
image index whose descriptors point at manifests, or at further indexes for
multi-platform images) and ``blobs/<alg>/<hex>`` files named by their digest. Manifests
and configs are small and are verified here as they are read; layer blobs are verified
by the loader as it streams them.

Reading takes the manifest for this machine's platform from a multi-platform index
(or the only one there is) and skips BuildKit's attestation manifests, which are not
images. Writing produces uncompressed layer blobs (so each blob digest is the layer's
DiffID and the config stays byte-identical), and also a Docker ``manifest.json`` beside
``index.json``, as Docker 25 does, so that ``docker load`` of any Docker version takes
the OCI output as well.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable
from typing import Any

from lamina.errors import ImageError
from lamina.images.digest import check_digest, sha256_digest, split_digest
from lamina.images.dockersave import MANIFEST, LayerWriter, SaveImage
from lamina.images.refs import split_tag, try_normalize
from lamina.images.source import Source, explain_missing, read_json_bytes
from lamina.images.spec import ImageSpec, LayerBlob, expect, load_json, parse_config
from lamina.images.tarwriter import TarWriter

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_INDEX_TYPES = {MT_OCI_INDEX, MT_DOCKER_LIST}
_MANIFEST_TYPES = {MT_OCI_MANIFEST, MT_DOCKER_MANIFEST}

ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_IMAGE_NAME = "io.containerd.image.name"
_MAX_DEPTH = 8

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
           "i386": "386", "i686": "386"}


def is_layout(src: Source) -> bool:
    return src.has(LAYOUT_FILE) or src.has(INDEX_FILE)


def blob_path(digest: str) -> str:
    algorithm, hexpart = split_digest(digest)
    return f"blobs/{algorithm}/{hexpart}"


def _read_blob(src: Source, desc: dict[str, Any], what: str) -> bytes:
    digest = check_digest(desc.get("digest"), f"{what} digest")
    size = _size(desc, what)
    data = read_json_bytes(src, blob_path(digest), what)
    algorithm, _ = split_digest(digest)
    import hashlib

    got = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    if got != digest:
        raise ImageError(f"{src.label}: {what} {blob_path(digest)} has digest {got}, not {digest}")
    if size is not None and size != len(data):
        raise ImageError(f"{src.label}: {what} {blob_path(digest)} is {len(data)} bytes, "
                         f"the descriptor says {size}")
    return data


def _json(data: bytes, what: str) -> dict[str, Any]:
    doc = load_json(data, what)
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: not a JSON object")
    return doc


def _size(desc: dict[str, Any], what: str) -> int | None:
    """A descriptor's ``size``: a non-negative integer, or absent."""
    size = desc.get("size")
    if size is None:
        return None
    size = expect(size, int, f"the size of {what} {desc.get('digest')}")
    if size < 0:
        raise ImageError(f"the size of {what} {desc.get('digest')} is negative ({size})")
    return size


def _check_descriptor(desc: dict[str, Any], what: str) -> None:
    """The optional fields of a descriptor have the types the spec gives them."""
    for key, kind in (("mediaType", str), ("annotations", dict), ("platform", dict), ("urls", list)):
        if desc.get(key) is not None:
            expect(desc[key], kind, f"{what}: {key}")


def _names(annotations: Any) -> list[str]:
    """Names from a descriptor's annotations: containerd's full name, else ref.name.

    A ref.name that is a bare tag ("latest", as skopeo and Docker write it beside the
    full name) names no repository, so alone it gives no name; ``load --tag`` can.
    """
    if not isinstance(annotations, dict):
        return []
    for key in (ANN_IMAGE_NAME, ANN_REF_NAME):
        value = annotations.get(key)
        if not isinstance(value, str) or not value:
            continue
        if key == ANN_REF_NAME and ":" not in value and "/" not in value:
            continue
        name = try_normalize(value)
        if name:
            return [name]
    return []


def _host_platform() -> tuple[str, str]:
    machine = platform.machine().lower()
    return "linux", _GOARCH.get(machine, machine)


def _is_attestation(desc: dict[str, Any]) -> bool:
    ann = desc.get("annotations")
    if isinstance(ann, dict) and ann.get("vnd.docker.reference.type") == "attestation-manifest":
        return True
    plat = desc.get("platform")
    return isinstance(plat, dict) and plat.get("os") == "unknown"


def _pick_manifests(src: Source, index: dict[str, Any], what: str, depth: int) -> list[tuple[dict[str, Any], list[str]]]:
    """The image manifests an index leads to, each with the names it was given."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise ImageError(f"{what}: has no manifests list")
    if depth > _MAX_DEPTH:
        raise ImageError(f"{what}: indexes nested more than {_MAX_DEPTH} deep")
    out: list[tuple[dict[str, Any], list[str]]] = []
    for n, desc in enumerate(manifests, 1):
        if not isinstance(desc, dict):
            raise ImageError(f"{what}: manifest descriptor {n} is not an object")
        _check_descriptor(desc, f"{what}: manifest descriptor {n}")
        if _is_attestation(desc):
            continue
        media = desc.get("mediaType")
        data = _read_blob(src, desc, "manifest")
        doc = _json(data, f"{src.label}: manifest {desc.get('digest')}")
        if doc.get("mediaType") is not None:
            expect(doc["mediaType"], str, f"{src.label}: manifest {desc.get('digest')}: mediaType")
        media = media or doc.get("mediaType") or (MT_OCI_INDEX if "manifests" in doc else MT_OCI_MANIFEST)
        names = _names(desc.get("annotations"))
        if media in _INDEX_TYPES:
            inner = _pick_platform(src, doc, f"{src.label}: index {desc.get('digest')}", depth + 1)
            out.extend((m, names or n2) for m, n2 in inner)
        elif media in _MANIFEST_TYPES:
            out.append((doc | {"__digest__": desc.get("digest")}, names))
        else:
            raise ImageError(f"{src.label}: manifest {desc.get('digest')} has unsupported media type {media}")
    return out


def _pick_platform(src: Source, index: dict[str, Any], what: str, depth: int) -> list[tuple[dict[str, Any], list[str]]]:
    """From a nested (multi-platform) index, the manifest for this machine."""
    manifests = [d for d in index.get("manifests") or [] if isinstance(d, dict) and not _is_attestation(d)]
    os_name, arch = _host_platform()
    matching = [d for d in manifests if isinstance(d.get("platform"), dict)
                and d["platform"].get("os") == os_name and d["platform"].get("architecture") == arch]
    chosen = matching[:1] or (manifests if len(manifests) == 1 else [])
    if not chosen:
        raise ImageError(f"{what}: no manifest for {os_name}/{arch} among {len(manifests)} platforms")
    return _pick_manifests(src, index | {"manifests": chosen}, what, depth)


def read_images(src: Source) -> list[ImageSpec]:
    """Every image of an OCI layout, manifests and configs verified."""
    if src.has(LAYOUT_FILE):
        layout = _json(read_json_bytes(src, LAYOUT_FILE, "layout file"), f"{src.label}: {LAYOUT_FILE}")
        version = layout.get("imageLayoutVersion")
        if not isinstance(version, str) or not version.startswith("1."):
            raise ImageError(f"{src.label}: unsupported imageLayoutVersion {version!r}")
    index = _json(read_json_bytes(src, INDEX_FILE, "index"), f"{src.label}: {INDEX_FILE}")
    found = _pick_manifests(src, index, f"{src.label}: {INDEX_FILE}", 0)
    if not found:
        raise ImageError(f"{src.label}: {INDEX_FILE} lists no images")
    by_config: dict[str, ImageSpec] = {}
    for manifest, names in found:
        what = f"{src.label}: manifest {manifest['__digest__']}"
        config_desc = manifest.get("config")
        if not isinstance(config_desc, dict):
            raise ImageError(f"{what}: has no config descriptor")
        _check_descriptor(config_desc, f"{what}: config descriptor")
        config = _read_blob(src, config_desc, "config")
        digest, _cfg, diff_ids = parse_config(config, f"{src.label}: config {config_desc.get('digest')}")
        descs = manifest.get("layers")
        if not isinstance(descs, list):
            raise ImageError(f"{what}: has no layers list")
        if len(descs) != len(diff_ids):
            raise ImageError(f"{what}: {len(descs)} layers but the config has {len(diff_ids)} DiffIDs")
        if not descs:
            raise ImageError(f"{what}: image has no layers")
        layers = []
        for i, (desc, diff_id) in enumerate(zip(descs, diff_ids, strict=True), 1):
            if not isinstance(desc, dict):
                raise ImageError(f"{what}: layer {i} descriptor is not an object")
            _check_descriptor(desc, f"{what}: layer {i} descriptor")
            ldigest = check_digest(desc.get("digest"), f"layer {i} digest in {what}")
            path = blob_path(ldigest)
            if not src.has(path):
                raise ImageError(f"{src.label}: layer {i} ({path}) {explain_missing(src, path, 'layout')}")
            layers.append(LayerBlob(path=path, diff_id=diff_id, digest=ldigest,
                                    size=_size(desc, f"layer {i} of {what}")))
        if digest in by_config:
            spec = by_config[digest]
            spec.names.extend(n for n in names if n not in spec.names)
        else:
            by_config[digest] = ImageSpec(config_digest=digest, config=config, layers=layers,
                                          names=list(names))
    return list(by_config.values())


# -- writing ---------------------------------------------------------------------------


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def write(images: Iterable[SaveImage], out: TarWriter, write_layer: LayerWriter) -> None:
    """Write ``images`` as an OCI layout in a tar (plus Docker's ``manifest.json``).

    Layer blobs come first because a manifest needs each blob's size, known only once
    the layer has been streamed.
    """
    images = list(images)
    out.add_dir("blobs")
    out.add_dir("blobs/sha256")
    sizes: dict[str, int] = {}
    for img in images:
        for chain, diff in zip(img.chain_ids, img.diff_ids, strict=True):
            if diff not in sizes:
                sizes[diff] = write_layer(out, blob_path(diff), chain, diff, img.created)
    index_entries: list[dict[str, Any]] = []
    docker_manifest: list[dict[str, Any]] = []
    written: set[str] = set()
    for img in images:
        manifest = _dumps({
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": img.config_digest, "size": len(img.config)},
            "layers": [{"mediaType": MT_OCI_LAYER, "digest": d, "size": sizes[d]} for d in img.diff_ids],
        })
        mdigest = sha256_digest(manifest)
        for digest, data in ((img.config_digest, img.config), (mdigest, manifest)):
            if digest not in written:
                written.add(digest)
                out.add_bytes(blob_path(digest), data, mtime=img.created)
        desc = {"mediaType": MT_OCI_MANIFEST, "digest": mdigest, "size": len(manifest)}
        for name in img.names or [None]:
            entry = dict(desc)
            if name:
                _, tag = split_tag(name)
                entry["annotations"] = {ANN_IMAGE_NAME: _full_name(name), ANN_REF_NAME: tag or "latest"}
            index_entries.append(entry)
        docker_manifest.append({"Config": blob_path(img.config_digest), "RepoTags": img.names or None,
                                "Layers": [blob_path(d) for d in img.diff_ids]})
    out.add_bytes(INDEX_FILE, _dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
                                       "manifests": index_entries}))
    out.add_bytes(LAYOUT_FILE, _dumps({"imageLayoutVersion": "1.0.0"}))
    out.add_bytes(MANIFEST, _dumps(docker_manifest) + b"\n")


def _full_name(name: str) -> str:
    """``busybox:latest`` -> ``docker.io/library/busybox:latest`` (containerd's form)."""
    repo, tag = split_tag(name)
    first = repo.split("/", 1)[0]
    if "/" not in repo:
        repo = f"docker.io/library/{repo}"
    elif "." not in first and ":" not in first and first != "localhost":
        repo = f"docker.io/{repo}"
    return f"{repo}:{tag or 'latest'}"
