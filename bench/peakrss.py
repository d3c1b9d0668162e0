"""The peak memory of a command and every process it starts, summed.

Why a sum: ``lamina image load`` unpacks layers in worker processes beside itself, and
``ru_maxrss`` of the children tells only the largest single process. What the machine
must hold is the sum of all of them at the worst moment, so this samples the resident
set (VmRSS) of the whole process tree every ``interval`` seconds from /proc and keeps
the largest sum; ``ru_maxrss`` is reported beside it (a sample can miss a short peak,
ru_maxrss cannot, but it sees one process at a time).
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    """What one run of a command took."""

    returncode: int
    stderr: str
    wall: float
    cpu: float
    #: the largest sum of VmRSS over the process tree seen, bytes
    tree: int
    #: the largest resident set of any one process (ru_maxrss of the children), bytes
    single: int


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(pid: int, *, itself: bool = True) -> int:
    """The resident bytes of ``pid`` (unless not ``itself``) and all its descendants now."""
    total, todo = 0, [pid] if itself else _children(pid)
    while todo:
        p = todo.pop()
        total += _rss(p)
        todo += _children(p)
    return total


#: runs the command as its only child and reports that child tree's ru_maxrss (KiB) on
#: stdout: this process's own RUSAGE_CHILDREN would count every earlier child (dockerd)
_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)
sys.exit(code)
"""


def run(cmd: Sequence[str], env: Mapping[str, str] | None = None, interval: float = 0.02) -> Peak:
    """Run ``cmd`` to its end, sampling its process tree's memory."""
    import sys

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *cmd], env=dict(env) if env is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    err = b""
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid, itself=False))
        try:
            err += proc.stderr.read() or b""
        except BlockingIOError:
            pass
        time.sleep(interval)
    wall = time.perf_counter() - t0
    os.set_blocking(proc.stderr.fileno(), True)
    err += proc.stderr.read() or b""
    proc.stderr.close()
    assert proc.stdout is not None
    report = proc.stdout.read().split()
    proc.stdout.close()
    single = int(report[-1]) * 1024 if report else 0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # wrapper's too: small
    return Peak(proc.returncode, err.decode(errors="replace"), wall, cpu, peak, single)
