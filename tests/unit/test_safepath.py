"""fs.safepath: paths beneath a root are reached without following any symlink."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.fs.safepath import (
    DirCache,
    UnsafePath,
    clean_parts,
    open_beneath,
    open_dir,
    remove_at,
)


@pytest.fixture
def root_fd(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "root").mkdir()
    fd = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("name,parts", [
    ("a/b/c", ["a", "b", "c"]),
    ("./a//b/", ["a", "b"]),
    ("a/./b/../c", ["a", "c"]),
    ("", []),
    (".", []),
    ("./", []),
    ("a/..", []),
])
def test_clean_parts(name: str, parts: list[str]) -> None:
    assert clean_parts(name) == parts


@pytest.mark.parametrize("name", ["/etc/passwd", "..", "../x", "a/../../x", "./.."])
def test_clean_parts_refuses_leaving_the_root(name: str) -> None:
    with pytest.raises(UnsafePath):
        clean_parts(name)


def test_open_dir_walks_real_directories(tmp_path: Path, root_fd: int) -> None:
    (tmp_path / "root/a/b").mkdir(parents=True)
    fd = open_dir(root_fd, ["a", "b"])
    try:
        assert fd_path(fd) == str(tmp_path / "root/a/b")
    finally:
        os.close(fd)


def test_open_dir_refuses_a_symlink_anywhere_on_the_way(tmp_path: Path, root_fd: int) -> None:
    (tmp_path / "root/a").mkdir()
    (tmp_path / "root/a/link").symlink_to(tmp_path)
    with pytest.raises(UnsafePath, match="symlink") as err:
        open_dir(root_fd, ["a", "link", "root"])
    assert err.value.path == "a/link"


def test_open_dir_refuses_a_symlink_to_a_directory_inside_too(tmp_path: Path,
                                                              root_fd: int) -> None:
    (tmp_path / "root/real").mkdir()
    (tmp_path / "root/alias").symlink_to("real")
    with pytest.raises(UnsafePath, match="symlink"):
        open_dir(root_fd, ["alias"])


def test_open_dir_refuses_a_file(tmp_path: Path, root_fd: int) -> None:
    (tmp_path / "root/f").write_text("x")
    with pytest.raises(UnsafePath, match="not a directory"):
        open_dir(root_fd, ["f", "g"])


def test_open_dir_missing_without_create(root_fd: int) -> None:
    with pytest.raises(FileNotFoundError):
        open_dir(root_fd, ["nope"])


def test_open_dir_creates_with_mode_and_hook(tmp_path: Path, root_fd: int) -> None:
    made: list[str] = []
    fd = open_dir(root_fd, ["x", "y"], create=True, mode=0o700,
                  on_create=lambda nfd: made.append(fd_path(nfd)))
    os.close(fd)
    assert made == [str(tmp_path / "root/x"), str(tmp_path / "root/x/y")]
    assert stat.S_IMODE((tmp_path / "root/x/y").stat().st_mode) == 0o700 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_dircache_asks_before_creating(tmp_path: Path, root_fd: int) -> None:
    asked: list[list[str]] = []

    def check(parts: list[str]) -> None:
        asked.append(parts)
        if parts[-1] == "forbidden":
            raise UnsafePath("/".join(parts), "refused by the caller")

    (tmp_path / "root/exists").mkdir()
    cache = DirCache(root_fd, before_create=check)
    try:
        cache.get(["exists", "new"])
        assert asked == [["exists", "new"]]
        with pytest.raises(UnsafePath, match="refused"):
            cache.get(["exists", "forbidden", "x"])
        assert not (tmp_path / "root/exists/forbidden").exists()
    finally:
        cache.close()


def test_open_beneath_opens_a_file(tmp_path: Path, root_fd: int) -> None:
    (tmp_path / "root/d").mkdir()
    (tmp_path / "root/d/f").write_text("content")
    fd = open_beneath(root_fd, "./d/f")
    with os.fdopen(fd, "rb") as f:
        assert f.read() == b"content"


def test_open_beneath_refuses_a_symlink_as_the_last_component(tmp_path: Path,
                                                              root_fd: int) -> None:
    (tmp_path / "secret").write_text("outside")
    (tmp_path / "root/f").symlink_to(tmp_path / "secret")
    with pytest.raises(OSError) as err:
        open_beneath(root_fd, "f")
    assert err.value.errno == errno.ELOOP


def test_open_beneath_refuses_names_that_leave(root_fd: int) -> None:
    for name in ("../secret", "/etc/passwd", "."):
        with pytest.raises(UnsafePath):
            open_beneath(root_fd, name)


def test_remove_at_removes_a_tree_without_following_links(tmp_path: Path, root_fd: int) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    (tmp_path / "root/t/sub").mkdir(parents=True)
    (tmp_path / "root/t/sub/link").symlink_to(outside)
    (tmp_path / "root/t/f").write_text("x")
    assert remove_at(root_fd, "t")
    assert not (tmp_path / "root/t").exists()
    assert (outside / "keep").read_text() == "k"
    assert not remove_at(root_fd, "t")


def test_remove_at_removes_a_symlink_not_its_target(tmp_path: Path, root_fd: int) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "root/l").symlink_to(tmp_path / "target")
    assert remove_at(root_fd, "l")
    assert (tmp_path / "target").is_dir()


def test_dircache_reuses_fds_for_the_current_directory_and_ancestors(
        tmp_path: Path, root_fd: int) -> None:
    cache = DirCache(root_fd)
    try:
        fd = cache.get(["a", "b"])
        assert cache.get(["a", "b"]) == fd
        parent = cache.get(["a"])
        assert fd_path(parent) == str(tmp_path / "root/a")
        assert cache.get(["a", "b"]) == fd  # going up kept the deeper fd
        sibling = cache.get(["a", "c"])
        assert fd_path(sibling) == str(tmp_path / "root/a/c")
        assert cache.get([]) == root_fd
    finally:
        cache.close()


def test_dircache_forget_then_symlink_is_refused(tmp_path: Path, root_fd: int) -> None:
    cache = DirCache(root_fd)
    try:
        cache.get(["d", "e"])
        remove_at(root_fd, "d")
        cache.forget(["d"])
        (tmp_path / "root/d").symlink_to(tmp_path)
        with pytest.raises(UnsafePath):
            cache.get(["d", "e"])
    finally:
        cache.close()


def test_dircache_keeps_a_bounded_number_of_fds(tmp_path: Path, root_fd: int) -> None:
    before = open_fd_count()
    deep = [f"d{i}" for i in range(DirCache.MAX_OPEN * 3)]
    cache = DirCache(root_fd)
    try:
        fd = cache.get(deep)
        assert open_fd_count() - before <= DirCache.MAX_OPEN + 1
        assert fd_path(fd).endswith("/".join(deep[-3:]))
        # an ancestor whose fd was closed is reopened on demand
        mid = cache.get(deep[:5])
        assert fd_path(mid) == str(tmp_path / "root" / "/".join(deep[:5]))
        assert open_fd_count() - before <= DirCache.MAX_OPEN + 1
    finally:
        cache.close()
    assert open_fd_count() == before
