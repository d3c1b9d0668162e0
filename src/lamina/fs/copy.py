"""Copying a layer tree, sharing blocks where the filesystem can (reflinks).

Why ``cp -a --reflink=auto`` and not a Python walk: the copy must keep owners, modes,
times, xattrs, hardlinks, device nodes and sparse holes, and clone extents on btrfs/xfs.
GNU cp does all of that in C; a Python walk pays per-file interpreter cost and would have
to re-implement each of those rules.

Why ``setpriv --pdeathsig KILL``: a ``cp`` whose lamina was killed would otherwise go on
writing into the half-made layer while ``cleanup`` tries to remove it.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path


@functools.cache
def _die_with_parent() -> list[str]:
    """A prefix that makes the child die when lamina does (util-linux setpriv)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    probe = subprocess.run([setpriv, "--pdeathsig", "KILL", "--", "true"], capture_output=True)
    return [setpriv, "--pdeathsig", "KILL", "--"] if probe.returncode == 0 else []


def copy_tree(src: Path, dst: Path) -> None:
    """Copy directory ``src`` to the new path ``dst`` (which must not exist)."""
    proc = subprocess.run(
        [*_die_with_parent(), "cp", "-a", "--reflink=auto", "--", str(src), str(dst)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(f"copying {src} to {dst} failed: {msg[0] if msg else proc.returncode}")
