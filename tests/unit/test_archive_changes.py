"""Changes between trees (Docker's ChangesDirs), from an overlay upper directory, and
their sizes.

Each scenario builds an old tree, copies it (stats kept to the nanosecond), changes the
copy, and checks the exact list Docker's rules give. The overlay tests build the same
situation twice -- as overlay layers (upper + lowers with whiteouts and opaque dirs) and
as full trees -- and require ``changes_overlay`` to equal ``changes_dirs``; with root and
overlayfs, a real mount provides the merged view the kernel makes.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import require_overlay, require_root
from conftest import write_file as write
from lamina.archive.change import Change, ChangeKind
from lamina.archive.changes import (
    changes_dirs,
    changes_overlay,
    changes_size,
    stat_different,
    tree_size,
)

M, A, D = ChangeKind.MODIFY, ChangeKind.ADD, ChangeKind.DELETE


def ch(*pairs: tuple[ChangeKind, str]) -> list[Change]:
    return [Change(p, k) for k, p in pairs]


def copy_tree(src: Path, dst: Path) -> None:
    """A full copy that keeps mode, owner and mtime (ns), so only our edits differ."""
    shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)
    for dirpath, dirnames, filenames in os.walk(src):
        for name in [*dirnames, *filenames]:
            s = Path(dirpath) / name
            st = s.lstat()
            d = dst / s.relative_to(src)
            os.chown(d, st.st_uid, st.st_gid, follow_symlinks=False) if os.geteuid() == 0 else None


def base_tree(root: Path) -> None:
    write(root / "a" / "f", "hello")
    write(root / "a" / "g", "world")
    write(root / "d" / "x" / "y", "deep")
    write(root / "d" / "z", "zz")
    write(root / "top", "t")
    os.symlink("a/f", root / "lnk")


def _bump(p: Path) -> None:
    st = p.lstat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_123), follow_symlinks=False)


def _replace_file_by_dir(n: Path) -> None:
    (n / "a" / "f").unlink()
    write(n / "a" / "f" / "inner", "i")


def _replace_dir_by_file(n: Path) -> None:
    shutil.rmtree(n / "d")
    write(n / "d", "now a file")


def _retarget(n: Path) -> None:
    (n / "lnk").unlink()
    os.symlink("a/g", n / "lnk")


def _dir_mtime_and_size_only(n: Path) -> None:
    write(n / "d" / "tmp", "t")
    (n / "d" / "tmp").unlink()  # d's mtime (and maybe size) changed, nothing else
    os.utime(n / "d", (0, 12345))


def _same_second_no_ns(n: Path) -> None:
    # a file restored from a tar has whole seconds: equal to any ns in the same second
    st = (n / "a" / "f").stat()
    os.utime(n / "a" / "f", ns=(st.st_atime_ns, st.st_mtime_ns // 10**9 * 10**9))


SCENARIOS: dict[str, tuple[Callable[[Path], None], list[Change]]] = {
    "nothing": (lambda n: None, []),
    "add file": (lambda n: write(n / "a" / "new", "n"), ch((M, "/a"), (A, "/a/new"))),
    "add at root": (lambda n: write(n / "new", "n"), ch((A, "/new"))),
    "add dir tree": (
        lambda n: write(n / "nd" / "s" / "f", "n"),
        ch((A, "/nd"), (A, "/nd/s"), (A, "/nd/s/f")),
    ),
    "modify content": (
        lambda n: (write(n / "d" / "x" / "y", "DEEP+"), _bump(n / "d" / "x" / "y")),
        ch((M, "/d"), (M, "/d/x"), (M, "/d/x/y")),
    ),
    "modify mtime only": (lambda n: _bump(n / "top"), ch((M, "/top"))),
    "modify mode only": (lambda n: os.chmod(n / "a" / "g", 0o600), ch((M, "/a"), (M, "/a/g"))),
    "dir mode": (lambda n: os.chmod(n / "d", 0o700), ch((M, "/d"))),
    "dir mtime and size ignored": (_dir_mtime_and_size_only, []),
    "same second, one side without ns": (_same_second_no_ns, []),
    "delete file": (lambda n: (n / "a" / "g").unlink(), ch((M, "/a"), (D, "/a/g"))),
    "delete dir reports the top only": (lambda n: shutil.rmtree(n / "d"), ch((D, "/d"))),
    "replace file by dir": (_replace_file_by_dir, ch((M, "/a"), (M, "/a/f"), (A, "/a/f/inner"))),
    "replace dir by file": (_replace_dir_by_file, ch((M, "/d"))),
    "hardlink added": (lambda n: os.link(n / "a" / "f", n / "a" / "h"), ch((M, "/a"), (A, "/a/h"))),
    "symlink retarget": (_retarget, ch((M, "/lnk"))),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_changes_dirs_scenarios(tmp_path: Path, name: str) -> None:
    mutate, expected = SCENARIOS[name]
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    base_tree(old)
    copy_tree(old, new)
    mutate(new)
    assert changes_dirs(new, old) == expected


def test_changes_dirs_against_nothing(tmp_path: Path) -> None:
    base_tree(tmp_path)
    got = changes_dirs(tmp_path, None)
    assert got == ch(
        (A, "/a"), (A, "/a/f"), (A, "/a/g"), (A, "/d"), (A, "/d/x"), (A, "/d/x/y"),
        (A, "/d/z"), (A, "/lnk"), (A, "/top"),
    )


def test_changes_dirs_owner_and_capability(tmp_path: Path) -> None:
    require_root()
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    base_tree(old)
    copy_tree(old, new)
    os.chown(new / "top", 1, 2)
    cap = bytes([0, 0, 0, 2]) + bytes(16)  # VFS_CAP_REVISION_2, no capabilities
    os.setxattr(new / "a" / "g", "security.capability", cap)
    assert changes_dirs(new, old) == ch((M, "/a"), (M, "/a/g"), (M, "/top"))


def test_changes_dirs_prunes_shared_inodes(tmp_path: Path) -> None:
    """Hardlinked copies share inodes: a change made through one shows in both, and
    Docker's walker skips such entries without comparing them."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    base_tree(old)
    subprocess.run(["cp", "-al", str(old), str(new)], check=True)
    os.chmod(new / "a" / "f", 0o600)  # same inode: old sees it too
    write(new / "a" / "n", "n")
    assert changes_dirs(new, old) == ch((M, "/a"), (A, "/a/n"))
    assert changes_dirs(old, old) == []


