"""Fixtures of the conformance suite: one ``store`` per test, for every driver.

Why one parametrized fixture: the contract is the same for every driver (containerd's
shared snapshotter suite, moby's graphtest), so each test is written once against the
store and runs once per driver. A new driver joins by adding its name to ``DRIVERS``.

windowsfilter is left out on purpose: its layers hold ``Files/``, ``Hives/`` and
``UtilityVM/`` and its tars carry Windows PAX records, so graphtest's trees (modes,
setuid, lchown) do not describe its content model; it has a suite of its own.

A driver that cannot run here is skipped with its own reason (``unavailable_reason``),
and a driver whose module does not exist yet is skipped too; under
``LAMINA_TEST_STRICT=1`` both become failures, so CI cannot pass by skipping overlay.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
from conftest import skip_or_fail
from lamina.drivers.base import Driver

#: every driver that shares the Linux content model (see the module docstring)
DRIVERS = ["vfs", "overlay"]


def driver_class(name: str) -> type[Driver]:
    """The Driver subclass called ``name``, or a skip (a fail when strict) if absent.

    Looks the class up in ``lamina.drivers.<name>`` by its ``name`` attribute rather than
    by a guessed class name, so the test does not depend on how the class is spelled.
    """
    try:
        module = importlib.import_module(f"lamina.drivers.{name}")
    except ModuleNotFoundError as e:
        if e.name not in (f"lamina.drivers.{name}",):
            raise  # the module exists but imports something missing: a real bug
        skip_or_fail(f"driver {name!r} is not written yet (no lamina.drivers.{name})")
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Driver) and getattr(value, "name", None) == name:
            return value
    skip_or_fail(f"lamina.drivers.{name} defines no Driver subclass named {name!r}")
    raise AssertionError("unreachable")


def require_driver(name: str, root: Path) -> None:
    """Skip (fail when strict) unless driver ``name`` can run for a store at ``root``."""
    reason = driver_class(name).unavailable_reason(root)
    if reason:
        skip_or_fail(f"driver {name!r} unavailable here: {reason}")


@pytest.fixture(params=DRIVERS)
def driver_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    """Where the store lives: under pytest's tmp_path, on a real disk (ext4 here).

    Not tmpfs: overlayfs refuses some upper filesystems and quotas need a real one.
    """
    return tmp_path / "store"


@pytest.fixture
def store(driver_name: str, store_root: Path) -> Iterator[lamina.store.Store]:
    """A fresh store with the parametrized driver; mounts are released afterwards."""
    require_driver(driver_name, store_root)
    s = lamina.open(root=store_root, driver=driver_name)
    try:
        yield s
    finally:
        release_everything(s)


def release_everything(s: lamina.store.Store) -> None:
    """Undo every mount the test left, so pytest can delete tmp_path."""
    from lamina.fs.mount import mounts_under, umount

    try:
        s.cleanup(unmount_all=True)
    finally:
        s.close()
        for point in mounts_under(s.root):  # a safety net if cleanup itself failed
            umount(point)
