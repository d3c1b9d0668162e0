"""Trees an owner cannot walk by its modes, and paths past PATH_MAX (issue 16).

An unprivileged vfs store (uid 65534 here, on a store it owns) with a layer holding a
directory of mode 0000, from the tar or from ``chmod 000`` in a container layer: every
verb works as on a root-owned tree, the modes stay what they were, and nothing is left
half-made. A layer with a 4,509-byte path is a parent like any other. Leftovers of
interrupted work go, or cleanup says that they stay.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.corpus import cases, long_path_tar  # noqa: E402
from fuzz.rawtar import DIR, entry, tar  # noqa: E402

import lamina  # noqa: E402
from conftest import require_overlay, require_root, require_tool, skip_or_fail  # noqa: E402
from unprivileged import AS_NOBODY, NOBODY, NobodyPython, nobody_python  # noqa: E402

CORPUS = {c.name: c for c in cases()}


class Nobody:
    """``lamina`` run as uid/gid 65534 on a store that user owns, as an unprivileged
    user runs it, through :func:`unprivileged.nobody_python` (an interpreter and a copy
    of lamina that user can run, wherever the checkout and the venv live)."""

    def __init__(self, py: NobodyPython) -> None:
        self.py = py
        self.home = py.work / "home"
        self.home.mkdir(mode=0o755)
        os.chown(self.home, NOBODY, NOBODY)
        self.root = self.home / "store"

    def run(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        cmd = [*AS_NOBODY, self.py.python, "-m", "lamina", "--root", str(self.root), "--driver", "vfs", *args]
        return subprocess.run(cmd, input=input, capture_output=True, env=self.py.env(), cwd=self.py.work)

    def ok(self, *args: str, input: bytes | None = None) -> str:
        r = self.run(*args, input=input)
        assert r.returncode == 0, f"lamina {' '.join(args)}: {r.stderr.decode()}"
        return r.stdout.decode()

    def sh(self, script: str) -> None:
        """A shell command as the same user (what a container process does)."""
        subprocess.run([*AS_NOBODY, "sh", "-ec", script], check=True, cwd="/tmp")

    def file(self, name: str, data: bytes) -> Path:
        p = self.home / name
        p.write_bytes(data)
        os.chmod(p, 0o644)
        return p


@pytest.fixture
def nobody() -> Iterator[Nobody]:
    with nobody_python() as py:
        yield Nobody(py)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def read_by_components(root: Path, name: str) -> bytes:
    """A file's content reached one directory at a time (its path may be past PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in name.split("/")[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(name.rsplit("/", 1)[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        with os.fdopen(ffd, "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def listing(tar_bytes: bytes) -> list[tuple[str, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:
        return [(m.name, m.mode & 0o7777, m.size) for m in t.getmembers()]


# -- the unprivileged owner -------------------------------------------------------------------


def test_a_layer_with_0000_dirs_is_a_parent_is_read_and_goes(nobody: Nobody) -> None:
    locked = CORPUS["dir-mode-0000-with-content"].data
    other = tar(entry("other.txt", b"o"))
    z = nobody.root / "layers" / "z"
    assert nobody.ok("apply", "z", str(nobody.file("locked.tar", locked))).strip() == "1"
    assert mode(z / "locked") == 0
    assert nobody.ok("create-rw", "c", "--parent", "z").strip() == "c"
    assert nobody.ok("apply", "y", "--parent", "z", str(nobody.file("other.tar", other))).strip() == "1"
    for layer in ("c", "y"):
        copy = nobody.root / "layers" / layer
        assert mode(copy / "locked") == 0  # the copy has the original's modes
        os.chmod(copy / "locked", 0o700)  # (root looks inside without widening)
        assert mode(copy / "locked/inner") == 0 and mode(copy / "locked/inner/f") == 0
        assert (copy / "locked/inner/f").read_bytes() == b"x"
        os.chmod(copy / "locked", 0)
    assert nobody.ok("check").strip() == "ok"  # its tree against its tar, 0000 dirs and all
    assert mode(z / "locked") == 0
    assert nobody.ok("changes", "y") == "A /other.txt\n"
    assert nobody.ok("changes", "c") == ""
    assert nobody.ok("diff-size", "y") == "1\n"
    out = nobody.home / "z.tar"
    nobody.ok("diff", "z", "-o", str(out))
    assert out.read_bytes() == locked  # tar-split replay read the file inside 0000 dirs
    assert mode(z / "locked") == 0  # and the modes were put back
    os.chmod(z / "locked", 0o700)
    assert mode(z / "locked/inner") == 0 and mode(z / "locked/inner/f") == 0
    os.chmod(z / "locked", 0)
    for layer in ("y", "c", "z"):
        assert nobody.ok("rm", layer).strip() == layer
    assert os.listdir(nobody.root / "layers") == []
    assert os.listdir(nobody.root / "tmp") == []
    assert nobody.ok("check").strip() == "ok"


