"""image load / ls / rm against the store API: chain IDs, verification, nothing left on failure.

These run on an in-memory store with the slice of the store API that images use, so
they check the image logic alone and run in milliseconds; the same paths through the
real store (and its tar-split) are in ``test_images_roundtrip.py``.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import require_module
from images_support import (
    Image,
    MemoryStore,
    blob_file,
    config_for,
    docker_save,
    layer_tar,
    oci_layout,
    sha,
)
from lamina.errors import DiffIDMismatch, ImageError
from lamina.images import (
    ImageInUse,
    ImageNotFound,
    chain_ids,
    images,
    inspect,
    load,
    remove_images,
    resolve_image,
    resolve_image_top,
)
from lamina.images.digest import layer_id


@pytest.fixture
def store(tmp_path: Path) -> MemoryStore:
    return MemoryStore(tmp_path / "store")


def _base() -> bytes:
    return layer_tar({"etc/os": b"base\n", "bin/sh": b"#!sh\n" * 1000}, dirs=["etc", "bin"])


def _image(name: str, *tops: bytes) -> Image:
    return Image([_base(), *tops], [name])


def _ids(img: Image) -> list[str]:
    return [layer_id(c) for c in chain_ids([sha(t) for t in img.layers])]


def _snapshot(store: MemoryStore) -> tuple[set[str], list[str]]:
    return set(store.recs), sorted(p.name for p in (store.root / "images").glob("*"))


def test_load_docker_save_makes_layers_by_chain_id(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("app:1", layer_tar({"etc/app": b"1", "etc/os": None}), layer_tar({"etc/more": b"2"}))
    result = load(store, docker_save(tmp_path / "a.tar", [img]))
    ids = _ids(img)
    assert [r.id for r in result.images] == [img.id]
    assert result.layers_loaded == 3 and result.layers_reused == 0
    assert [store.layer(i).parent for i in ids] == [None, ids[0], ids[1]]
    assert store.files[ids[1]] == {"etc/app": b"1", "etc/.wh.os": b""}
    assert resolve_image_top(store, "app:1") == ids[-1]  # type: ignore[arg-type]
    assert resolve_image(store, img.id.split(":")[1][:12]).id == img.id  # type: ignore[arg-type]
    assert [r.names for r in images(store)] == [["app:1"]]  # type: ignore[arg-type]


def test_second_load_reads_no_layer(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("app:1", layer_tar({"a": b"1"}))
    archive = docker_save(tmp_path / "a.tar", [img])
    load(store, archive)
    applied = list(store.applied)
    again = load(store, archive)
    assert store.applied == applied
    assert (again.layers_loaded, again.layers_reused, again.bytes_read) == (0, 2, 0)


def test_shared_base_is_stored_once(store: MemoryStore, tmp_path: Path) -> None:
    one = _image("one:1", layer_tar({"a": b"1"}))
    two = _image("two:1", layer_tar({"b": b"2"}))
    load(store, docker_save(tmp_path / "one.tar", [one]))
    result = load(store, docker_save(tmp_path / "two.tar", [two]))
    assert (result.layers_loaded, result.layers_reused) == (1, 1)
    assert len(store.recs) == 3
    assert _ids(one)[0] == _ids(two)[0]


def test_archive_with_a_repeated_layer(store: MemoryStore, tmp_path: Path) -> None:
    empty = layer_tar({})
    img = _image("rep:1", empty, layer_tar({"x": b"x"}), empty)  # docker save symlinks the repeat
    load(store, docker_save(tmp_path / "r.tar", [img]))
    assert len(store.recs) == 4


@pytest.mark.parametrize("compression", ["gzip", "zstd", ["gzip", "zstd", "none"]])
@pytest.mark.parametrize("as_tar", [False, True])
def test_load_oci_layout(store: MemoryStore, tmp_path: Path, compression: object, as_tar: bool) -> None:
    if "zstd" in str(compression):
        require_module("zstandard")
    img = _image("oci:1", layer_tar({"a": b"1" * 10000}), layer_tar({"b": b"2"}))
    path = tmp_path / ("oci.tar" if as_tar else "oci")
    oci_layout(path, [img], compression, as_tar=as_tar)  # type: ignore[arg-type]
    result = load(store, path)
    assert result.images[0].names == ["oci:1"]
    assert set(store.recs) == set(_ids(img))
    assert store.files[_ids(img)[1]] == {"a": b"1" * 10000}


def test_load_from_stdin_spools(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("s:1")
    data = docker_save(tmp_path / "a.tar", [img]).read_bytes()
    load(store, "-", stdin=io.BytesIO(gzip.compress(data)))
    assert set(store.recs) == set(_ids(img))
    assert list((store.root / "tmp").iterdir()) == []


def test_tag_names_an_unnamed_image(store: MemoryStore, tmp_path: Path) -> None:
    img = Image([_base()])
    load(store, docker_save(tmp_path / "a.tar", [img]), tag="mine")
    assert resolve_image(store, "mine:latest").id == img.id  # type: ignore[arg-type]


def test_loading_a_name_moves_it(store: MemoryStore, tmp_path: Path) -> None:
    old = _image("app:1", layer_tar({"v": b"1"}))
    new = _image("app:1", layer_tar({"v": b"2"}))
    load(store, docker_save(tmp_path / "old.tar", [old]))
    load(store, docker_save(tmp_path / "new.tar", [new]))
    recs = {r.id: r.names for r in images(store)}  # type: ignore[arg-type]
    assert recs == {old.id: [], new.id: ["app:1"]}


def test_a_load_never_leaves_a_layer_with_the_wrong_content(store: MemoryStore, tmp_path: Path) -> None:
    """Each layer is applied against the DiffID its config names, so a wrong tar raises
    before the layer exists: no load, whole or killed, leaves a chain ID over other
    content (which the loader used to find and replace on the next load)."""
    img = _image("app:1", layer_tar({"a": b"1"}))
    ids = _ids(img)
    wrong = layer_tar({"evil": b"x"})
    with pytest.raises(DiffIDMismatch, match=f"layer {ids[0]}: DiffID mismatch: expected "):
        store.apply_diff(ids[0], None, io.BytesIO(wrong), expected_diff_id=sha(img.layers[0]))
    assert not store.exists(ids[0])
    result = load(store, docker_save(tmp_path / "a.tar", [img]))
    assert result.layers_loaded == 2
    assert store.files[ids[0]] == {"etc/os": b"base\n", "bin/sh": b"#!sh\n" * 1000}


def test_a_wrong_layer_made_by_hand_is_an_error(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("app:1", layer_tar({"a": b"1"}))
    ids = _ids(img)
    store.apply_diff(ids[0], None, io.BytesIO(layer_tar({"evil": b"x"})))  # no DiffID asked
    with pytest.raises(ImageError, match=f"layer 1 .*: layer {ids[0]} exists in the store with DiffID"
                                         ".*not made by a load; remove it and load again"):
        load(store, docker_save(tmp_path / "a.tar", [img]))
    assert set(store.recs) == {ids[0]}, "the loader does not remove what it did not make"


def test_a_wrong_layer_in_use_is_an_error(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("app:1", layer_tar({"a": b"1"}))
    ids = _ids(img)
    store.apply_diff(ids[0], None, io.BytesIO(layer_tar({"evil": b"x"})))
    store.create_rw("ctr", ids[0])
    with pytest.raises(ImageError, match=f"layer 1 .*: layer {ids[0]} exists in the store with DiffID"):
        load(store, docker_save(tmp_path / "a.tar", [img]))
    assert set(store.recs) == {ids[0], "ctr"}


# -- verification: a bad image leaves nothing --------------------------------------------------


def test_corrupted_blob(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("c:1", layer_tar({"a": b"x" * 100_000}))
    layout = oci_layout(tmp_path / "oci", [img], "none")
    blob = blob_file(layout, sha(img.layers[1]))
    data = bytearray(blob.read_bytes())
    data[2000] ^= 0xFF  # inside file content: the tar still parses, the digest does not match
    blob.write_bytes(bytes(data))
    before = _snapshot(store)
    with pytest.raises(ImageError, match=r"layer 2 \(blobs/sha256/[0-9a-f]{64}\): blob digest mismatch"):
        load(store, layout)
    assert _snapshot(store) == before


def test_corrupted_gzip_blob(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("c:1", layer_tar({"a": bytes(range(256)) * 400}))
    layout = oci_layout(tmp_path / "oci", [img], "gzip")
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob_file(layout, index["manifests"][0]["digest"]).read_text())
    blob = blob_file(layout, manifest["layers"][1]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x55
    blob.write_bytes(bytes(data))
    before = _snapshot(store)
    with pytest.raises(ImageError, match=r"layer 2 .*(blob digest mismatch|damaged gzip)"):
        load(store, layout)
    assert _snapshot(store) == before


def test_wrong_diff_id_names_the_layer_and_removes_what_was_made(store: MemoryStore, tmp_path: Path) -> None:
    good = layer_tar({"a": b"1"})
    claimed = layer_tar({"a": b"2"})
    img = Image([_base(), good], ["w:1"], config=config_for([_base(), claimed]))
    before = _snapshot(store)
    with pytest.raises(ImageError, match=r"layer 2 \([0-9a-f]{64}/layer.tar\): DiffID mismatch: "
                                         rf"the config says {sha(claimed)}, the layer is {sha(good)}"):
        load(store, docker_save(tmp_path / "w.tar", [img]))
    assert _snapshot(store) == before  # layer 1 was made by this load: gone too


def test_failure_keeps_layers_that_were_there_before(store: MemoryStore, tmp_path: Path) -> None:
    ok = _image("ok:1", layer_tar({"a": b"1"}))
    load(store, docker_save(tmp_path / "ok.tar", [ok]))
    before = _snapshot(store)
    bad = Image([_base(), layer_tar({"b": b"1"})], ["bad:1"],
                config=config_for([_base(), layer_tar({"b": b"2"})]))
    with pytest.raises(ImageError, match="DiffID mismatch"):
        load(store, docker_save(tmp_path / "bad.tar", [bad]))
    assert _snapshot(store) == before
    assert resolve_image(store, "ok:1").id == ok.id  # type: ignore[arg-type]


def test_truncated_archive(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("t:1", layer_tar({"a": b"z" * 50_000}))
    data = docker_save(tmp_path / "a.tar", [img]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load(store, cut)
    with pytest.raises(ImageError, match="truncated"):
        load(store, "-", stdin=io.BytesIO(data[: len(data) // 2]))
    assert _snapshot(store) == (set(), [])


def test_truncated_layer_inside_a_layout(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("t:1", layer_tar({"a": b"z" * 50_000}))
    layout = oci_layout(tmp_path / "oci", [img], "gzip")
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob_file(layout, index["manifests"][0]["digest"]).read_text())
    blob = blob_file(layout, manifest["layers"][1]["digest"])
    blob.write_bytes(blob.read_bytes()[:-40])
    with pytest.raises(ImageError, match=r"layer 2 .*(the manifest says \d+|damaged gzip)"):
        load(store, layout)
    assert _snapshot(store) == (set(), [])


def test_missing_manifest(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("m:1")
    archive = docker_save(tmp_path / "a.tar", [img], omit=["manifest.json"])
    with pytest.raises(ImageError, match="no manifest.json .* or index.json"):
        load(store, archive)
    assert _snapshot(store) == (set(), [])


def test_missing_layer_file(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("m:1", layer_tar({"a": b"1"}))
    with tarfile.open(docker_save(tmp_path / "a.tar", [img])) as t:
        victim = json.loads(t.extractfile("manifest.json").read())[0]["Layers"][1]  # type: ignore[union-attr]
    archive = docker_save(tmp_path / "b.tar", [img], omit=[victim])
    with pytest.raises(ImageError, match=rf"layer 2 \({victim}\) missing"):
        load(store, archive)
    assert _snapshot(store) == (set(), [])


def test_not_an_archive(store: MemoryStore, tmp_path: Path) -> None:
    p = tmp_path / "junk"
    p.write_bytes(b"\x01" * 4096)
    with pytest.raises(ImageError):
        load(store, p)


# -- rm ------------------------------------------------------------------------------------------


def test_rm_untags_then_removes_unshared_layers(store: MemoryStore, tmp_path: Path) -> None:
    one = Image([_base(), layer_tar({"a": b"1"})], ["one:1", "one:2"])
    two = _image("two:1", layer_tar({"b": b"2"}))
    load(store, docker_save(tmp_path / "a.tar", [one, two]))
    r = remove_images(store, ["one:1"])  # type: ignore[arg-type]
    assert (r.untagged, r.deleted) == (["one:1"], [])
    r = remove_images(store, ["one:2"])  # type: ignore[arg-type]
    assert r.deleted == [one.id] and r.layers_removed == [_ids(one)[1]]
    assert set(store.recs) == set(_ids(two))  # the shared base stays for two
    remove_images(store, ["two:1"])  # type: ignore[arg-type]
    assert store.recs == {}
    assert images(store) == []  # type: ignore[arg-type]
    with pytest.raises(ImageNotFound):
        inspect(store, "two:1")  # type: ignore[arg-type]


def test_rm_refuses_an_image_a_container_uses(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("app:1", layer_tar({"a": b"1"}))
    load(store, docker_save(tmp_path / "a.tar", [img]))
    store.create_rw("ctr", resolve_image_top(store, "app:1"))  # type: ignore[arg-type]
    with pytest.raises(ImageInUse, match="in use by layer ctr"):
        remove_images(store, ["app:1"])  # type: ignore[arg-type]
    r = remove_images(store, ["app:1"], force=True)  # type: ignore[arg-type]
    assert r.deleted == [img.id] and r.layers_removed == []
    assert set(store.recs) == {*_ids(img), "ctr"}


def test_inspect(store: MemoryStore, tmp_path: Path) -> None:
    img = _image("app:1", layer_tar({"a": b"1"}))
    load(store, docker_save(tmp_path / "a.tar", [img]))
    doc = inspect(store, "app:1")  # type: ignore[arg-type]
    assert doc["Id"] == img.id and doc["RepoTags"] == ["app:1"]
    assert doc["RootFS"]["Layers"] == [sha(t) for t in img.layers]
    assert [x["id"] for x in doc["Layers"]] == _ids(img)
    assert doc["Config"] == {"Cmd": ["/bin/sh"]}
