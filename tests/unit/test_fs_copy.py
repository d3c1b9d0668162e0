"""copy_tree and force_rmtree (lamina.fs.copy, lamina.fs.relax): what ``cp -a`` kept,
kept still, through directory descriptors (issue 16: paths past PATH_MAX, 0000 dirs)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import require_root, skip_or_fail
from lamina.fs.copy import CopyError, copy_tree
from lamina.fs.relax import force_rmtree, original_modes, readable_tree

NS = 1_600_000_000_123_456_789


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def deep_dir(base: Path, levels: int) -> list[str]:
    """Make ``levels`` nested 200-byte directories under ``base`` by fds; their names."""
    names = [chr(ord("a") + i % 26) * 200 for i in range(levels)]
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    for name in names:
        os.mkdir(name, 0o755, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    wfd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(wfd, b"deep")
    os.close(wfd)
    os.close(fd)
    return names


def read_deep(base: Path, names: list[str]) -> bytes:
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    for name in names:
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    ffd = os.open("f", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    with os.fdopen(ffd, "rb") as f:
        return f.read()


def test_copy_keeps_types_content_modes_links_and_times(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d/sub").mkdir(parents=True)
    (src / "d/file").write_bytes(b"content")
    os.chmod(src / "d/file", 0o4751)
    (src / "d/sub/x").write_bytes(b"x")
    os.link(src / "d/file", src / "hard")
    os.symlink("d/file", src / "sym")
    os.mkfifo(src / "fifo", 0o640)
    with open(src / "sparse", "wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
    os.chmod(src / "d/sub", 0o1750)
    for p in (src / "d/sub", src / "d", src / "sym"):
        os.utime(p, ns=(NS, NS), follow_symlinks=False)
    os.chmod(src, 0o750)
    dst = tmp_path / "dst"
    copy_tree(src, dst)
    assert (dst / "d/file").read_bytes() == b"content"
    assert mode(dst / "d/file") == 0o4751
    assert os.stat(dst / "hard").st_ino == os.stat(dst / "d/file").st_ino
    assert os.stat(dst / "hard").st_ino != os.stat(src / "hard").st_ino
    assert os.readlink(dst / "sym") == "d/file"
    assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode) and mode(dst / "fifo") == 0o640
    assert mode(dst / "d/sub") == 0o1750 and mode(dst) == 0o750
    for p in ("d/sub", "d", "sym"):
        assert os.lstat(dst / p).st_mtime_ns == NS, p
    assert (dst / "sparse").stat().st_size == (8 << 20) + 3
    assert (dst / "sparse").stat().st_blocks * 512 < (1 << 20), "holes are kept"


def test_copy_keeps_owners_and_xattrs_as_root(tmp_path: Path) -> None:
    require_root()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    os.chown(src / "f", 1234, 5678)
    os.chmod(src / "f", 0o2755)
    os.setxattr(src / "f", "trusted.lamina", b"t")
    os.setxattr(src / "f", "user.lamina", b"u")
    os.symlink("f", src / "l")
    os.chown(src / "l", 42, 43, follow_symlinks=False)
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    copy_tree(src, tmp_path / "dst")
    st = os.stat(tmp_path / "dst/f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o2755)
    assert os.getxattr(tmp_path / "dst/f", "trusted.lamina") == b"t"
    assert os.getxattr(tmp_path / "dst/f", "user.lamina") == b"u"
    assert os.lstat(tmp_path / "dst/l").st_uid == 42
    assert os.stat(tmp_path / "dst/null").st_rdev == os.makedev(1, 3)


def test_copy_and_remove_past_path_max(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    names = deep_dir(src, 25)  # about 5,000 bytes
    assert sum(len(n) + 1 for n in names) > os.pathconf(src, "PC_PATH_MAX")
    copy_tree(src, tmp_path / "dst")
    assert read_deep(tmp_path / "dst", names) == b"deep"
    force_rmtree(tmp_path / "dst")
    force_rmtree(src)
    assert not (tmp_path / "dst").exists() and not src.exists()


def test_copy_of_0000_dirs_keeps_their_modes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "locked/inner").mkdir(parents=True)
    (src / "locked/inner/f").write_bytes(b"secret")
    os.chmod(src / "locked/inner/f", 0)
    os.chmod(src / "locked/inner", 0)
    os.chmod(src / "locked", 0)
    copy_tree(src, tmp_path / "dst")
    for base in (src, tmp_path / "dst"):
        assert mode(base / "locked") == 0
        os.chmod(base / "locked", 0o700)
        assert mode(base / "locked/inner") == 0
        os.chmod(base / "locked/inner", 0o700)
        assert mode(base / "locked/inner/f") == 0
        os.chmod(base / "locked/inner/f", 0o600)
        assert (base / "locked/inner/f").read_bytes() == b"secret"
        os.chmod(base / "locked/inner", 0)
        os.chmod(base / "locked", 0)
        force_rmtree(base)
        assert not base.exists()


def test_a_copy_that_fails_names_the_entry(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    os.mkfifo(src / "a/pipe")
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError):
        copy_tree(src, tmp_path / "dst")  # the destination must be new
    if os.geteuid() != 0:
        skip_or_fail("needs root to make a device node")
    os.mknod(src / "a/dev", stat.S_IFBLK | 0o600, os.makedev(7, 250))
    os.chmod(src / "a", 0o755)
    import unittest.mock as mock

    real = os.mknod

    def refuse(path, mode_=0o600, device=0, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if stat.S_ISBLK(mode_):
            raise PermissionError(1, "Operation not permitted")
        return real(path, mode_, device, dir_fd=dir_fd)

    with mock.patch("os.mknod", refuse), pytest.raises(CopyError) as e:
        copy_tree(src, tmp_path / "dst2")
    assert e.value.filename == "a/dev" and e.value.strerror == "Operation not permitted"


def test_readable_tree_does_nothing_for_root(tmp_path: Path) -> None:
    require_root()
    (tmp_path / "d").mkdir()
    os.chmod(tmp_path / "d", 0)
    with readable_tree(tmp_path):
        assert mode(tmp_path / "d") == 0
        assert not original_modes()


def test_force_rmtree_removes_a_file_a_symlink_and_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    os.symlink("/etc", tmp_path / "l")
    force_rmtree(tmp_path / "f")
    force_rmtree(tmp_path / "l")
    force_rmtree(tmp_path / "missing")
    assert os.listdir(tmp_path) == []
    assert os.path.exists("/etc/passwd")
