"""Where a Windows file's metadata lives on Linux: xattrs on the file itself.

Why xattrs: overlayfs copies a file's xattrs when it copies the file up into a
sandbox, so a Windows file edited from Linux keeps its security descriptor, attributes
and creation time, and a file created from Linux has none (and gets defaults on
export). A side table keyed by path would go stale on every rename and copy-up.

Why ``trusted.``: ``user.`` xattrs are refused on symlinks, and Windows symlinks and
junctions carry attributes and descriptors too. ``trusted.`` needs root, which this
driver needs anyway (overlay mounts, whiteout devices, loop-mounted sandboxes), and
overlayfs copies ``trusted.*`` names other than its own ``trusted.overlay.*``.

One xattr per file, ``trusted.lamina.win``, holding the records in PAX record encoding
(``"%d key=value\n"``, any bytes allowed in a value): every ``MSWINDOWS.*`` /
``LIBARCHIVE.*`` record exactly as the tar gave it; ``atime`` and ``ctime`` as PAX time
strings (Linux cannot set a ctime, and reading a file moves its atime); ``linkpath``, a
symlink's target as Windows wrote it, since the link on disk points where Linux can
follow it. One xattr and not one per record because each ``setxattr`` is a filesystem
transaction: five of them per file made an import five times slower.
"""

from __future__ import annotations

import os
from pathlib import Path

from lamina.archive.tar.pax import encode_text_records, parse_text_records

XATTR_NAME = "trusted.lamina.win"
ATIME = "atime"
CTIME = "ctime"
LINKPATH = "linkpath"
#: where the import child leaves an imported tar's tar-split (Docker's format, gzipped)
#: for the driver to hand to the store, which keeps it
TAR_RECORD = "tar-split.json.gz"


def write_meta(path: Path | str, records: dict[str, str]) -> None:
    """Store ``records`` on ``path`` (never following a symlink); nothing if empty."""
    if records:
        os.setxattr(path, XATTR_NAME, encode_text_records(records), follow_symlinks=False)


def read_meta(path: Path | str) -> dict[str, str]:
    """The records stored on ``path``; empty for a file written from Linux."""
    try:
        raw = os.getxattr(path, XATTR_NAME, follow_symlinks=False)
    except OSError:
        return {}
    return parse_text_records(raw, str(path))
