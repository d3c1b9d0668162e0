"""Builders for image archives and a small in-memory store, for the image tests.

The archives are made here independently of lamina's own writers (following the
formats as Docker 20.10 and the OCI image-spec write them), so that reading is never
tested only against lamina's writing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lamina.chainapply import SerialChain
from lamina.errors import (
    DiffIDMismatch,
    InvalidArchive,
    LayerExists,
    LayerHasChildren,
    LayerNotFound,
    ParentNotFound,
)

MTIME = 1_700_000_000


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: Mapping[str, bytes | None], *, dirs: Iterable[str] = ()) -> bytes:
    """An uncompressed layer tar: ``None`` values are whiteouts (``.wh.NAME``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(ti)
        for name, data in files.items():
            if data is None:
                head, _, base = name.rpartition("/")
                name, data = (f"{head}/" if head else "") + f".wh.{base}", b""
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def config_for(layers: list[bytes], **extra: object) -> bytes:
    """An image config whose DiffIDs are those of ``layers`` (uncompressed tars)."""
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20.123456789Z",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }
    doc.update(extra)
    return json.dumps(doc).encode()


@dataclass
class Image:
    layers: list[bytes]
    names: list[str] = field(default_factory=list)
    config: bytes | None = None

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = config_for(self.layers)

    @property
    def id(self) -> str:
        assert self.config is not None
        return sha(self.config)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
    tar.addfile(ti, io.BytesIO(data))


def docker_save(dest: Path, images: list[Image], *, omit: Iterable[str] = ()) -> Path:
    """A docker-save archive as Docker 20.10 writes it: entries in name order, so the
    manifest comes after the layers; a layer that repeats is a symlink to the first."""
    entries: dict[str, bytes | tuple[str]] = {}
    manifest = []
    repos: dict[str, dict[str, str]] = {}
    by_diff: dict[str, str] = {}
    for img in images:
        parent = ""
        paths = []
        for i, tar in enumerate(img.layers):
            v1 = hashlib.sha256(f"{parent} {sha(tar)} {img.id if i == len(img.layers) - 1 else ''}".encode()).hexdigest()
            entries[f"{v1}/VERSION"] = b"1.0"
            entries[f"{v1}/json"] = json.dumps({"id": v1, "parent": parent}).encode()
            if sha(tar) in by_diff and by_diff[sha(tar)] != v1:
                entries[f"{v1}/layer.tar"] = (f"../{by_diff[sha(tar)]}/layer.tar",)
            else:
                entries[f"{v1}/layer.tar"] = tar
                by_diff[sha(tar)] = v1
            paths.append(f"{v1}/layer.tar")
            parent = v1
        assert img.config is not None
        entries[f"{img.id.split(':')[1]}.json"] = img.config
        for n in img.names:
            repo, _, tag = n.rpartition(":")
            repos.setdefault(repo, {})[tag] = parent
        manifest.append({"Config": f"{img.id.split(':')[1]}.json", "RepoTags": img.names or None,
                         "Layers": paths})
    entries["manifest.json"] = json.dumps(manifest).encode()
    if repos:
        entries["repositories"] = json.dumps(repos).encode()
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            if name in omit:
                continue
            value = entries[name]
            if isinstance(value, tuple):
                ti = tarfile.TarInfo(name)
                ti.type, ti.linkname, ti.mtime = tarfile.SYMTYPE, value[0], MTIME
                tar.addfile(ti)
            else:
                _add(tar, name, value)
    return dest


def compress(data: bytes, kind: str) -> bytes:
    if kind == "none":
        return data
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    raise ValueError(kind)


_LAYER_MT = {"none": "application/vnd.oci.image.layer.v1.tar",
             "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
             "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def oci_layout(dest: Path, images: list[Image], compression: list[str] | str = "gzip", *,
               as_tar: bool = False, names_as: str = "ref") -> Path:
    """An OCI image layout (a directory, or a tar of one) with compressed layer blobs.

    Returns the layout path. ``names_as``: "ref" (org.opencontainers.image.ref.name with
    the full name) or "containerd" (io.containerd.image.name + a bare tag as ref.name).
    """
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> dict[str, object]:
        d = sha(data)
        blobs[d] = data
        return {"digest": d, "size": len(data)}

    index = []
    for img in images:
        kinds = [compression] * len(img.layers) if isinstance(compression, str) else compression
        layers = [{"mediaType": _LAYER_MT[k], **put(compress(t, k))} for t, k in zip(img.layers, kinds, strict=True)]
        assert img.config is not None
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(img.config)},
                               "layers": layers}).encode()
        desc: dict[str, object] = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(manifest)}
        for n in img.names or [None]:
            entry = dict(desc)
            if n and names_as == "ref":
                entry["annotations"] = {"org.opencontainers.image.ref.name": n}
            elif n:
                entry["annotations"] = {"io.containerd.image.name": f"docker.io/library/{n}",
                                        "org.opencontainers.image.ref.name": n.rpartition(":")[2]}
            index.append(entry)
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
             "index.json": json.dumps({"schemaVersion": 2, "manifests": index}).encode()}
    for d, data in blobs.items():
        files[f"blobs/sha256/{d.split(':')[1]}"] = data
    if as_tar:
        with tarfile.open(dest, "w") as tar:
            for name in sorted(files, key=lambda n: (not n.startswith("blobs"), n)):
                _add(tar, name, files[name])
    else:
        for name, data in files.items():
            p = dest / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    return dest


