"""Images through a real store: OCI layouts with gzip and zstd layers, bad archives, save.

The store keeps tar-split for every applied layer, so ``image save`` (and ``diff``) must
give back the exact layer tars that were loaded, whatever their compression was.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
from conftest import REPO, require_module, run_cli
from images_support import Image, blob_file, config_for, docker_save, layer_tar, oci_layout, sha
from lamina.errors import ImageError
from lamina.images import images, load, remove_images, resolve_image_top, save
from lamina.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = lamina.open(tmp_path / "store", driver="vfs")
    yield s
    s.close()


def _layers() -> list[bytes]:
    base = layer_tar({"etc/os-release": b"ID=test\n", "usr/bin/tool": bytes(range(256)) * 300},
                     dirs=["etc", "usr", "usr/bin"])
    mid = layer_tar({"etc/app.conf": b"a=1\n", "etc/os-release": None})
    top = layer_tar({"srv/data.bin": b"\0" * 100_000 + b"end"}, dirs=["srv"])
    return [base, mid, top]


def _nothing_new(store: Store, before: set[str]) -> None:
    assert {r.id for r in store.layers()} == before
    assert images(store) == []
    assert list((store.root / "tmp").iterdir()) == []


def _saved_layers(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        return [sha(tar.extractfile(p).read()) for p in manifest[0]["Layers"]]  # type: ignore[union-attr]


@pytest.mark.parametrize("compression", [["gzip", "zstd", "gzip"], ["zstd", "none", "zstd"]])
def test_oci_gzip_and_zstd_layers_round_trip(store: Store, tmp_path: Path, compression: list[str]) -> None:
    require_module("zstandard")
    img = Image(_layers(), ["oci/app:2"])
    layout = oci_layout(tmp_path / "layout", [img], compression)
    result = load(store, layout)
    assert result.layers_loaded == 3
    top = resolve_image_top(store, "oci/app:2")
    with store.mounted(top) as root:
        assert (root / "etc/app.conf").read_bytes() == b"a=1\n"
        assert not (root / "etc/os-release").exists()
        assert (root / "usr/bin/tool").read_bytes() == bytes(range(256)) * 300
        assert (root / "srv/data.bin").stat().st_size == 100_003
    for fmt in ("docker", "oci"):
        out = tmp_path / f"{fmt}.tar"
        save(store, ["oci/app:2"], out, fmt=fmt)
        assert _saved_layers(out) == [sha(t) for t in img.layers]
    # lamina's OCI output loads into a second store as the same image
    other = lamina.open(tmp_path / "other", driver="vfs")
    try:
        again = load(other, tmp_path / "oci.tar")
        assert again.images[0].id == img.id and again.images[0].names == ["oci/app:2"]
        with tarfile.open(tmp_path / "oci.tar") as tar:
            index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        ann = index["manifests"][0]["annotations"]
        assert ann == {"io.containerd.image.name": "docker.io/oci/app:2",
                       "org.opencontainers.image.ref.name": "2"}
    finally:
        other.close()


def test_save_to_a_pipe_matches_save_to_a_file(store: Store, tmp_path: Path) -> None:
    img = Image(_layers(), ["pipe:1"])
    load(store, docker_save(tmp_path / "in.tar", [img]))
    save(store, ["pipe:1"], tmp_path / "file.tar")
    sink = io.BytesIO()
    sink.seekable = lambda: False  # type: ignore[method-assign]
    save(store, ["pipe:1"], "-", stdout=sink)
    assert sink.getvalue() == (tmp_path / "file.tar").read_bytes()


def test_save_refuses_a_layer_that_no_longer_matches(store: Store, tmp_path: Path) -> None:
    img = Image(_layers()[:1], ["x:1"])
    load(store, docker_save(tmp_path / "in.tar", [img]))
    lid = resolve_image_top(store, "x:1")
    with store.mounted(lid) as root:  # change a file behind the store's back, same size
        tool = root / "usr/bin/tool"
        tool.write_bytes(bytes(reversed(tool.read_bytes())))
    with pytest.raises(ImageError, match=f"layer {lid}: .*(does not match|not its DiffID)"):
        save(store, ["x:1"], tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()
    assert not list(tmp_path.glob(".out.tar*"))


def test_bad_archives_leave_nothing(store: Store, tmp_path: Path) -> None:
    require_module("zstandard")
    before = {r.id for r in store.layers()}
    layers = _layers()

    # corrupted zstd blob
    layout = oci_layout(tmp_path / "corrupt", [Image(layers, ["c:1"])], "zstd")
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob_file(layout, index["manifests"][0]["digest"]).read_text())
    blob = blob_file(layout, manifest["layers"][2]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"layer 3 \(blobs/sha256/"):
        load(store, layout)
    _nothing_new(store, before)

    # wrong DiffID for the top layer
    wrong = Image(layers, ["w:1"], config=config_for(layers[:2] + [layer_tar({"other": b""})]))
    with pytest.raises(ImageError, match=r"layer 3 .*DiffID mismatch"):
        load(store, docker_save(tmp_path / "wrong.tar", [wrong]))
    _nothing_new(store, before)

    # truncated archive
    whole = docker_save(tmp_path / "whole.tar", [Image(layers, ["t:1"])]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(ImageError, match="truncated"):
        load(store, tmp_path / "cut.tar")
    _nothing_new(store, before)

    # missing manifest
    with pytest.raises(ImageError, match="no manifest.json"):
        load(store, docker_save(tmp_path / "nomanifest.tar", [Image(layers)], omit=["manifest.json"]))
    _nothing_new(store, before)


def test_rm_removes_layers_through_the_store(store: Store, tmp_path: Path) -> None:
    layers = _layers()
    a = Image(layers, ["a:1"])
    b = Image(layers[:2] + [layer_tar({"b": b"b"})], ["b:1"])
    load(store, docker_save(tmp_path / "ab.tar", [a, b]))
    assert len(store.layers()) == 4
    remove_images(store, ["a:1"])
    assert len(store.layers()) == 3
    remove_images(store, ["b:1"])
    assert store.layers() == []


def test_cli_load_ls_inspect_rm(tmp_path: Path) -> None:
    root = tmp_path / "store"
    img = Image(_layers(), ["cli/app:1"])
    archive = docker_save(tmp_path / "a.tar", [img])
    res = run_cli("--driver", "vfs", "image", "load", "-", root=root, input=archive.read_bytes())
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode() == "Loaded image: cli/app:1\n"
    assert res.stderr == b""  # no progress bar when stderr is not a terminal
    res = run_cli("image", "ls", root=root)
    lines = res.stdout.decode().splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert lines[1].split()[:3] == ["cli/app", "1", img.id.split(":")[1][:12]]
    res = run_cli("image", "inspect", "cli/app:1", root=root)
    assert json.loads(res.stdout)[0]["RootFS"]["Layers"] == [sha(t) for t in img.layers]
    res = run_cli("image", "load", str(tmp_path / "missing.tar"), root=root)
    assert res.returncode == 1
    assert res.stderr.decode().startswith("lamina: cannot read ")
    assert len(res.stderr.decode().splitlines()) == 1
    res = run_cli("create-rw", "c1", "--image", "cli/app:1", "--parent", "x", root=root)
    assert res.returncode != 0 and b"--parent or --image" in res.stderr
    res = run_cli("create-rw", "c1", "--image", "nope:1", root=root)
    assert res.returncode == 1 and res.stderr.decode() == "lamina: image nope:1 not found\n"
    res = run_cli("image", "rm", "cli/app:1", root=root)
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(run_cli("--json", "ls", root=root).stdout) == []


def test_two_loads_at_once_share_the_layers(tmp_path: Path) -> None:
    root = tmp_path / "store"
    archive = docker_save(tmp_path / "a.tar", [Image(_layers(), ["both:1"])])
    assert run_cli("--driver", "vfs", "ls", root=root).returncode == 0  # make the store
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "lamina", "--root", str(root), "--json", "image", "load", str(archive)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    loaded = sorted(json.loads(o[0])["layers_loaded"] for o in outs)
    assert loaded == [0, 3]  # the images lock makes the second find the first's layers
    assert len(json.loads(run_cli("--json", "ls", root=root).stdout)) == 3


def test_cli_progress_on_a_terminal(tmp_path: Path) -> None:
    """With stderr a terminal, load and save draw byte and layer progress there."""
    import pty

    root = tmp_path / "store"
    archive = docker_save(tmp_path / "a.tar", [Image(_layers(), ["p:1"])])
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    try:
        for args in (["image", "load", str(archive)], ["image", "save", "-o", str(tmp_path / "o.tar"), "p:1"]):
            proc = subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), "--driver", "vfs", *args],
                                  stderr=slave, stdout=subprocess.PIPE, env=env, timeout=120)
            assert proc.returncode == 0
            drawn = os.read(master, 65536).decode(errors="replace")
            assert "layer 3/3" in drawn and "KiB" in drawn
    finally:
        os.close(master)
        os.close(slave)
    assert _saved_layers(tmp_path / "o.tar") == [sha(t) for t in _layers()]
