"""The store's seams as Protocols: optional driver capabilities (a driver has one if it
has the method, the store asks once, and a driver that lacks one still gets the
operation, the naive way), and the LayerStore that the disk store and the in-memory fake
of the image tests both are."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import lamina
from lamina.drivers.base import (
    Capabilities,
    MountDescriber,
    NativeApply,
    NativeChanges,
    NativeDiff,
    NativeDiffSize,
    NativeFileGetter,
    UsageMeter,
)
from lamina.drivers.overlay import OverlayDriver
from lamina.drivers.vfs import VfsDriver
from lamina.drivers.windowsfilter import WindowsFilterDriver

ALL = (NativeApply, NativeDiff, NativeChanges, NativeDiffSize, NativeFileGetter, MountDescriber, UsageMeter)


def _has(cls: type) -> set[str]:
    return {p.__name__ for p in ALL if issubclass(cls, p)}


def test_each_driver_has_what_it_implements() -> None:
    assert _has(VfsDriver) == {"NativeApply", "NativeFileGetter", "MountDescriber", "UsageMeter"}
    assert _has(OverlayDriver) == {p.__name__ for p in ALL}
    assert _has(WindowsFilterDriver) == {"NativeApply", "NativeDiff", "NativeChanges", "NativeDiffSize",
                                         "NativeFileGetter"}


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_missing_capability_is_done_the_naive_way(tmp_path: Path) -> None:
    """vfs has no native diff, changes or size: the store mounts and walks instead."""
    store = lamina.open(tmp_path / "s", driver="vfs")
    try:
        caps = Capabilities.of(store.driver)
        assert caps.diff is None and caps.changes is None and caps.diff_size is None
        assert caps.apply is store.driver
        store.apply_diff("a", None, io.BytesIO(_tar({"x": b"12"})))
        store.apply_diff("b", "a", io.BytesIO(_tar({"y": b"345"})))
        assert [str(c) for c in store.changes("b")] == ["A /y"]
        assert store.diff_size("b") == 3
        with store.diff("b", "") as d, tarfile.open(fileobj=d, mode="r|") as tf:
            assert sorted(m.name for m in tf) == ["x", "y"]
        assert store.layer("b").mount_count == 0, "the naive way gives its views back"
    finally:
        store.close()


def test_the_store_and_the_in_memory_fake_are_both_layer_stores(tmp_path: Path) -> None:
    from images_support import MemoryStore
    from lamina.layerstore import LayerStore

    store = lamina.open(tmp_path / "s", driver="vfs")
    try:
        assert isinstance(store, LayerStore)
        assert isinstance(MemoryStore(tmp_path / "mem"), LayerStore)
        assert not isinstance(object(), LayerStore)
    finally:
        store.close()


def test_the_registry_names_the_drivers_of_each_content_model() -> None:
    """The conformance suite runs every registered driver of the Linux model."""
    from lamina.drivers import registry

    assert registry.names() == list(registry.DRIVERS)
    assert registry.names("linux") == ["overlay", "vfs"]
    assert registry.names("windows") == ["windowsfilter"]
