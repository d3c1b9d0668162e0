"""Running lamina as an unprivileged user (uid 65534) from a test that runs as root.

Why this is not just ``setpriv python -m lamina``: the test's interpreter and checkout
may sit where that user cannot go. Here the venv's python points into root's pyenv
under ``/root`` (mode 700), and CI clones the project wherever it likes. So a test
gets, through :func:`nobody_python`:

* an interpreter uid 65534 can run: the test's own if it can, else Debian's
  ``/usr/bin/python3`` when it is the same ``major.minor`` (the same ABI, so the venv's
  compiled wheels load in it);
* a world-readable copy, in a fresh directory under ``/tmp``, of ``src/`` and of the
  installed distributions lamina needs at run time (its ``dependencies`` and theirs,
  found through ``importlib.metadata``, not a second list): the same files on every
  machine, wherever the checkout and the venv live, and whatever their modes.

Without either, the test skips (fails under ``LAMINA_TEST_STRICT=1``) saying why.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO, require_tool, skip_or_fail

NOBODY = 65534
#: the prefix that runs a command as uid/gid 65534 with no supplementary groups
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class NobodyPython:
    """An interpreter and a tree uid 65534 can use, and the environment to run it with."""

    python: str
    #: a directory uid 65534 can read, write and enter; the copies live in it
    work: Path
    #: the PYTHONPATH: the copied ``src`` and distributions
    path: list[Path]

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PYTHONPATH": os.pathsep.join(str(p) for p in self.path),
               "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work),
               "TMPDIR": str(self.work / "tmp"), "LANG": "C.UTF-8"}
        return env | extra

    def run(self, *args: str, prefix: tuple[str, ...] = AS_NOBODY, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``python ARGS`` as uid 65534 (under ``prefix``), from :attr:`work`."""
        return subprocess.run([*prefix, self.python, *args], capture_output=True, text=True,
                              env=env or self.env(), cwd=self.work, timeout=timeout)


def runtime_distributions(name: str = "lamina") -> list[metadata.Distribution]:
    """The installed distributions ``name`` needs at run time, itself excluded."""
    from packaging.requirements import Requirement

    seen: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in metadata.distribution(name).requires or []]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # a test extra, or another platform's
        key = req.name.lower().replace("_", "-")
        if key in seen:
            continue
        dist = metadata.distribution(req.name)
        seen[key] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return list(seen.values())


def _copy_distribution(dist: metadata.Distribution, dest: Path) -> None:
    for rel in dist.files or []:
        if rel.parts[0] == ".." or "__pycache__" in rel.parts:
            continue  # console scripts outside site-packages; byte code is remade
        src = Path(str(dist.locate_file(rel)))
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _can_run(prefix: tuple[str, ...], python: str, path: list[Path], work: Path, deps: bool) -> bool:
    modules = "lamina.store, lamina.compression, zstandard" if deps else "lamina.drivers.overlay"
    probe = subprocess.run([*prefix, python, "-c", f"import sys, {modules}; "
                            f"assert sys.version_info[:2] == {tuple(sys.version_info[:2])}"],
                           capture_output=True, cwd=work,
                           env={"PYTHONPATH": os.pathsep.join(map(str, path))})
    return probe.returncode == 0


@contextlib.contextmanager
def nobody_python(prefix: tuple[str, ...] = AS_NOBODY, *, deps: bool = True) -> Iterator[NobodyPython]:
    """A :class:`NobodyPython` for ``prefix`` (which must drop to uid 65534), removed after.

    ``deps``: copy lamina's run-time distributions too (the driver modules alone import
    none; the store, the CLI and the demo do).
    """
    if os.geteuid() != 0:
        skip_or_fail("needs root (to drop to uid 65534)")
    require_tool("setpriv")
    work = Path(tempfile.mkdtemp(prefix="lamina-nobody-"))
    try:
        os.chmod(work, 0o777)
        (work / "tmp").mkdir(mode=0o777)
        os.chmod(work / "tmp", 0o1777)
        shutil.copytree(REPO / "src" / "lamina", work / "src" / "lamina",
                        ignore=shutil.ignore_patterns("__pycache__"))
        path = [work / "src"]
        if deps:
            for dist in runtime_distributions():
                _copy_distribution(dist, work / "site")
            path.append(work / "site")
        subprocess.run(["chmod", "-R", "a+rX", str(work / "src"), *([str(work / "site")] if deps else [])],
                       check=True)
        tried = []
        for python in dict.fromkeys((sys.executable, SYSTEM_PYTHON)):
            if os.path.exists(python) and _can_run(prefix, python, path, work, deps):
                yield NobodyPython(python, work, path)
                return
            tried.append(python)
        skip_or_fail(f"no python {sys.version_info[0]}.{sys.version_info[1]} that uid {NOBODY} can run "
                     f"(tried {', '.join(tried)}; Debian package python3 of the same version)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
