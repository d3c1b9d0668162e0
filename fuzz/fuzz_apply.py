"""Coverage-guided fuzzing of the tar reader and the apply path (atheris).

Each input is applied as a layer tar into a fresh directory with a canary beside it.
Anything but success or InvalidArchive is a finding, and so is a changed canary or a
file that appeared outside the layer root.

    python fuzz/fuzz_apply.py -max_total_time=60 fuzz/corpus    # seeds: python -m fuzz.corpus
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

with atheris.instrument_imports():
    from lamina.archive.apply import ApplyOptions, apply_tar
    from lamina.archive.tar.reader import *  # noqa: F403 - instrument the reader too
    from lamina.errors import InvalidArchive

WORK = Path(tempfile.mkdtemp(prefix="lamina-fuzz-"))
CANARY = WORK / "canary.txt"
CANARY.write_text("untouched\n")


def one_input(data: bytes) -> None:
    root = WORK / "layer"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    try:
        apply_tar(root, io.BytesIO(data), ApplyOptions(privileged=False))
    except InvalidArchive:
        pass
    if CANARY.read_text() != "untouched\n":
        raise AssertionError("canary beside the layer changed")
    extra = set(os.listdir(WORK)) - {"layer", "canary.txt"}
    if extra:
        raise AssertionError(f"apply wrote outside the layer: {sorted(extra)}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
