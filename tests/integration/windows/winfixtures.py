"""Helpers shared by the windowsfilter tests. Each test module defines its ``wf``
fixture as ``yield from driver_at(tmp_path)``, so no second conftest.py is needed."""

from __future__ import annotations

import io
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

from conftest import require_loop, require_overlay
from lamina.archive.tar.split import reassemble
from lamina.drivers.base import CreateOptions, DriverContext
from lamina.drivers.windowsfilter import WindowsFilterDriver
from lamina.fs.mount import mounts_under, umount

#: every sandbox in the tests is this small unless a test asks for more
SANDBOX = "64M"


def driver_at(tmp_path: Path) -> Iterator[WindowsFilterDriver]:
    """A windowsfilter driver on a fresh store root (root, overlayfs and loop devices);
    every mount under ``tmp_path`` is released afterwards."""
    require_overlay()
    require_loop()
    driver = WindowsFilterDriver(DriverContext(root=tmp_path / "store", options={"size": SANDBOX}))
    try:
        yield driver
    finally:
        for point in mounts_under(tmp_path):
            umount(point)


#: the tar-split of each layer imported here, per driver: what the store keeps for it
_TARSPLITS: weakref.WeakKeyDictionary[WindowsFilterDriver, dict[str, bytes]] = weakref.WeakKeyDictionary()


def import_layer(driver: WindowsFilterDriver, layer_id: str, parent: str | None, data: bytes) -> int:
    """What the store does for a pull: create an empty read-only layer, apply the tar,
    keep its tar-split."""
    driver.create(layer_id, parent, rw=False, opts=CreateOptions())
    record = io.BytesIO()
    size = driver.apply_diff(layer_id, parent, [], io.BytesIO(data), tarsplit=record)
    _TARSPLITS.setdefault(driver, {})[layer_id] = record.getvalue()
    return size


def export(driver: WindowsFilterDriver, layer_id: str) -> bytes:
    """What the store's diff gives: an imported layer rebuilt from its tar-split, any
    other written by the driver. A folder whose ``layerID`` names another layer is that
    layer (the seed's indirection), tar-split included."""
    record = _TARSPLITS.get(driver, {}).get(driver.resolve_id(layer_id))
    if record is None:
        return b"".join(driver.diff(layer_id, None))
    with driver.diff_getter(layer_id) as getter:
        return b"".join(reassemble(io.BytesIO(record), getter))


def sandbox(driver: WindowsFilterDriver, layer_id: str, parent: str, **storage_opt: str) -> Path:
    """Create a read-write layer over ``parent`` and mount it; returns the view."""
    driver.create(layer_id, parent, rw=True, opts=CreateOptions(storage_opt=dict(storage_opt)))
    return driver.mount(layer_id, [], rw=True)


def wipe(path: Path) -> None:
    for point in mounts_under(path):
        umount(point)
    shutil.rmtree(path, ignore_errors=True)
