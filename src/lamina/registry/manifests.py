"""Manifests on the wire: fetching them verified, reading them, choosing a platform.

A tag names a manifest, which is either an image manifest (a config descriptor and
layer descriptors: OCI ``image.manifest.v1`` or Docker ``manifest.v2``) or an index of
manifests for several platforms (OCI ``image.index.v1`` or Docker ``manifest.list.v2``).
Docker's schema 1 is refused: it carries no config, so no image ID and no DiffIDs.

A manifest's digest is the sha256 of its exact bytes. Fetched by digest, the bytes must
hash to it; fetched by tag, they must hash to the ``Docker-Content-Digest`` the registry
names (when it names one). Either way the digest we report is the one we computed.

Platforms are ``os/architecture[/variant]`` with Go's names (``amd64``, ``arm64``).
Docker's defaults: an ``arm64`` entry without variant is ``v8``, an ``arm`` one ``v7``.
The default platform is this machine's, except that a windowsfilter store wants
``windows/amd64``. BuildKit's attestation manifests (``unknown/unknown``) are never
chosen.
"""

from __future__ import annotations

import hashlib
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from lamina import jsontext
from lamina.errors import ImageError
from lamina.images.digest import check_digest
from lamina.registry.transport import RegistryClient, RegistryError, error_detail

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
MT_DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v1+prettyjws")
INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MT_OCI_MANIFEST, MT_DOCKER_MANIFEST})
ACCEPT = ", ".join([MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST])
#: the largest manifest accepted (distribution itself refuses more than 4 MiB)
MAX_MANIFEST = 4 << 20
_LAYER_TYPES = frozenset({MT_DOCKER_LAYER_GZIP, MT_DOCKER_LAYER_TAR, MT_OCI_LAYER,
                          MT_OCI_LAYER_GZIP, MT_OCI_LAYER_ZSTD, MT_DOCKER_FOREIGN,
                          "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                          "application/vnd.oci.image.layer.nondistributable.v1.tar"})

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
           "riscv64": "riscv64", "i386": "386", "i686": "386"}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
        arch = _GOARCH.get(parts[1], parts[1])
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls, driver: str | None = None) -> Platform:
        if driver == "windowsfilter":
            return cls("windows", "amd64")
        machine = _platform.machine().lower()
        arch = _GOARCH.get(machine, machine)
        variant = "v6" if machine == "armv6l" else None
        return cls("linux", arch, variant)

    def matches(self, os_name: str, arch: str, variant: str | None) -> bool:
        arch = _GOARCH.get(arch, arch)
        if os_name != self.os or arch != self.architecture:
            return False
        if self.variant is None:
            return True
        have = variant or _DEFAULT_VARIANT.get(arch)
        return have == (self.variant or _DEFAULT_VARIANT.get(arch))


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    platform: tuple[str, str, str | None] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            doc["urls"] = list(self.urls)
        return doc


@dataclass
class Manifest:
    """An image manifest as fetched: its exact bytes and what they say."""

    digest: str
    media_type: str
    data: bytes
    config: Descriptor
    layers: list[Descriptor]
    #: the index it was chosen from, if any (its digest)
    index_digest: str | None = None
    platforms: list[str] = field(default_factory=list)


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = jsontext.loads(data)
    except jsontext.JSONTextError as e:  # [[[[... a hundred thousand deep, too
        raise RegistryError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{what}: not a JSON object")
    return doc


def _descriptor(doc: Any, what: str) -> Descriptor:
    if not isinstance(doc, dict):
        raise RegistryError(f"{what}: descriptor is not an object")
    digest = check_digest(doc.get("digest"), f"{what} digest")
    size = doc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"{what}: descriptor {digest} has no valid size")
    media = doc.get("mediaType")
    urls = doc.get("urls")
    plat = doc.get("platform")
    p = None
    if isinstance(plat, dict):
        p = (str(plat.get("os") or ""), str(plat.get("architecture") or ""),
             str(plat["variant"]) if plat.get("variant") else None)
    return Descriptor(media if isinstance(media, str) else "", digest, size,
                      tuple(u for u in urls if isinstance(u, str)) if isinstance(urls, list) else (), p)


