"""The conformance suite as a function of how to make a store, as containerd's
``testsuite.SnapshotterSuite(t, name, factory)``.

Every test of this package is written once against a ``store`` fixture; what makes that
store is a :class:`StoreFactory`, and the suite runs once per factory
(:func:`conformance_params`). The factories come from the driver registry
(:func:`registry_factories`): a new driver joins the suite by being registered in
:mod:`lamina.drivers.registry`, with no list here to edit. Another way of making a
store (a face in front of one, a store over another root layout) joins by passing its
own factory to :func:`conformance_params` in a conftest of its own.

Only drivers of the Linux content model are the suite's: windowsfilter's layers hold
``Files/``, ``Hives/`` and ``UtilityVM/`` and its tars carry Windows PAX records, so
graphtest's trees (modes, setuid, lchown) do not describe its content; it has a suite
of its own (``tests/integration/windows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import lamina
from lamina.drivers import registry
from lamina.store import Store


@dataclass(frozen=True)
class StoreFactory:
    """Makes a fresh store of one driver at a root, and says why it cannot here."""

    driver: str

    @property
    def name(self) -> str:
        return self.driver

    def unavailable_reason(self, root: Path) -> str | None:
        return registry.unavailable_reason(self.driver, root)

    def __call__(self, root: Path) -> Store:
        return lamina.open(root=root, driver=self.driver)


def registry_factories(content_model: str = "linux") -> list[StoreFactory]:
    """One factory per registered driver of ``content_model``, in order of preference."""
    return [StoreFactory(name) for name in registry.names(content_model)]


def conformance_params(factories: list[StoreFactory]) -> list[object]:
    """The parameters of the ``store`` fixture: one per factory, named after it."""
    return [pytest.param(f, id=f.name) for f in factories]
