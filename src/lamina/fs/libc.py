"""Where the C library is, for the modules that call it through ctypes.

Why one place: ``ctypes.util.find_library`` runs ``ldconfig -p`` (a process) on every
call, and each module that loaded libc at import asked it again; the CLI paid
milliseconds for each before doing any work. glibc's soname is tried first; the search
is the fallback, done once.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc_name() -> str:
    """A name ``ctypes.CDLL`` loads the C library by."""
    try:
        ctypes.CDLL("libc.so.6")
        return "libc.so.6"
    except OSError:
        from ctypes import util  # it imports subprocess and tempfile: only when needed

        return util.find_library("c") or "libc.so.6"
