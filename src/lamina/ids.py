"""Layer IDs and size strings: parsed and checked before anything touches the disk.

A layer ID becomes a directory name, a lock-file name and a record key, so the rule is
strict: 1-128 of ``[A-Za-z0-9_.-]``, not starting with ``.`` or ``-``. That excludes
``..``, ``/``, NUL and anything a shell or a path join could misread.
"""

from __future__ import annotations

import re

from lamina.errors import InvalidLayerID, InvalidOption

_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_id(layer_id: object, what: str = "layer ID") -> str:
    """Return ``layer_id`` if it is a valid ID, else raise :class:`InvalidLayerID`."""
    if not isinstance(layer_id, str) or not _ID_RE.fullmatch(layer_id):
        raise InvalidLayerID(
            f"invalid {what} {layer_id!r}: use 1-128 letters, digits, '_', '.', '-', "
            "not starting with '.' or '-'"
        )
    return layer_id


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpP]?)(i?)[bB]?\s*$")
_UNIT = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str | int) -> int:
    """Parse a size as Docker's ``units.RAMInBytes`` does: binary units, "20G" = 20 GiB.

    Accepts ``512``, ``50M``, ``50MB``, ``50MiB``, ``1.5g``; suffixes are case-blind and
    always powers of 1024, exactly as dockerd's ``--storage-opt size=`` reads them.
    """
    if isinstance(text, int):
        if text < 0:
            raise InvalidOption(f"invalid size {text}: negative")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidOption(f"invalid size {text!r}: expected a number with an optional unit like 20G or 512MiB")
    number, unit, _ = m.groups()
    value = float(number) * (1024 ** _UNIT[unit.lower()])
    return int(value)
