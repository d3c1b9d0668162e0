"""Mount counting (lamina.mounts): kernel mounts and unmounts happen outside every write
transaction, a mount in flight is never taken for a leak, and a process killed between
the kernel mount and its record leaves a leak that cleanup mends."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import lamina
from conftest import REPO, require_overlay
from lamina.check import check
from lamina.fs.mount import is_mountpoint
from lamina.records import Records
from lamina.store import Store


@pytest.fixture(params=["vfs", "overlay"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "overlay":
        require_overlay()
    s = lamina.open(tmp_path / "store", driver=request.param)
    s.create("base")
    s.create_rw("ctr", "base")
    yield s
    s.cleanup(unmount_all=True)
    s.close()


def _writable_now(path: Path) -> bool:
    """Whether another connection can begin a write transaction within a second (it
    cannot while anyone holds one)."""
    other = Records(path)
    done = threading.Event()

    def write() -> None:
        with other.write():
            done.set()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    ok = done.wait(1.0)
    t.join()
    other.close()
    return ok


def _spy(store: Store, name: str, seen: list[bool]) -> None:
    """Wrap a driver method so that each call records whether the database is free."""
    inner: Callable[..., object] = getattr(store.driver, name)

    def wrapped(*args: object, **kwargs: object) -> object:
        seen.append(_writable_now(store.records.path))
        return inner(*args, **kwargs)

    setattr(store.driver, name, wrapped)


def test_mount_and_unmount_run_outside_any_write_transaction(store: Store) -> None:
    mounts: list[bool] = []
    unmounts: list[bool] = []
    _spy(store, "mount", mounts)
    _spy(store, "unmount", unmounts)
    path = store.get("ctr")
    assert store.get("ctr") == path, "a second reference reuses the view"
    assert store.put("ctr") and store.put("ctr")
    store.get("ctr")
    store.cleanup(unmount_all=True)  # the view of a released reference
    store.get("base")
    store.remove("ctr")
    store.put("base")
    assert mounts == [True, True, True], "the first get of each layer mounts, outside a transaction"
    assert len(unmounts) >= 3 and all(unmounts), unmounts


def test_a_mount_in_flight_is_not_a_leak(store: Store) -> None:
    """While one get has mounted and not yet recorded, another process's cleanup runs."""
    other = lamina.open(store.root)
    seen: list[list[str]] = []
    inner = store.driver.mount

    def mount_then_cleanup(*args: object, **kwargs: object) -> Path:
        path = inner(*args, **kwargs)
        seen.append(other.cleanup())
        return path

    store.driver.mount = mount_then_cleanup  # type: ignore[method-assign]
    try:
        path = store.get("ctr")
        assert seen == [[]], "cleanup must neither unmount the view nor call it leaked"
        assert store.layer("ctr").mount_count == 1
        if store.driver.name == "overlay":
            assert is_mountpoint(path)
        assert other.cleanup() == [], "once recorded the view is no leak"
    finally:
        store.put("ctr")
        other.close()


CRASH_AFTER_MOUNT = r"""
import os, sys
import lamina
store = lamina.open(sys.argv[1])
inner = store.driver.mount
def mount_and_die(*args, **kwargs):
    inner(*args, **kwargs)
    os._exit(7)  # killed between the kernel mount and its record
store.driver.mount = mount_and_die
store.get(sys.argv[2])
"""


def test_a_process_killed_between_mount_and_record_leaves_a_leak_cleanup_mends(
        store: Store) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", CRASH_AFTER_MOUNT, str(store.root), "ctr"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 7, done.stderr
    assert store.layer("ctr").mount_count == 0, "no reference without its mount"
    mended = store.cleanup()
    if store.driver.name == "overlay":
        merged = store.driver.layer_dir("ctr") / "merged"
        assert mended == [f"unmounted leaked mount {merged}"]
        assert not is_mountpoint(merged)
    else:
        assert mended == []  # a vfs view is the layer's own directory: nothing to leak
    assert check(store)[0] == []
    with store.mounted("ctr") as view:
        assert view.is_dir()


def test_try_get_and_try_put_never_wait_and_never_mount(store: Store) -> None:
    """The plugin counts references of a mounted view on its event loop: try_get and
    try_put do what get and put would, or say None where those would mount, unmount or
    wait for a lock."""
    from lamina.errors import LayerNotFound

    assert store.try_get("ctr") is None, "not mounted: the first get mounts, elsewhere"
    with pytest.raises(LayerNotFound):
        store.try_get("nope")
    path = store.get("ctr")
    assert store.try_get("ctr") == path
    assert store.layer("ctr").mount_count == 2
    assert store.try_put("ctr") is True
    assert store.try_put("ctr") is None, "the last reference: its put unmounts, elsewhere"
    assert store.layer("ctr").mount_count == 1

    held, release = threading.Event(), threading.Event()

    def hold(block: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            with block():
                held.set()
                release.wait(30)

        t = threading.Thread(target=run)
        t.start()
        assert held.wait(30)
        return t

    for block in (lambda: store.mounts.settled("ctr"), lambda: store.records.write()):
        held.clear()
        release.clear()
        t = hold(block)
        try:
            assert store.try_get("ctr") is None and store.try_put("ctr") is None
        finally:
            release.set()
            t.join()
    assert store.layer("ctr").mount_count == 1
    assert store.put("ctr")
    assert store.try_put("ctr") is False, "nothing held"
