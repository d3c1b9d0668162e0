"""``store.changes`` against Docker's semantics (pkg/archive/changes.go ChangesDirs), one
scenario per row, for every driver.

The rules the rows pin down: a name only in the layer is an Add, and so is everything
under it; a name only in the parent is one Delete (not its children); a name in both is
a Modify when type, permission bits, owner, rdev, or (for non-directories) size or mtime
differ; a directory never counts as modified for its mtime alone; a directory that is
neither added nor modified but has changes inside gets a Modify before them; the root is
never reported. Overlay answers from its upper directory, so the rows that hit copy-up,
opaque directories and hardlinks are the ones that keep it honest.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_root

from .graphtest_helpers import write_file


def make_parent(root: Path) -> None:
    """The image every scenario starts from."""
    write_file(root / "f", b"file", 0o644)
    os.mkdir(root / "d", 0o755)
    os.chmod(root / "d", 0o755)
    write_file(root / "d/f", b"dfile", 0o644)
    write_file(root / "d/g", b"g", 0o644)
    os.makedirs(root / "d2/sub", 0o755)
    os.chmod(root / "d2", 0o755)
    write_file(root / "d2/sub/x", b"x", 0o644)
    write_file(root / "d2/y", b"y", 0o644)
    os.symlink("f", root / "l")


def _replace_dir_by_new_dir(root: Path) -> None:
    shutil.rmtree(root / "d2")
    os.mkdir(root / "d2", 0o755)
    os.chmod(root / "d2", 0o755)
    write_file(root / "d2/z", b"z")


def _replace_dir_by_file(root: Path) -> None:
    shutil.rmtree(root / "d2")
    write_file(root / "d2", b"now a file")


def _replace_file_by_dir(root: Path) -> None:
    os.unlink(root / "f")
    os.mkdir(root / "f", 0o755)
    write_file(root / "f/x", b"x")


def _same_size_newer_mtime(root: Path) -> None:
    st = os.stat(root / "d/f")
    write_file(root / "d/f", b"DFILE", 0o644)  # same length as b"dfile"
    os.utime(root / "d/f", (st.st_atime + 100, st.st_mtime + 100))


def _touch_dir(root: Path) -> None:
    st = os.stat(root / "d")
    os.utime(root / "d", (st.st_atime + 100, st.st_mtime + 100))


def _retarget_symlink(root: Path) -> None:
    os.unlink(root / "l")
    os.symlink("d/f", root / "l")


def _new_hardlink_pair(root: Path) -> None:
    write_file(root / "h1", b"linked")
    os.link(root / "h1", root / "h2")


@dataclass(frozen=True)
class Scenario:
    name: str
    mutate: Callable[[Path], None]
    expected: list[str]
    needs_root: bool = False


SCENARIOS = [
    Scenario("nothing", lambda r: None, []),
    Scenario("add file at root", lambda r: write_file(r / "new", b"n"), ["A /new"]),
    Scenario("add file in dir", lambda r: write_file(r / "d/new", b"n"), ["C /d", "A /d/new"]),
    Scenario("add dir tree", lambda r: (os.makedirs(r / "n/m"), write_file(r / "n/m/x", b"x")),
             ["A /n", "A /n/m", "A /n/m/x"]),
    Scenario("add symlink", lambda r: os.symlink("d/f", r / "s"), ["A /s"]),
    Scenario("add fifo", lambda r: os.mkfifo(r / "p", 0o600), ["A /p"]),
    Scenario("modify content", lambda r: write_file(r / "d/f", b"longer content", 0o644),
             ["C /d", "C /d/f"]),
    Scenario("modify content, same size", _same_size_newer_mtime, ["C /d", "C /d/f"]),
    Scenario("modify mode only", lambda r: os.chmod(r / "d/f", 0o600), ["C /d", "C /d/f"]),
    Scenario("modify mode of root file", lambda r: os.chmod(r / "f", 0o600), ["C /f"]),
    Scenario("modify owner only", lambda r: os.lchown(r / "f", 1000, 1000), ["C /f"], needs_root=True),
    Scenario("touch a dir (mtime only)", _touch_dir, []),
    Scenario("chmod a dir", lambda r: os.chmod(r / "d", 0o700), ["C /d"]),
    Scenario("retarget symlink", _retarget_symlink, ["C /l"]),
    Scenario("delete file", lambda r: os.unlink(r / "d/g"), ["C /d", "D /d/g"]),
    Scenario("delete nested file", lambda r: os.unlink(r / "d2/sub/x"),
             ["C /d2", "C /d2/sub", "D /d2/sub/x"]),
    Scenario("delete dir", lambda r: shutil.rmtree(r / "d2"), ["D /d2"]),
    Scenario("replace file by dir", _replace_file_by_dir, ["C /f", "A /f/x"]),
    Scenario("replace dir by file", _replace_dir_by_file, ["C /d2"]),
    Scenario("replace dir by new dir", _replace_dir_by_new_dir,
             ["C /d2", "D /d2/sub", "D /d2/y", "A /d2/z"]),
    Scenario("hardlink to a parent's file", lambda r: os.link(r / "d/f", r / "d/hl"),
             ["C /d", "A /d/hl"]),
    Scenario("new hardlink pair", _new_hardlink_pair, ["A /h1", "A /h2"]),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_changes_follow_docker(store, scenario: Scenario) -> None:
    if scenario.needs_root:
        require_root()
    store.create_rw("image")
    with store.mounted("image") as root:
        make_parent(Path(root))
    store.create_rw("container", "image")
    with store.mounted("container") as root:
        scenario.mutate(Path(root))

    got = [str(c) for c in store.changes("container")]
    want = sorted(scenario.expected, key=lambda s: (s[2:], "CAD".index(s[0])))
    assert got == want
    assert [str(c) for c in store.changes("container", "image")] == got