def blob_file(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


# -- an in-memory store with the API the image code uses ----------------------------------


@dataclass
class _Rec:
    id: str
    parent: str | None
    rw: bool = False
    size: int = 0
    mount_count: int = 0
    diff_id: str | None = None


class _Hashing:
    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

        self.seen = bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.seen += data
        return data


class MemoryStore:
    """The slice of :class:`lamina.store.Store` that images use, in memory: it satisfies
    :class:`lamina.layerstore.LayerStore`, as the real store does.

    ``apply_diff`` reads the tar with :mod:`tarfile` in stream mode, so like the real
    apply it stops at the end-of-archive marker and leaves the rest of the stream unread,
    and it fails (leaving no layer) on a damaged tar.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        (root / "locks").mkdir(exist_ok=True)
        self.recs: dict[str, _Rec] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.applied: list[str] = []
        #: each applied layer's tar as it came, which diff gives back (as tar-split does)
        self.tars: dict[str, bytes] = {}

    def exists(self, lid: str) -> bool:
        return lid in self.recs

    def layer(self, lid: str) -> _Rec:
        if lid not in self.recs:
            raise LayerNotFound(f"layer {lid} not found")
        return self.recs[lid]

    def children(self, lid: str) -> list[str]:
        return [r.id for r in self.recs.values() if r.parent == lid]

    def create_rw(self, lid: str, parent: str | None = None) -> None:
        if lid in self.recs:
            raise LayerExists(lid)
        self.recs[lid] = _Rec(lid, parent, rw=True)

    def chain_apply(self, jobs: int | None = None, *, sizes: Sequence[int] | None = None) -> SerialChain:
        """One layer at a time, as a store whose driver cannot unpack side by side."""
        return SerialChain(self)

    def apply_diff(self, lid: str, parent: str | None, stream: IO[bytes], *,
                   expected_diff_id: str | None = None) -> int:
        if lid in self.recs:
            raise LayerExists(lid)
        if parent and parent not in self.recs:
            raise ParentNotFound(parent)
        files = {}
        hashed = _Hashing(stream)
        try:
            with tarfile.open(fileobj=hashed, mode="r|") as tar:  # type: ignore[call-overload]
                for ti in tar:
                    if ti.isreg():
                        f = tar.extractfile(ti)
                        assert f is not None
                        files[ti.name] = f.read()
            while hashed.read(1 << 16):  # like the store: the DiffID covers the padding too
                pass
        except tarfile.TarError as e:
            raise InvalidArchive(f"bad tar: {e}") from e
        diff_id = "sha256:" + hashed.hash.hexdigest()
        if expected_diff_id is not None and diff_id != expected_diff_id:
            raise DiffIDMismatch(lid, expected_diff_id, diff_id)
        self.recs[lid] = _Rec(lid, parent, size=sum(len(v) for v in files.values()), diff_id=diff_id)
        self.files[lid] = files
        self.tars[lid] = bytes(hashed.seen)
        self.applied.append(lid)
        return self.recs[lid].size

    def remove(self, lid: str) -> None:
        if lid not in self.recs:
            raise LayerNotFound(lid)
        if self.children(lid):
            raise LayerHasChildren(lid)
        del self.recs[lid]
        self.files.pop(lid, None)
        self.tars.pop(lid, None)

    def diff(self, lid: str, parent: str | None = None) -> IO[bytes]:
        if lid not in self.tars:
            raise LayerNotFound(f"layer {lid} not found")
        return io.BytesIO(self.tars[lid])
