"""``image save``: images out of the store as a docker-save archive or an OCI layout.

Each layer's tar is the store's ``diff`` of that layer, which for a layer made by
``image load`` is reassembled from its tar-split record: the very bytes that were
loaded, so the DiffIDs in the config still hold and the config is written unchanged.
Every layer is hashed on the way out and compared with its DiffID; a layer whose diff
no longer matches (changed since, or made without tar-split) stops the save with an
error instead of producing an archive ``docker load`` would reject.

To a file, each layer is read once (the tar header is patched after the data, see
:mod:`lamina.images.tarwriter`), into a temporary name renamed into place when whole.
To a pipe, each layer's length must be known before its header, so the layer is read
twice: once to measure, once to write.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from lamina.errors import ImageError, InvalidArchive, LayerNotFound
from lamina.images import dockersave, oci
from lamina.images.digest import hash_chunks, layer_id
from lamina.images.dockersave import SaveImage
from lamina.images.load import ProgressSink
from lamina.images.records import ImageRecords
from lamina.images.refs import try_normalize
from lamina.images.tarwriter import TarWriter

if TYPE_CHECKING:
    from lamina.layerstore import LayerStore

FORMATS = ("docker", "oci")
_CHUNK = 1 << 20


@dataclass
class SaveResult:
    images: list[str] = field(default_factory=list)
    layers: int = 0
    bytes: int = 0


def select(store: LayerStore, refs: list[str]) -> list[SaveImage]:
    """The images ``refs`` name, merged by ID; a name given keeps only that name."""
    records = ImageRecords(store.root)
    chosen: dict[str, SaveImage] = {}
    for ref in refs:
        rec = records.resolve(ref)
        name = try_normalize(ref)
        names = [name] if name is not None and name in rec.names else []
        img = chosen.get(rec.id)
        if img is None:
            chosen[rec.id] = SaveImage(config_digest=rec.id, config=rec.config.encode("utf-8"),
                                       names=names, diff_ids=list(rec.diff_ids),
                                       chain_ids=list(rec.chain_ids))
        else:
            img.names.extend(n for n in names if n not in img.names)
        for lid in rec.layer_ids:
            if not store.exists(lid):
                raise LayerNotFound(f"image {ref}: layer {lid} is missing from the store")
    return list(chosen.values())


def _diff_chunks(store: LayerStore, lid: str, progress: ProgressSink | None) -> Iterator[bytes]:
    """The layer's diff as chunks; a damaged layer is an error naming it."""
    stream = store.diff(lid)
    try:
        while True:
            try:
                chunk = stream.read(_CHUNK)
            except InvalidArchive as e:  # tar-split found a file changed behind its back
                raise ImageError(f"layer {lid}: {e}") from e
            if not chunk:
                return
            if progress is not None:
                progress.update(len(chunk))
            yield chunk
    finally:
        stream.close()


def _check(lid: str, diff_id: str, got: str) -> None:
    if got != diff_id:
        raise ImageError(f"layer {lid}: its diff has digest {got}, not its DiffID {diff_id} "
                         "(the layer was changed, or made without tar-split)")


def write_archive(store: LayerStore, images: list[SaveImage], out: IO[bytes], fmt: str = "docker",
                  progress: ProgressSink | None = None) -> SaveResult:
    """Write ``images`` to ``out`` in ``fmt`` ("docker" or "oci")."""
    if fmt not in FORMATS:
        raise ImageError(f"unknown image format {fmt!r}: use docker or oci")
    writer = TarWriter(out)
    result = SaveResult(images=[i.config_digest for i in images])
    total_layers = len({d for i in images for d in i.diff_ids})

    def write_layer(w: TarWriter, name: str, chain: str, diff_id: str, mtime: int) -> int:
        lid = layer_id(chain)
        result.layers += 1
        if progress is not None:
            progress.label = f"layer {result.layers}/{total_layers}"
        size = None
        if not w.seekable:
            got, size = hash_chunks(_diff_chunks(store, lid, None))
            _check(lid, diff_id, got)
        got, n = w.add_stream(name, _diff_chunks(store, lid, progress), mtime=mtime, size=size)
        _check(lid, diff_id, got)
        return n

    (oci.write if fmt == "oci" else dockersave.write)(images, writer, write_layer)
    writer.close()
    result.bytes = writer.bytes_written
    return result


def save(store: LayerStore, refs: list[str], output: str | Path | None, *, fmt: str = "docker",
         stdout: IO[bytes] | None = None, progress: ProgressSink | None = None) -> SaveResult:
    """Save the images ``refs`` name to ``output`` (None or ``-``: ``stdout``)."""
    if not refs:
        raise ImageError("name at least one image to save")
    images = select(store, refs)
    if output is None or str(output) == "-":
        if stdout is None:
            raise ImageError("no output given")
        return write_archive(store, images, stdout, fmt, progress)
    final = Path(output)
    if final.exists() and not final.is_file():
        with open(final, "wb") as f:  # a device or a fifo: write in place
            return write_archive(store, images, f, fmt, progress)
    tmp = final.with_name(f".{final.name}.lamina-{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            result = write_archive(store, images, f, fmt, progress)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"cannot write {output}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result
