"""Applying runs of plain regular files through the C speedups (``native.ext``).

Why: a layer is mostly regular files listed directory by directory, and per file the
Python apply path spends several times what the system calls cost. The extension takes
the files that follow in the directory the Python path last worked in -- plain ustar
headers, clean names, nothing to replace, no PAX, no whiteouts -- straight from the
reader's buffer, records their tar-split lines, and stops at the first entry it does
not take, which the Python path then reads and applies as it always does.

What it gets from the Python side makes it as safe: the directory's fd comes from the
applier's :class:`~lamina.fs.safepath.DirCache` (resolved from the layer root with
``O_NOFOLLOW`` per component), and it only ever creates single-component names beneath
it with ``O_EXCL | O_NOFOLLOW``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the applier imports this module
    from lamina.archive.apply import _Applier


class FastFiles:
    """The C fast path of one apply."""

    def __init__(self, applier: _Applier, ext: ModuleType) -> None:
        self._a = applier
        self._batch = ext.apply_batch
        self._unpacked = None if applier.overlay else applier.unpacked

    def run(self, parts: Sequence[str]) -> int:
        """Apply the plain files that come next and lie in directory ``parts`` (cleaned,
        [] for the root); return the sum of their sizes."""
        a = self._a
        reader = a.reader
        fd = a.dirs.get(parts, create=False) if parts else a.root_fd
        prefix = os.fsencode("/".join(parts) + "/") if parts else b""
        dir_gid = a.setgid.get(fd, a.egid)
        split = a.split
        if split is not None:
            with_content, content_dirs, position = split.native_state()
        else:
            with_content = content_dirs = None
            position = 0
        total = 0
        filled_for = -1
        while True:
            state = reader.between_entries()
            if state is None:
                return total
            buf, pos, end, pad = state
            need, pos, pad, count, size, lines, position, last, shadowed = self._batch(
                buf, pos, end, pad, fd, prefix, dir_gid, a.privileged, a.euid, a.umask,
                split is not None, with_content, content_dirs, self._unpacked, position)
            if count:
                reader.consumed(pos, pad, last)
                total += size
                if split is not None and lines is not None:
                    split.native_lines(lines, position, shadowed)
                filled_for = -1
            # the next entry is one it would take, were more of the stream buffered
            if not need or need == filled_for or not reader.buffer_at_least(need):
                return total
            filled_for = need
