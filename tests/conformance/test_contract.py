"""The store's contract beyond graphtest (design.md §2, issue 2), for every driver.

Refusals (children, mounts), typed errors that name the culprit and leave nothing on
disk, whiteouts and opaque directories over a parent, tar-split byte identity, diff and
apply round trips, crash cleanup, and the driver recorded in the store.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

import lamina
from conftest import require_root
from lamina.errors import (
    DriverMismatch,
    InvalidLayerID,
    LayerBusy,
    LayerExists,
    LayerHasChildren,
    LayerNotFound,
    ParentNotFound,
)

from . import tarbuild as tb
from .conftest import DRIVERS, release_everything, require_driver
from .graphtest_helpers import add_file, check_file, random_content, read_dir, write_file
from .trees import snapshot


def read_diff(store, layer: str, parent: str | None = None) -> bytes:
    with contextlib.closing(store.diff(layer, parent)) as stream:
        return stream.read()


def view(store, layer: str) -> dict[str, tuple]:
    with store.mounted(layer) as root:
        return snapshot(Path(root))


# -- refusals -----------------------------------------------------------------------


def test_remove_layer_with_children_fails(store) -> None:
    store.create("base-layer")
    add_file(store, "base-layer", "kept", b"still here")
    store.create("child-layer", "base-layer")
    with pytest.raises(LayerHasChildren) as excinfo:
        store.remove("base-layer")
    assert "base-layer" in str(excinfo.value)
    assert store.exists("base-layer")
    check_file(store, "child-layer", "kept", b"still here")
    assert store.children("base-layer") == ["child-layer"]
    store.remove("child-layer")
    store.remove("base-layer")
    assert not store.exists("base-layer")


def test_remove_mounted_layer_fails(store) -> None:
    store.create("busy-base")
    store.create_rw("busy", "busy-base")
    path = Path(store.get("busy"))
    try:
        write_file(path / "inside", b"data")
        with pytest.raises(LayerBusy) as excinfo:
            store.remove("busy")
        assert "busy" in str(excinfo.value)
        assert store.exists("busy")
        assert (path / "inside").read_bytes() == b"data", "a refused remove must not touch the view"
    finally:
        store.put("busy")
    store.remove("busy")
    assert not store.exists("busy")
    assert store.children("busy-base") == []


def test_get_twice_returns_same_path_and_counts(store) -> None:
    store.create("counted-base")
    store.create_rw("counted", "counted-base")
    first = Path(store.get("counted"))
    second = Path(store.get("counted"))
    try:
        assert first == second
        assert store.layer("counted").mount_count == 2
    finally:
        store.put("counted")
    assert store.layer("counted").mount_count == 1
    assert first.is_dir()
    store.put("counted")
    assert store.layer("counted").mount_count == 0


def test_mounted_context_pairs_get_and_put(store) -> None:
    store.create("ctx")
    with store.mounted("ctx") as path:
        assert Path(path).is_dir()
        assert store.layer("ctx").mount_count == 1
    assert store.layer("ctx").mount_count == 0


def test_chain_and_children(store) -> None:
    store.create("c0")
    store.create("c1", "c0")
    store.create_rw("c2", "c1")
    store.create("c1b", "c0")
    assert store.chain("c2") == ["c2", "c1", "c0"]
    assert sorted(store.children("c0")) == ["c1", "c1b"]
    assert store.layer("c2").parent == "c1" and store.layer("c2").rw
    assert store.layer("c0").parent is None and not store.layer("c0").rw


# -- typed errors -------------------------------------------------------------------

BAD_IDS = ["", ".", "..", "../escape", "a/b", "/abs", ".hidden", "-dash", "x" * 129,
           "nul\0byte", "sp ace", "new\nline"]


def _names_on_disk(top: Path, *, lock_files: bool = True) -> set[str]:
    """Every path under ``top``, except the database files whose content (not name) the
    store may touch while refusing; ``lock_files=False`` also leaves out the store's
    per-layer lock files, which a store may keep for IDs that are valid but unused."""
    return {
        str(p.relative_to(top)) for p in top.rglob("*")
        if not p.name.startswith("meta.db")
        and (lock_files or not str(p.relative_to(top)).startswith("locks/"))
    }


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=repr)
def test_invalid_id_is_refused_before_the_disk(store, bad_id: str) -> None:
    store.create("valid-parent")
    outside = store.root.parent
    before = _names_on_disk(outside)
    with pytest.raises(InvalidLayerID):
        store.create(bad_id)
    with pytest.raises(InvalidLayerID):
        store.create_rw(bad_id, "valid-parent")
    with pytest.raises(InvalidLayerID):
        store.apply_diff(bad_id, None, io.BytesIO(tb.build([tb.reg("f", b"x")])))
    assert _names_on_disk(outside) == before
    for op in (store.get, store.remove, store.layer, store.metadata):
        with pytest.raises((InvalidLayerID, LayerNotFound)):
            op(bad_id)
    assert _names_on_disk(outside) == before
    assert [r.id for r in store.layers()] == ["valid-parent"]


@pytest.mark.parametrize("op", ["create", "create_rw", "apply_diff"])
def test_missing_parent_is_parent_not_found(store, op: str) -> None:
    layers_dir = store.root / "layers"
    before = _names_on_disk(store.root, lock_files=False)
    with pytest.raises(ParentNotFound) as excinfo:
        if op == "apply_diff":
            store.apply_diff("orphan", "no-such-parent", io.BytesIO(tb.build([tb.reg("f", b"x")])))
        else:
            getattr(store, op)("orphan", "no-such-parent")
    assert "no-such-parent" in str(excinfo.value)
    assert not store.exists("orphan")
    assert "orphan" not in [r.id for r in store.layers()]
    assert not (layers_dir / "orphan").exists()
    assert _names_on_disk(store.root, lock_files=False) == before
    store.create("orphan")  # the ID is still free
    assert store.exists("orphan")


def test_duplicate_id_is_layer_exists(store) -> None:
    store.create("dup")
    add_file(store, "dup", "original", b"mine")
    with pytest.raises(LayerExists) as excinfo:
        store.create("dup")
    assert "dup" in str(excinfo.value)
    with pytest.raises(LayerExists):
        store.create_rw("dup")
    check_file(store, "dup", "original", b"mine")
    assert [r.id for r in store.layers()] == ["dup"]


def _operations_on(store, missing: str) -> dict[str, Callable[[], object]]:
    return {
        "get": lambda: store.get(missing),
        "put": lambda: store.put(missing),
        "mounted": lambda: store.mounted(missing).__enter__(),
        "remove": lambda: store.remove(missing),
        "layer": lambda: store.layer(missing),
        "children": lambda: store.children(missing),
        "chain": lambda: store.chain(missing),
        "metadata": lambda: store.metadata(missing),
        "diff": lambda: store.diff(missing).close(),
        "diff-vs-empty": lambda: store.diff(missing, "").close(),
        "changes": lambda: store.changes(missing),
        "diff_size": lambda: store.diff_size(missing),
        "diff_getter": lambda: store.diff_getter(missing).close(),
        "diff-against-missing": lambda: store.diff("known", missing).close(),
        "changes-against-missing": lambda: store.changes("known", missing),
        "diff_size-against-missing": lambda: store.diff_size("known", missing),
    }


def test_unknown_layer_is_layer_not_found_everywhere(store) -> None:
    store.create("known")
    assert not store.exists("ghost")
    for name, call in _operations_on(store, "ghost").items():
        with pytest.raises(LayerNotFound) as excinfo:
            call()
        assert "ghost" in str(excinfo.value), f"{name}: {excinfo.value}"
    assert [r.id for r in store.layers()] == ["known"]
    assert store.layer("known").mount_count == 0


# -- whiteouts, opaque directories ----------------------------------------------------

PARENT_TAR = [
    tb.dir_("a"), tb.reg("a/f1", b"one"), tb.reg("a/f2", b"two"),
    tb.dir_("a/sub"), tb.reg("a/sub/g", b"g"),
    tb.dir_("b"), tb.dir_("b/deep"), tb.reg("b/deep/z", b"z"),
    tb.reg("b/x", b"x"), tb.reg("b/y", b"y"),
    tb.reg("c", b"c"), tb.reg("d", b"old d"),
    tb.dir_("gone"), tb.reg("gone/k", b"k"),
    tb.symlink("link", "a/f2"),
]

CHILD_TAR = [
    tb.dir_("a"), tb.whiteout("a/f1"),
    tb.dir_("b"), tb.reg("b/aaa", b"early"), tb.opaque("b"), tb.reg("b/new", b"new"),
    tb.whiteout("c"),
    tb.reg("d", b"new d content"),
    tb.dir_("e"), tb.reg("e/h", b"h"),
    tb.whiteout("gone"),
]


def _apply_parent_and_child(store) -> tuple[bytes, bytes]:
    parent, child = tb.build(PARENT_TAR), tb.build(CHILD_TAR)
    assert store.apply_diff("wh-parent", None, io.BytesIO(parent)) == tb.content_size(PARENT_TAR)
    assert store.apply_diff("wh-child", "wh-parent", io.BytesIO(child)) == tb.content_size(CHILD_TAR)
    return parent, child


def test_whiteouts_and_opaque_dirs_over_a_parent(store) -> None:
    _apply_parent_and_child(store)
    with store.mounted("wh-child") as root:
        root = Path(root)
        assert read_dir(root) == ["a", "b", "d", "e", "link"]
        assert read_dir(root / "a") == ["f2", "sub"]
        assert (root / "a/sub/g").read_bytes() == b"g"
        assert read_dir(root / "b") == ["aaa", "new"], "opaque dir hides the parent's b/*"
        assert (root / "b/aaa").read_bytes() == b"early", "this layer's entries before the marker stay"
        assert (root / "d").read_bytes() == b"new d content"
        assert (root / "e/h").read_bytes() == b"h"
        assert os.readlink(root / "link") == "a/f2" and (root / "link").read_bytes() == b"two"
        assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(root) for n in ds + fs)
    with store.mounted("wh-parent") as root:  # the parent is untouched
        root = Path(root)
        assert read_dir(root) == ["a", "b", "c", "d", "gone", "link"]
        assert read_dir(root / "b") == ["deep", "x", "y"]
        assert (root / "d").read_bytes() == b"old d"


def test_changes_of_whiteouts_follow_docker(store) -> None:
    _apply_parent_and_child(store)
    got = [str(c) for c in store.changes("wh-child")]
    assert got == [
        "C /a", "D /a/f1",
        "C /b", "A /b/aaa", "D /b/deep", "A /b/new", "D /b/x", "D /b/y",
        "D /c", "C /d", "A /e", "A /e/h", "D /gone",
    ]
    assert store.diff_size("wh-child") == len(b"early" + b"new" + b"new d content" + b"h")


# -- tar-split: diff of an applied layer is the input tar -----------------------------

RICH_TAR = [
    tb.dir_("etc"), tb.reg("etc/hosts", b"127.0.0.1 localhost\n"),
    tb.reg("etc/odd-size", random_content(1000, 1)),  # padding to 1024
    tb.reg("etc/empty", b""),
    tb.dir_("bin", mode=0o711), tb.reg("bin/tool", b"\x7fELF" + bytes(5000), mode=0o4755),
    tb.symlink("bin/sh", "/bin/tool"),
    tb.hardlink("bin/tool-again", "bin/tool"),
    tb.dir_("srv", uid=1000, gid=1000), tb.reg("srv/data", b"owned", uid=1000, gid=1001),
    tb.dir_("d" * 60),
    tb.reg("d" * 60 + "/" + "n" * 120, b"long name"),
    tb.reg("unicode-\u00e9\u4e2d", b"utf-8 name"),
    tb.fifo("pipe"),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
@pytest.mark.parametrize("go_trailer", [True, False], ids=["go-trailer", "python-trailer"])
def test_diff_of_applied_layer_is_byte_identical(store, fmt: int, go_trailer: bool) -> None:
    require_root()  # ownership 1000:1000 in the tar
    data = tb.build(RICH_TAR, fmt=fmt, go_trailer=go_trailer)
    store.apply_diff("exact", None, io.BytesIO(data))
    assert read_diff(store, "exact") == data
    assert read_diff(store, "exact", None) == read_diff(store, "exact")


def test_diff_of_applied_child_with_whiteouts_is_byte_identical(store) -> None:
    parent, child = _apply_parent_and_child(store)
    assert read_diff(store, "wh-parent") == parent
    assert read_diff(store, "wh-child") == child
    assert read_diff(store, "wh-child", "wh-parent") == child


# -- diff then apply elsewhere --------------------------------------------------------


def _build_by_hand(store) -> None:
    """A base and a container-like upper made by writing through the views."""
    require_root()
    store.create_rw("rt-base")
    with store.mounted("rt-base") as root:
        root = Path(root)
        os.makedirs(root / "etc/conf.d")
        write_file(root / "etc/hosts", b"hosts\n", 0o644)
        write_file(root / "etc/conf.d/a", b"a" * 3000, 0o600)
        write_file(root / "etc/conf.d/b", b"b", 0o640)
        os.makedirs(root / "var/lib/app")
        write_file(root / "var/lib/app/db", os.urandom(70_000), 0o644)
        os.mkdir(root / "tmp", 0o1777)
        os.chmod(root / "tmp", 0o1777)
        write_file(root / "suid", b"#!", 0o4755)
        os.lchown(root / "etc/conf.d/b", 33, 44)
        os.symlink("etc/hosts", root / "hosts-link")
        os.link(root / "etc/hosts", root / "hosts-hard")
        os.mkfifo(root / "fifo", 0o600)
        os.mkdir(root / "replaced")
        write_file(root / "replaced/old", b"old")
    store.create_rw("rt-upper", "rt-base")
    with store.mounted("rt-upper") as root:
        root = Path(root)
        write_file(root / "etc/hosts", b"changed hosts\n", 0o644)
        os.chmod(root / "etc/conf.d/a", 0o644)
        os.unlink(root / "etc/conf.d/b")
        shutil.rmtree(root / "var/lib/app")
        shutil.rmtree(root / "replaced")
        os.mkdir(root / "replaced")
        write_file(root / "replaced/new", b"new")
        write_file(root / "linked-a", b"two names", 0o640)
        os.link(root / "linked-a", root / "linked-b")
        write_file(root / "added", b"added", 0o700)


def test_diff_then_apply_elsewhere_gives_an_equal_view(store, driver_name: str, tmp_path: Path) -> None:
    _build_by_hand(store)
    other = lamina.open(root=tmp_path / "elsewhere", driver=driver_name)
    try:
        base_tar = read_diff(store, "rt-base")
        upper_tar = read_diff(store, "rt-upper")
        other.apply_diff("rt-base", None, io.BytesIO(base_tar))
        other.apply_diff("rt-upper", "rt-base", io.BytesIO(upper_tar))
        assert view(other, "rt-base") == view(store, "rt-base")
        assert view(other, "rt-upper") == view(store, "rt-upper")
        assert [str(c) for c in other.changes("rt-upper")] == [str(c) for c in store.changes("rt-upper")]
        assert other.diff_size("rt-upper") == store.diff_size("rt-upper")
    finally:
        release_everything(other)


def test_diff_applies_into_the_other_driver(store, driver_name: str, tmp_path: Path) -> None:
    """Layer tars are the interchange format: what one driver exports, another imports
    to the same view (an image moved between a vfs and an overlay store)."""
    other_name = next(d for d in DRIVERS if d != driver_name)
    require_driver(other_name, tmp_path / "other-driver")
    _build_by_hand(store)
    other = lamina.open(root=tmp_path / "other-driver", driver=other_name)
    try:
        other.apply_diff("rt-base", None, io.BytesIO(read_diff(store, "rt-base")))
        other.apply_diff("rt-upper", "rt-base", io.BytesIO(read_diff(store, "rt-upper")))
        assert view(other, "rt-upper") == view(store, "rt-upper")
        assert [str(c) for c in other.changes("rt-upper")] == [str(c) for c in store.changes("rt-upper")]
    finally:
        release_everything(other)


def test_status_and_metadata_are_strings(store, driver_name: str) -> None:
    store.create("described")
    status = store.status()
    assert status and all(isinstance(k, str) and isinstance(v, str) for k, v in status)
    assert driver_name in [v for _, v in status]
    meta = store.metadata("described")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


# -- the driver recorded in the store ---------------------------------------------


def test_driver_is_recorded_and_a_mismatch_refused(store, driver_name: str, monkeypatch) -> None:
    monkeypatch.delenv("LAMINA_DRIVER", raising=False)
    store.create("recorded")
    root = store.root
    recorded = json.loads((root / "lamina.json").read_text())
    assert recorded["driver"] == driver_name
    other = next(d for d in DRIVERS if d != driver_name)
    with pytest.raises(DriverMismatch) as excinfo:
        lamina.open(root=root, driver=other)
    assert driver_name in str(excinfo.value) and other in str(excinfo.value)
    assert json.loads((root / "lamina.json").read_text()) == recorded
    again = lamina.open(root=root)
    try:
        assert again.driver.name == driver_name
        assert again.exists("recorded")
    finally:
        release_everything(again)
