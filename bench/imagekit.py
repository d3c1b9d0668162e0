"""Image archives the image benches load: gzip variants of an archive, synthetic images.

Written here, not by Docker, on purpose for the synthetic ones: a layer of a given size
in a given shape (how many files, how large) is what the memory figures compare, and an
archive of a 2 GB layer is quicker to write than to build with ``docker commit``. The
formats are the ones ``docker save`` (20.10) and OCI image layouts use; the gzip variants
of a real archive keep its layers byte for byte inside gzip members, so their DiffIDs,
and the image, stay the same.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

MTIME = 1_700_000_000
#: gzip level of the variants: gzip's and Go's default, what registries mostly hold
GZIP_LEVEL = 6
_CHUNK = 1 << 20


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, MTIME
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = path.stat().st_size, 0o644, MTIME
    with open(path, "rb") as f:
        tar.addfile(info, f)


# -- docker-save archives from layer files ---------------------------------------------------


def write_docker_save(dest: Path, layers: list[Path], diff_ids: list[str], name: str,
                      config: bytes | None = None) -> str:
    """A docker-save archive of ``layers`` (files: tars, or gzip blobs of them) whose
    config names ``diff_ids``; returns the image ID. Written next to ``dest``, then
    renamed into place, so an interrupted bench leaves no half archive."""
    if config is None:
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
        }).encode()
    image_id = "sha256:" + hashlib.sha256(config).hexdigest()
    tmp = dest.with_suffix(".partial")
    paths = []
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        parent = ""
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            v1 = hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()
            _add_bytes(tar, f"{v1}/VERSION", b"1.0")
            _add_bytes(tar, f"{v1}/json", json.dumps({"id": v1, "parent": parent}).encode())
            _add_file(tar, f"{v1}/layer.tar", layer)
            paths.append(f"{v1}/layer.tar")
            parent = v1
        _add_bytes(tar, f"{image_id[7:]}.json", config)
        _add_bytes(tar, "manifest.json", json.dumps(
            [{"Config": f"{image_id[7:]}.json", "RepoTags": [name], "Layers": paths}]).encode())
    os.replace(tmp, dest)
    return image_id


# -- gzip variants of an archive -------------------------------------------------------------


@dataclass(frozen=True)
class GzipVariants:
    """The same image with gzip layers: an OCI layout and a docker-save archive."""

    layout: Path
    archive: Path
    #: (compressed, uncompressed) bytes of each layer
    sizes: list[tuple[int, int]]
    blobs: list[Path]


def gzip_variants(archive: Path, out: Path, name: str) -> GzipVariants:
    """Gzip each layer of docker-save ``archive`` (level 6) into ``out``: an OCI layout
    (``out/layout``) and a docker-save archive with gzip layer files (``out/docker.tar``,
    which ``docker load`` reads too). Made once; kept while ``archive`` is unchanged."""
    st = archive.stat()
    stamp = f"{archive.name} {st.st_size} {st.st_mtime_ns} level {GZIP_LEVEL}\n"
    note = out / "made-from"
    layout, docker = out / "layout", out / "docker.tar"
    if not (note.exists() and note.read_text() == stamp and docker.exists()):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        _make_gzip_variants(archive, layout, docker, name)
        note.write_text(stamp)
    sizes = json.loads((out / "sizes.json").read_text()) if (out / "sizes.json").exists() else []
    blobs = [layout / "blobs" / "sha256" / b for b in json.loads((out / "blobs.json").read_text())]
    return GzipVariants(layout, docker, [tuple(s) for s in sizes], blobs)  # type: ignore[misc]


def _make_gzip_variants(archive: Path, layout: Path, docker: Path, name: str) -> None:
    out = layout.parent
    blobs_dir = layout / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())[0]  # type: ignore[union-attr]
        config = tar.extractfile(manifest["Config"]).read()  # type: ignore[union-attr]
        gz_paths, descriptors, sizes, diff_ids = [], [], [], []
        for i, member in enumerate(manifest["Layers"]):
            src = tar.extractfile(member)
            assert src is not None
            tmp = out / f"layer{i}.gz"
            diff = hashlib.sha256()
            raw = 0
            with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=GZIP_LEVEL,
                                                     mtime=0) as gz:
                while chunk := src.read(_CHUNK):
                    diff.update(chunk)
                    raw += len(chunk)
                    gz.write(chunk)
            digest, size = _sha256_file(tmp)
            blob = blobs_dir / digest[7:]
            os.replace(tmp, blob)
            gz_paths.append(blob)
            diff_ids.append("sha256:" + diff.hexdigest())
            sizes.append((size, raw))
            descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                "digest": digest, "size": size})
    cdigest = "sha256:" + hashlib.sha256(config).hexdigest()
    (blobs_dir / cdigest[7:]).write_bytes(config)
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": cdigest, "size": len(config)},
                      "layers": descriptors}).encode()
    mdigest = "sha256:" + hashlib.sha256(man).hexdigest()
    (blobs_dir / mdigest[7:]).write_bytes(man)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
        "size": len(man), "annotations": {"org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                                          "io.containerd.image.name": name}}]}))
    write_docker_save(docker, gz_paths, diff_ids, name, config=config)
    (out / "sizes.json").write_text(json.dumps(sizes))
    (out / "blobs.json").write_text(json.dumps([p.name for p in gz_paths]))


# -- synthetic images ------------------------------------------------------------------------


def _pool() -> bytes:
    """4 MiB of fixed pseudo-random bytes that file contents are cut from (not zeros:
    nothing on the way may treat the data as sparse or trivially compressible)."""
    out = bytearray()
    block = hashlib.sha256(b"lamina bench").digest()
    while len(out) < 4 << 20:
        block = hashlib.sha512(block).digest()
        out += block * 128
    return bytes(out)


def write_layer(dest: Path, total: int, *, file_size: int = 256 << 10, seed: int = 0,
                prefix: str = "data") -> str:
    """A layer tar of about ``total`` bytes of regular files (``file_size`` on average,
    from 1/16 to twice that, 64 to a directory); returns its DiffID. The number of
    entries grows with ``total``, as in a real layer."""
    pool = _pool()
    h = hashlib.sha256()

    class Hashing(io.RawIOBase):
        def __init__(self, f: io.BufferedWriter) -> None:
            self.f = f

        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            h.update(b)
            return self.f.write(b)

    written, n = 0, 0
    with open(dest, "wb") as raw, tarfile.open(fileobj=Hashing(raw), mode="w|",  # type: ignore[arg-type]
                                                format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        while written < total:
            d = f"{prefix}/d{n // 64:05d}"
            if d not in dirs:
                for part in (prefix, d):
                    if part not in dirs:
                        info = tarfile.TarInfo(part)
                        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
                        tar.addfile(info)
                        dirs.add(part)
            size = min(total - written, file_size // 16 + (n * 7919 + seed * 104729) % (file_size * 2))
            start = (n * 65537 + seed) % (len(pool) - size) if size < len(pool) else 0
            data = (pool * (size // len(pool) + 1))[:size] if size >= len(pool) else pool[start:start + size]
            info = tarfile.TarInfo(f"{d}/f{n:07d}")
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
            written += len(data)
            n += 1
    return "sha256:" + h.hexdigest()


def synthetic_image(dest: Path, layer_bytes: list[int], name: str, *, file_size: int = 256 << 10) -> Path:
    """A docker-save archive of layers of ``layer_bytes`` bytes each (made once: kept
    while a file of that name exists)."""
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="imagekit-") as tmp:
        paths, diff_ids = [], []
        for i, size in enumerate(layer_bytes):
            p = Path(tmp) / f"layer{i}.tar"
            diff_ids.append(write_layer(p, size, file_size=file_size, seed=i, prefix=f"l{i}"))
            paths.append(p)
        write_docker_save(dest, paths, diff_ids, name)
    return dest
