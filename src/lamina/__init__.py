"""lamina: a container layer store with Docker's graph-driver contract.

    import lamina
    store = lamina.open("/tmp/layers", driver="vfs")
    with open("layer.tar", "rb") as f:
        store.apply_diff("base", None, f)
    with store.mounted("base") as path:
        ...

``open`` and ``Store`` are loaded on first use, so that importing a small part of the
package (``lamina.errors``, the archive engine) does not import every driver.
"""

from __future__ import annotations

from typing import Any

from lamina.errors import LaminaError

__all__ = ["LaminaError", "Store", "open"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("open", "Store"):
        from lamina import store

        return getattr(store, name)
    raise AttributeError(f"module 'lamina' has no attribute {name!r}")
