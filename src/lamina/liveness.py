"""Who holds a mount reference, and whether they still exist.

A reference records the boot it was taken in and the process that took it, identified by
pid *and* start time (a pid alone is reused). After a reboot every reference is stale and
every mount is gone; after a crash only the dead process's references are. References
taken with ``persistent=True`` (the CLI's ``mount``) belong to no process and survive it.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def boot_id() -> str:
    """The kernel's id for this boot; changes at every reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown-boot"


def process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot, or "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return ""
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    rest = data[data.rfind(b")") + 2 :].split()
    return rest[19].decode() if len(rest) > 19 else ""


#: (pid, start) of this process, read once per process: a process's own start time never
#: changes, and get/put ask for it on every call (a fork gets its own, keyed by pid)
_ME: tuple[int, str] | None = None


def me() -> tuple[int, str]:
    """This process's identity for a reference."""
    global _ME
    pid = os.getpid()
    if _ME is None or _ME[0] != pid:
        _ME = (pid, process_start(pid))
    return _ME


def alive(pid: int, start: str) -> bool:
    """True if the process that took a reference still runs."""
    return bool(start) and process_start(pid) == start
