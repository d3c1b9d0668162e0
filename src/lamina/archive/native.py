"""The optional C speedups of the archive engine, or None.

``lamina.archive._speedups`` does the plainest entries of an apply (plain ustar regular
files in the directory being filled) and of a tar-split replay (canonical lines, small
files) in C; the Python code around it does everything else, and is the specification:
the C code stops at whatever it does not fully understand and lets Python handle that
entry, so both paths behave alike byte for byte (the tests run the archive suites in
both modes and compare the outputs).

The extension is built by ``pip install`` where a C compiler is present and skipped
where not. ``LAMINA_NO_NATIVE=1`` in the environment turns it off (the pure-Python path
is then used everywhere); tests switch it with :func:`use`.
"""

from __future__ import annotations

import os
from types import ModuleType


def _load() -> ModuleType | None:
    if os.environ.get("LAMINA_NO_NATIVE", "") not in ("", "0"):
        return None
    try:
        from lamina.archive import _speedups
    except ImportError:
        return None
    return _speedups


#: the extension module when it is built and not turned off
_built: ModuleType | None = _load()
ext: ModuleType | None = _built


def available() -> bool:
    """Whether the extension was built (whatever :func:`use` says now)."""
    if _built is not None:
        return True
    try:
        from lamina.archive import _speedups  # noqa: F401
    except ImportError:
        return False
    return True


def use(enabled: bool) -> None:
    """Turn the speedups on or off for work that starts after this call (tests)."""
    global ext
    if not enabled:
        ext = None
        return
    from lamina.archive import _speedups

    ext = _speedups