def test_a_child_layer_writes_into_its_parents_locked_dirs(nobody: Nobody) -> None:
    """A child tar adds to, deletes from and re-modes directories that the parent made
    0000 and 0555: the unprivileged owner widens them for the apply and puts back each
    directory's mode, the parent's or the child tar's own word on it (before, opening
    the 0000 directory failed with a bare "Permission denied: 'd'")."""
    parent = tar(entry("shut", typeflag=DIR, mode=0o755), entry("shut/old", b"o"), entry("shut/gone", b"g"),
                 entry("ro", typeflag=DIR, mode=0o555), entry("ro/keep", b"k"),
                 entry("reopened", typeflag=DIR, mode=0o000),
                 entry("shut", typeflag=DIR, mode=0o000))
    child = tar(entry("shut/new", b"n"), entry("shut/.wh.gone"), entry("ro/added", b"a"),
                entry("reopened", typeflag=DIR, mode=0o750), entry("reopened/in", b"i"))
    nobody.ok("apply", "p", str(nobody.file("p.tar", parent)))
    assert nobody.ok("apply", "q", "--parent", "p", str(nobody.file("q.tar", child))).strip() == "3"
    q = nobody.root / "layers" / "q"
    assert (mode(q / "shut"), mode(q / "ro"), mode(q / "reopened")) == (0, 0o555, 0o750)
    os.chmod(q / "shut", 0o700)
    assert sorted(os.listdir(q / "shut")) == ["new", "old"]
    os.chmod(q / "shut", 0)
    assert sorted(os.listdir(q / "ro")) == ["added", "keep"]
    assert nobody.ok("changes", "q") == ("C /reopened\nA /reopened/in\nC /ro\nA /ro/added\nC /shut\n"
                                         "D /shut/gone\nA /shut/new\n")
    assert nobody.ok("check").strip() == "ok"
    for layer in ("q", "p"):
        nobody.ok("rm", layer)
    assert os.listdir(nobody.root / "layers") == [] and os.listdir(nobody.root / "tmp") == []


def test_chmod_000_inside_a_container_layer(nobody: Nobody) -> None:
    nobody.ok("apply", "z", str(nobody.file("other.tar", tar(entry("other.txt", b"o")))))
    nobody.ok("create-rw", "c", "--parent", "z")
    view = nobody.root / "layers" / "c"
    nobody.sh(f"mkdir -p {view}/secret/inner && echo s > {view}/secret/inner/f && echo t > {view}/secret/top"
              f" && chmod 000 {view}/secret/inner/f {view}/secret/inner {view}/secret")
    assert nobody.ok("changes", "c") == "A /secret\nA /secret/inner\nA /secret/inner/f\nA /secret/top\n"
    assert nobody.ok("diff-size", "c") == "4\n"
    out = nobody.home / "c.tar"
    nobody.ok("diff", "c", "-o", str(out))
    assert listing(out.read_bytes()) == [("secret", 0, 0), ("secret/inner", 0, 0), ("secret/inner/f", 0, 2),
                                         ("secret/top", 0o644, 2)]
    nobody.ok("create-rw", "d", "--parent", "c")
    assert mode(nobody.root / "layers/d/secret") == 0
    assert mode(view / "secret") == 0
    for layer in ("d", "c", "z"):
        nobody.ok("rm", layer)
    assert os.listdir(nobody.root / "tmp") == [] and os.listdir(nobody.root / "layers") == []


def test_cleanup_removes_a_leftover_holding_0000_dirs(nobody: Nobody) -> None:
    nobody.ok("ls")  # makes the store
    work = nobody.root / "tmp" / "gone~creating"
    nobody.sh(f"mkdir -p {work}/a/b && echo x > {work}/a/b/f && chmod 000 {work}/a/b {work}/a")
    r = nobody.run("check", "--fast")
    assert (r.returncode, r.stdout) == (1, b"problem: leftover tmp/gone~creating of interrupted work\n")
    assert nobody.ok("cleanup") == "removed leftover tmp/gone~creating\n"
    assert not work.exists()
    assert nobody.ok("check").strip() == "ok"


# -- root ---------------------------------------------------------------------------------------


def test_cleanup_says_so_when_a_leftover_stays(tmp_path: Path) -> None:
    """Was: "removed leftover ..." while the leftover stayed (and check said so again)."""
    require_root()
    require_tool("chattr")
    with lamina.open(tmp_path / "s", driver="vfs") as s:
        work = s.root / "tmp" / "gone~creating"
        (work / "d").mkdir(parents=True)
        (work / "d" / "f").write_text("x")
        if subprocess.run(["chattr", "+i", str(work / "d" / "f")], capture_output=True).returncode:
            skip_or_fail("chattr +i is not supported here")
        try:
            done = s.cleanup()
            assert done == [f"could not remove leftover tmp/gone~creating ({work}/d/f: "
                            "Operation not permitted); run cleanup again"]
            assert work.exists()
            from lamina.check import check

            assert [str(p) for p in check(s, content=False)[0]] == [
                "leftover tmp/gone~creating of interrupted work"]
        finally:
            subprocess.run(["chattr", "-i", str(work / "d" / "f")], check=True)
        assert s.cleanup() == ["removed leftover tmp/gone~creating"]
        assert not work.exists()


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
@pytest.mark.parametrize("length", [4000, 4509, 9000])
def test_a_layer_with_a_path_past_path_max_is_a_parent(tmp_path: Path, driver: str, length: int) -> None:
    """Was (vfs): the layer applied, a child of it failed with ``cp: File name too
    long``. Now the copy goes through directory descriptors, as apply does."""
    require_root()
    if driver == "overlay":
        require_overlay()
    data = long_path_tar(length)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        deep = t.getnames()[-1]
    assert abs(len(deep.encode()) - length) < 202
    with lamina.open(tmp_path / "s", driver=driver) as s:
        assert s.apply_diff("z", None, io.BytesIO(data)) == len(b"deep\n")
        s.create_rw("c", "z")
        s.apply_diff("y", "z", io.BytesIO(tar(entry("other.txt", b"o"))))
        with s.diff("z") as d:
            assert d.read() == data
        assert [c.path for c in s.changes("y")] == ["/other.txt"]
        assert s.changes("c") == []
        for layer in ("c", "y"):
            with s.mounted(layer) as view:
                assert read_by_components(view, deep) == b"deep\n"
        for layer in ("c", "y", "z"):
            s.remove(layer)
        assert os.listdir(s.root / "tmp") == []
