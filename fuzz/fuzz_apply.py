"""Coverage-guided fuzzing of the tar reader and the apply path (atheris).

Each input is applied as a layer tar into a fresh directory with a canary beside it.
Anything but success or InvalidArchive is a finding, and so is a changed canary or a
file that appeared outside the layer root. Where the C speedups are built, each input
is applied twice, by the pure-Python path (the one instrumented) and with the speedups,
and any difference between the two -- the error, the tar-split, the tree -- is a
finding too.

    python fuzz/fuzz_apply.py -max_total_time=60 fuzz/corpus    # seeds: python -m fuzz.corpus
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

with atheris.instrument_imports():
    from lamina.archive import native
    from lamina.archive.apply import ApplyOptions, apply_tar
    from lamina.archive.tar.reader import *  # noqa: F403 - instrument the reader too
    from lamina.errors import InvalidArchive

WORK = Path(tempfile.mkdtemp(prefix="lamina-fuzz-"))
CANARY = WORK / "canary.txt"
CANARY.write_text("untouched\n")


SPEEDUPS = native.ext


def _apply(data: bytes, name: str, speedups: bool) -> tuple[object, ...]:
    """Apply ``data`` into WORK/name; the outcome as something comparable."""
    root = WORK / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    native.ext = SPEEDUPS if speedups else None
    record = io.BytesIO()
    try:
        size: object = apply_tar(root, io.BytesIO(data), ApplyOptions(privileged=False, tarsplit=record))
        error = None
    except InvalidArchive as e:
        size, error = None, str(e)
    return size, error, record.getvalue() if error is None else None, _tree(root)


def _tree(root: Path) -> list[tuple[object, ...]]:
    """What apply left. Directory times, and the time of a file an error cut short, are
    the clock's, not the tar's: left out."""
    out: list[tuple[object, ...]] = []
    now = time.time_ns()
    # through directory fds (fwalk): a tar's paths may pass PATH_MAX
    for dirpath, dirnames, filenames, dfd in os.fwalk(root):
        for n in sorted(dirnames + filenames):
            st = os.lstat(n, dir_fd=dfd)
            kind = stat.S_IFMT(st.st_mode)
            clock = kind == stat.S_IFDIR or abs(st.st_mtime_ns - now) < 3600 * 10**9
            content = None
            if kind == stat.S_IFREG:
                fd = os.open(n, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
                with open(fd, "rb") as f:
                    content = f.read()
            out.append((os.path.relpath(os.path.join(dirpath, n), root), st.st_mode, st.st_size,
                        None if clock else st.st_mtime_ns,
                        os.readlink(n, dir_fd=dfd) if kind == stat.S_IFLNK else None, content))
    return sorted(out, key=lambda e: str(e[0]))


def one_input(data: bytes) -> None:
    python = _apply(data, "layer", speedups=False)
    if SPEEDUPS is not None and _apply(data, "layer-c", speedups=True) != python:
        raise AssertionError("the C speedups and the Python path disagree on this input")
    if CANARY.read_text() != "untouched\n":
        raise AssertionError("canary beside the layer changed")
    extra = set(os.listdir(WORK)) - {"layer", "layer-c", "canary.txt"}
    if extra:
        raise AssertionError(f"apply wrote outside the layer: {sorted(extra)}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