def test_changes_sorted_bytewise(tmp_path: Path) -> None:
    """Sorted like Go strings: "/a.txt" before "/a/x" ('.' < '/')."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    write(new / "a" / "x")
    write(new / "a.txt")
    write(new / "a-b")
    assert [c.path for c in changes_dirs(new, old)] == ["/a", "/a-b", "/a.txt", "/a/x"]


def test_stat_different_nanosecond_rule(tmp_path: Path) -> None:
    p = write(tmp_path / "f")
    os.utime(p, ns=(0, 5 * 10**9 + 10))
    a = p.lstat()
    os.utime(p, ns=(0, 5 * 10**9))
    b = p.lstat()
    os.utime(p, ns=(0, 5 * 10**9 + 20))
    c = p.lstat()
    os.utime(p, ns=(0, 6 * 10**9))
    d = p.lstat()
    assert not stat_different(a, b) and not stat_different(b, a)
    assert stat_different(a, c)
    assert stat_different(b, d)


# -- sizes --------------------------------------------------------------------------


def test_changes_size_counts_files_and_hardlinks_once(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    base_tree(old)
    copy_tree(old, new)
    write(new / "big", b"B" * 1000)
    os.link(new / "big", new / "big2")
    write(new / "a" / "g", b"G" * 10)
    _bump(new / "a" / "g")
    (new / "top").unlink()
    os.symlink("a/f" * 3, new / "lnk2")
    changes = changes_dirs(new, old)
    assert Change("/a", M) in changes  # a directory: counts 0
    assert changes_size(new, changes) == 1000 + 10 + 9
    # a change list naming a path that vanished is tolerated
    assert changes_size(new, [*changes, Change("/gone", A)]) == 1019


def test_tree_size(tmp_path: Path) -> None:
    write(tmp_path / "a" / "f", b"x" * 100)
    os.link(tmp_path / "a" / "f", tmp_path / "h")
    write(tmp_path / "empty", b"")
    os.symlink("abcdef", tmp_path / "s")
    (tmp_path / "d").mkdir()
    assert tree_size(tmp_path) == 100 + 6


# -- overlay ------------------------------------------------------------------------

OPAQUE = "trusted.overlay.opaque"


def whiteout(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def opaque_dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    os.setxattr(p, OPAQUE, b"y")
    return p


def materialize(layers: list[Path], dest: Path) -> None:
    """The union of overlay-format layers (nearest first) as a plain tree, built the
    vfs way: apply each layer from the bottom up, whiteouts deleting, opaque
    directories emptying what lies below. Independent of changes_overlay's lookup."""
    dest.mkdir()
    for layer in reversed(layers):
        for dirpath, dirnames, filenames in os.walk(layer):
            rel = Path(dirpath).relative_to(layer)
            for name in sorted([*dirnames, *filenames]):
                src = Path(dirpath) / name
                dst = dest / rel / name
                st = src.lstat()
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    _remove(dst)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if not dst.is_dir() or dst.is_symlink():
                        _remove(dst)
                        dst.mkdir()
                    elif _opaque(src):
                        for child in list(dst.iterdir()):
                            _remove(child)
                    shutil.copystat(src, dst, follow_symlinks=False)
                    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
                    continue
                _remove(dst)
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(src), dst)
                else:
                    shutil.copy2(src, dst, follow_symlinks=False)
                os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _opaque(p: Path) -> bool:
    try:
        return os.getxattr(p, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _copy_from(src: Path, dst: Path) -> None:
    """A copied-up file: same stats as the lower one."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def overlay_scenario(tmp: Path) -> tuple[Path, list[Path]]:
    """Two lower layers and an upper one exercising every overlay rule."""
    l1, l0, up = tmp / "l1", tmp / "l0", tmp / "up"
    # base layer
    write(l1 / "etc" / "conf", "c1")
    write(l1 / "etc" / "keep", "k")
    write(l1 / "etc" / "old", "o")
    write(l1 / "opq" / "a", "a")
    write(l1 / "opq" / "sub" / "b", "b")
    write(l1 / "gone" / "x", "x")
    write(l1 / "f2d", "file becomes dir")
    write(l1 / "d2f" / "in", "dir becomes file")
    write(l1 / "hidden" / "h", "hidden by l0's whiteout")
    write(l1 / "deep" / "q" / "r", "r")
    write(l1 / "copied", "same")
    write(l1 / "lower-opaque" / "under", "hidden by l0's opaque dir")
    # middle layer: its own whiteout and opaque dir
    whiteout(l0 / "hidden")
    write(l0 / "etc" / "conf", "c0")
    opaque_dir(l0 / "lower-opaque")
    write(l0 / "lower-opaque" / "mid", "m")
    write(l0 / "opq" / "c", "c")
    # upper layer
    write(up / "etc" / "conf", "changed")
    whiteout(up / "etc" / "old")
    whiteout(up / "etc" / "never-existed")  # a stale whiteout: no change
    write(up / "etc" / "new", "n")
    opaque_dir(up / "opq")
    write(up / "opq" / "a", "recreated")  # same name as below, new content
    (up / "opq" / "sub").mkdir()  # recreated empty: lower sub/b is gone
    whiteout(up / "gone")
    (up / "f2d").mkdir()
    write(up / "f2d" / "child", "c")
    write(up / "d2f", "now a file")
    write(up / "hidden", "reborn")  # hidden below by l0's whiteout: an Add
    write(up / "deep" / "q" / "new", "n")  # parents only copied up
    _copy_from(l1 / "copied", up / "copied")  # copied up, unchanged: no change
    os.chmod(up / "deep", 0o700)
    write(up / "lower-opaque" / "under", "not visible below: Add")
    return up, [l0, l1]


def test_changes_overlay_matches_changes_dirs(tmp_path: Path) -> None:
    require_root()  # whiteouts are device nodes; trusted.* xattrs
    up, lowers = overlay_scenario(tmp_path)
    merged, parent = tmp_path / "merged", tmp_path / "parent"
    materialize([up, *lowers], merged)
    materialize(lowers, parent)
    expected = changes_dirs(merged, parent)
    got = changes_overlay(up, lowers, opaque_xattr=OPAQUE)
    assert got == expected
    # and the list is what the scenario means, spelled out
    assert got == ch(
        (M, "/d2f"),
        (M, "/deep"),
        (M, "/deep/q"),
        (A, "/deep/q/new"),
        (M, "/etc"),
        (M, "/etc/conf"),
        (A, "/etc/new"),
        (D, "/etc/old"),
        (M, "/f2d"),
        (A, "/f2d/child"),
        (D, "/gone"),
        (A, "/hidden"),
        (M, "/lower-opaque"),
        (A, "/lower-opaque/under"),
        (M, "/opq"),
        (M, "/opq/a"),
        (D, "/opq/c"),
        (M, "/opq/sub"),
        (D, "/opq/sub/b"),
    )


def test_changes_overlay_without_lowers_is_all_adds(tmp_path: Path) -> None:
    write(tmp_path / "a" / "b", "x")
    write(tmp_path / "c", "y")
    assert changes_overlay(tmp_path, [], opaque_xattr=OPAQUE) == changes_dirs(tmp_path, None)


def _mount_overlay(target: Path, lowers: list[Path], upper: Path | None = None, work: Path | None = None) -> None:
    from lamina.fs.mount import mount

    target.mkdir(parents=True, exist_ok=True)
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    opts += ",redirect_dir=off,index=off,metacopy=off"
    mount("overlay", target, "overlay", 0, opts)


def test_changes_overlay_matches_a_real_overlay_mount(tmp_path: Path) -> None:
    """The kernel makes the whiteouts and opaque dirs; changes_dirs on the mounted
    views is Docker's naive answer, which changes_overlay must reproduce."""
    require_overlay()
    from lamina.fs.mount import umount

    l1, l0 = tmp_path / "l1", tmp_path / "l0"
    base_tree(l1)
    write(l1 / "gone" / "g", "g")
    write(l1 / "keepdir" / "k", "k")
    write(l0 / "d" / "added-in-l0", "x")
    whiteout(l0 / "d" / "z")
    up, work = tmp_path / "up", tmp_path / "work"
    up.mkdir()
    work.mkdir()
    merged, parent = tmp_path / "merged", tmp_path / "parent"
    _mount_overlay(parent, [l0, l1])
    try:
        _mount_overlay(merged, [l0, l1], up, work)
        try:
            write(merged / "a" / "f", "changed")  # copy-up and modify
            os.chmod(merged / "a" / "g", 0o640)
            os.chmod(merged / "top", 0o644)  # copy-up, mode unchanged: no change
            (merged / "d" / "x" / "y").unlink()  # whiteout in a copied-up dir
            shutil.rmtree(merged / "gone")  # whiteout for a directory
            shutil.rmtree(merged / "keepdir")
            write(merged / "keepdir" / "fresh", "f")  # recreated: the kernel makes it opaque
            write(merged / "new" / "n", "n")
            os.symlink("elsewhere", merged / "newlink")
            (merged / "lnk").unlink()
            os.symlink("a/g", merged / "lnk")
            os.link(merged / "new" / "n", merged / "new" / "n2")
            assert os.getxattr(up / "keepdir", OPAQUE) == b"y"
            expected = changes_dirs(merged, parent)
            got = changes_overlay(up, [l0, l1], opaque_xattr=OPAQUE)
            assert got == expected
            assert Change("/keepdir/k", D) in got and Change("/gone", D) in got
            assert Change("/top", M) not in got
        finally:
            umount(merged, lazy=False)
    finally:
        umount(parent, lazy=False)


def test_changes_without_proc_fd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc is missing, xattrs are read through opened files and directories."""
    require_root()
    import lamina.archive.changes as changes_mod

    monkeypatch.setattr(changes_mod, "_PROC_FD", False)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    base_tree(old)
    copy_tree(old, new)
    os.setxattr(new / "a" / "g", "security.capability", bytes([0, 0, 0, 2]) + bytes(16))
    assert changes_dirs(new, old) == ch((M, "/a"), (M, "/a/g"))
    up, lowers = overlay_scenario(tmp_path / "ovl")
    merged, parent = tmp_path / "merged", tmp_path / "parent"
    materialize([up, *lowers], merged)
    materialize(lowers, parent)
    assert changes_overlay(up, lowers, opaque_xattr=OPAQUE) == changes_dirs(merged, parent)


def test_a_directory_swapped_for_a_symlink_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live container replaces a directory by a symlink to the host after the walk
    saw it as a directory: the walk must not list what the symlink points at."""
    import lamina.archive.changes as changes_mod

    old, new, host = tmp_path / "old", tmp_path / "new", tmp_path / "host"
    write(old / "d" / "f", "f")
    write(new / "d" / "f", "f")
    write(host / "host-secret", "s")
    real_dir_stat = (old / "d").lstat()
    shutil.rmtree(new / "d")
    os.symlink(host, new / "d")
    real_lstat = os.lstat

    def lstat_before_the_swap(path, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if path == "d" and dir_fd is not None:
            return real_dir_stat  # what the walk saw a moment before the swap
        return real_lstat(path, dir_fd=dir_fd)

    monkeypatch.setattr(changes_mod.os, "lstat", lstat_before_the_swap)
    got = changes_dirs(new, old)
    assert not any("host-secret" in c.path for c in got)
