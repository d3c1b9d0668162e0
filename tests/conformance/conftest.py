"""Fixtures of the conformance suite: one ``store`` per test, for every store factory.

Why one parametrized fixture: the contract is the same for every driver (containerd's
shared snapshotter suite, moby's graphtest), so each test is written once against the
store and runs once per factory (:mod:`.suite`): one per driver of the Linux content
model in the driver registry. A new driver joins by being registered; windowsfilter,
of the Windows model, has a suite of its own.

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

from .suite import StoreFactory, conformance_params, registry_factories

#: every registered driver that shares the Linux content model (see .suite)
FACTORIES = registry_factories()
DRIVERS = [f.driver for f in FACTORIES]


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


@pytest.fixture(params=conformance_params(FACTORIES))
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    return request.param


@pytest.fixture
def driver_name(store_factory: StoreFactory) -> str:
    return store_factory.driver


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    """Where the store lives: under pytest's tmp_path, on a real disk (ext4 here).

    Not tmpfs: overlayfs refuses some upper filesystems and quotas need a real one.
    """
    return tmp_path / "store"


@pytest.fixture
def store(store_factory: StoreFactory, store_root: Path) -> Iterator[lamina.store.Store]:
    """A fresh store from the parametrized factory; mounts are released afterwards."""
    reason = store_factory.unavailable_reason(store_root)
    if reason:
        skip_or_fail(f"driver {store_factory.name!r} unavailable here: {reason}")
    s = store_factory(store_root)
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