def fetch(client: RegistryClient, repository: str, target: str, what: str) -> tuple[bytes, str, str]:
    """(bytes, media type, digest) of the manifest ``target`` (a tag or a digest) names."""
    resp = client.request("GET", f"/v2/{repository}/manifests/{target}",
                          scopes=(f"repository:{repository}:pull",), headers={"Accept": ACCEPT},
                          what=what)
    if resp.status != 200:
        body = resp.read(64 << 10) if resp.status != 401 or not resp.raw.isclosed() else b""
        detail = error_detail(body)
        if resp.status == 404:
            kind = "tag" if ":" not in target else "manifest"
            if "NAME_UNKNOWN" in detail:
                raise RegistryError(f"{what}: repository {repository} not found", 404)
            raise RegistryError(f"{what}: {kind} {target} not found in {repository}", 404)
        if resp.status in (401, 403):
            raise RegistryError(f"{what}: access denied (HTTP {resp.status}"
                                f"{': ' + detail if detail else ''}); wrong credentials, "
                                "or no such repository", resp.status)
        raise RegistryError(f"{what}: manifest {target}: HTTP {resp.status}"
                            f"{': ' + detail if detail else ''}", resp.status)
    data = resp.read(MAX_MANIFEST)
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if target.startswith("sha512:"):
        got = "sha512:" + hashlib.sha512(data).hexdigest()
    if ":" in target and target.split(":", 1)[0] in ("sha256", "sha512") and got != target:
        raise RegistryError(f"{what}: manifest {target}: the registry sent bytes with digest {got}")
    named = resp.header("Docker-Content-Digest")
    if named and ":" not in target and named.startswith("sha256:") and named != got:
        raise RegistryError(f"{what}: manifest for tag {target}: the registry says digest {named}, "
                            f"the bytes are {got}")
    media = resp.header("Content-Type").split(";", 1)[0].strip()
    doc = _json(data, f"{what}: manifest {got}")
    body_media = doc.get("mediaType")
    if isinstance(body_media, str) and body_media:
        media = body_media
    elif media not in INDEX_TYPES | MANIFEST_TYPES:
        media = MT_OCI_INDEX if "manifests" in doc else MT_OCI_MANIFEST
    if media in _SCHEMA1 or doc.get("schemaVersion") == 1:
        raise RegistryError(f"{what}: Docker schema 1 manifests are not supported (no image config)")
    return data, media, got


def parse_image(data: bytes, media: str, digest: str, what: str) -> Manifest:
    doc = _json(data, what)
    config = _descriptor(doc.get("config"), f"{what}: config")
    layers_doc = doc.get("layers")
    if not isinstance(layers_doc, list) or not layers_doc:
        raise RegistryError(f"{what}: manifest {digest} lists no layers")
    layers = [_descriptor(d, f"{what}: layer {i}") for i, d in enumerate(layers_doc, 1)]
    for i, layer in enumerate(layers, 1):
        if layer.media_type and layer.media_type not in _LAYER_TYPES:
            raise RegistryError(f"{what}: layer {i} ({layer.digest}) has media type "
                                f"{layer.media_type}, which is not an image layer")
    return Manifest(digest, media, data, config, layers)


def choose(index: dict[str, Any], want: Platform, what: str) -> Descriptor:
    """The descriptor of the manifest for ``want`` in an index."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise RegistryError(f"{what}: index has no manifests list")
    descs = [_descriptor(d, f"{what}: index entry {i}") for i, d in enumerate(manifests, 1)]
    usable = [d for d in descs if d.platform and d.platform[0] != "unknown"]
    for d in usable:
        assert d.platform is not None
        if want.matches(*d.platform) and (want.variant is not None or d.platform[2] in
                                          (None, _DEFAULT_VARIANT.get(want.architecture))):
            return d
    for d in usable:  # any variant of the architecture
        assert d.platform is not None
        if want.matches(*d.platform):
            return d
    have = ", ".join(sorted({"/".join(x for x in d.platform if x) for d in usable if d.platform})) or "none"
    raise RegistryError(f"{what}: no manifest for platform {want} (the image has: {have})")


def resolve(client: RegistryClient, repository: str, target: str, want: Platform,
            what: str, *, explicit: bool) -> Manifest:
    """The image manifest ``target`` leads to for platform ``want`` (through an index)."""
    data, media, digest = fetch(client, repository, target, what)
    index_digest = None
    platforms: list[str] = []
    for _depth in range(4):
        if media not in INDEX_TYPES:
            break
        index = _json(data, f"{what}: index {digest}")
        chosen = choose(index, want, what)
        platforms = [str(want)]
        index_digest = index_digest or digest
        data, media, digest = fetch(client, repository, chosen.digest, what)
        if chosen.size != len(data):
            raise RegistryError(f"{what}: manifest {digest} is {len(data)} bytes, the index says {chosen.size}")
    if media not in MANIFEST_TYPES:
        raise RegistryError(f"{what}: unsupported manifest media type {media!r}")
    manifest = parse_image(data, media, digest, what)
    manifest.index_digest = index_digest
    manifest.platforms = platforms
    return manifest


def check_config_platform(config: dict[str, Any], want: Platform, what: str, explicit: bool) -> None:
    """A single-platform image whose config names another platform: refused if asked for one."""
    os_name, arch = config.get("os"), config.get("architecture")
    if not explicit or not isinstance(os_name, str) or not isinstance(arch, str):
        return
    variant = config.get("variant") if isinstance(config.get("variant"), str) else None
    if not want.matches(os_name, arch, variant):
        got = "/".join(x for x in (os_name, arch, variant) if x)
        raise RegistryError(f"{what}: the image is for {got}, not {want}")
