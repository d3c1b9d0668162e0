"""Names of drivers and how to load them, lazily (a driver's module may need a kernel
feature or a package that the others do not)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from lamina.drivers.base import Driver
from lamina.errors import DriverUnavailable

#: name -> "module:Class"; the order is the order of preference for the default
DRIVERS: dict[str, str] = {
    "overlay": "lamina.drivers.overlay:OverlayDriver",
    "vfs": "lamina.drivers.vfs:VfsDriver",
    "windowsfilter": "lamina.drivers.windowsfilter:WindowsFilterDriver",
}

#: drivers a store may pick by itself when the user names none
DEFAULT_ORDER = ("overlay", "vfs")


def driver_class(name: str) -> type[Driver]:
    """The class of driver ``name``; DriverUnavailable if unknown or not importable."""
    target = DRIVERS.get(name)
    if target is None:
        raise DriverUnavailable(f"unknown driver {name!r}: choose one of {', '.join(sorted(DRIVERS))}")
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DriverUnavailable(f"driver {name!r} cannot be loaded: {e}") from e
    cls: type[Driver] = getattr(module, cls_name)
    return cls


def names(content_model: str | None = None) -> list[str]:
    """Every registered driver, in order of preference; with ``content_model`` only the
    drivers whose layers hold that kind of content (see ``Driver.content_model``)."""
    return [n for n in DRIVERS if content_model is None or driver_class(n).content_model == content_model]


def unavailable_reason(name: str, root: Path) -> str | None:
    """Why driver ``name`` cannot run for ``root`` here, or None when it can."""
    try:
        cls = driver_class(name)
    except DriverUnavailable as e:
        return str(e)
    return cls.unavailable_reason(root)


def default_driver(root: Path) -> str:
    """The embedded default: ``LAMINA_DRIVER`` if set, else the first driver that works."""
    env = os.environ.get("LAMINA_DRIVER")
    if env:
        return env
    for name in DEFAULT_ORDER:
        if unavailable_reason(name, root) is None:
            return name
    return "vfs"
