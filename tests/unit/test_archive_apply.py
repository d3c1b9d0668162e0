"""apply_tar: Docker's UnpackLayer semantics, one behaviour per test."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

import tarmaker as tm
from conftest import require_root, require_user_xattrs, skip_or_fail
from lamina.archive.apply import ApplyOptions, apply_tar
from lamina.errors import InvalidArchive

# the C speedups and the pure-Python path must behave alike: every test runs in both
pytestmark = pytest.mark.usefixtures("native_mode")

MTIME = 1_600_000_000


def apply(root: Path, data: bytes, **opts: object) -> int:
    root.mkdir(exist_ok=True)
    return apply_tar(root, io.BytesIO(data), ApplyOptions(**opts))  # type: ignore[arg-type]


def mode_of(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


# -- regular files -----------------------------------------------------------------


def test_regular_file_content_mode_and_mtime(root: Path) -> None:
    apply(root, tm.tar(tm.file("a.txt", b"hello", mode=0o640, mtime=MTIME)))
    p = root / "a.txt"
    assert p.read_bytes() == b"hello"
    assert mode_of(p) == 0o640
    assert p.stat().st_mtime_ns == MTIME * 10**9


def test_mode_bits_outside_the_umask_are_set(root: Path) -> None:
    apply(root, tm.tar(tm.file("w", b"x", mode=0o666), tm.file("s", b"x", mode=0o4755),
                       tm.directory("t", mode=0o1777)))
    assert mode_of(root / "w") == 0o666
    assert mode_of(root / "s") == 0o4755
    assert mode_of(root / "t") == 0o1777


def test_returns_the_sum_of_regular_file_sizes(root: Path) -> None:
    size = apply(root, tm.tar(tm.file("a", b"12345"), tm.directory("d"), tm.file("d/b", b"678"),
                              tm.symlink("s", "a"), tm.hardlink("h", "a"),
                              tm.file(".wh.gone"), tm.header("f", type=b"6")))
    assert size == 8


def test_large_file_spans_many_buffers(root: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 123)
    apply(root, tm.tar(tm.file("big", data), tm.file("after", b"ok")))
    assert (root / "big").read_bytes() == data
    assert (root / "after").read_bytes() == b"ok"


def test_file_replaces_existing_file_without_touching_other_hardlinks(root: Path) -> None:
    (root / "a").write_bytes(b"old")
    os.link(root / "a", root / "other")
    apply(root, tm.tar(tm.file("a", b"new")))
    assert (root / "a").read_bytes() == b"new"
    assert (root / "other").read_bytes() == b"old"


def test_file_replaces_existing_directory_tree(root: Path) -> None:
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "sub" / "f").write_text("x")
    apply(root, tm.tar(tm.file("d", b"now a file")))
    assert (root / "d").read_bytes() == b"now a file"


# -- directories -------------------------------------------------------------------


def test_directory_merges_with_existing_one(root: Path) -> None:
    (root / "d").mkdir(mode=0o700)
    (root / "d" / "kept").write_text("lower")
    apply(root, tm.tar(tm.directory("d/", mode=0o750), tm.file("d/new", b"n")))
    assert (root / "d" / "kept").read_text() == "lower"
    assert (root / "d" / "new").read_bytes() == b"n"
    assert mode_of(root / "d") == 0o750


def test_directory_replaces_existing_file(root: Path) -> None:
    (root / "d").write_text("file")
    apply(root, tm.tar(tm.directory("d")))
    assert (root / "d").is_dir()


def test_implied_parent_directories_are_0755(root: Path) -> None:
    apply(root, tm.tar(tm.file("a/b/c/f", b"x")))
    for d in ("a", "a/b", "a/b/c"):
        assert mode_of(root / d) == 0o755
    assert (root / "a/b/c/f").read_bytes() == b"x"


def test_directory_mtimes_are_set_after_their_content(root: Path) -> None:
    apply(root, tm.tar(tm.directory("d", mtime=MTIME), tm.file("d/f", b"x", mtime=MTIME + 5),
                       tm.directory("d/e", mtime=MTIME + 1), tm.file("d/e/g", b"y")))
    assert (root / "d").stat().st_mtime_ns == MTIME * 10**9
    assert (root / "d/e").stat().st_mtime_ns == (MTIME + 1) * 10**9


def test_root_entry_sets_the_root_metadata(root: Path) -> None:
    apply(root, tm.tar(tm.directory("./", mode=0o711, mtime=MTIME), tm.file("./f", b"x")))
    assert mode_of(root) == 0o711
    assert root.stat().st_mtime_ns == MTIME * 10**9
    assert (root / "f").read_bytes() == b"x"


def test_restrictive_directory_mode_still_lets_its_entries_in(root: Path) -> None:
    apply(root, tm.tar(tm.directory("ro", mode=0o555), tm.file("ro/f", b"x")),
          privileged=False)
    assert (root / "ro/f").read_bytes() == b"x"
    assert mode_of(root / "ro") == 0o555


# -- links ---------------------------------------------------------------------------


def test_symlink_stores_its_target_text(root: Path) -> None:
    apply(root, tm.tar(tm.symlink("abs", "/etc/passwd"), tm.symlink("rel", "../../x"),
                       tm.symlink("l", "target", mtime=MTIME)))
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert os.readlink(root / "rel") == "../../x"
    assert (root / "l").lstat().st_mtime_ns == MTIME * 10**9


def test_symlink_replaces_existing_entry(root: Path) -> None:
    (root / "l").mkdir()
    apply(root, tm.tar(tm.symlink("l", "elsewhere")))
    assert os.readlink(root / "l") == "elsewhere"


def test_file_replaces_a_symlink_instead_of_writing_through_it(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    apply(root, tm.tar(tm.symlink("f", str(outside)), tm.file("f", b"inside")))
    assert outside.read_text() == "keep"
    assert not (root / "f").is_symlink()
    assert (root / "f").read_bytes() == b"inside"


def test_hardlink_shares_the_inode(root: Path) -> None:
    apply(root, tm.tar(tm.file("a", b"data"), tm.directory("d"), tm.hardlink("d/b", "a"),
                       tm.hardlink("c", "a")))
    ino = (root / "a").stat().st_ino
    assert (root / "d/b").stat().st_ino == ino
    assert (root / "c").stat().st_ino == ino
    assert (root / "a").stat().st_nlink == 3


def test_hardlink_to_a_target_already_in_the_root(root: Path) -> None:
    (root / "lower").write_text("from before")
    apply(root, tm.tar(tm.hardlink("again", "lower", mode=0o644)))
    assert (root / "again").stat().st_ino == (root / "lower").stat().st_ino


def test_hardlink_to_a_missing_target_is_refused(root: Path) -> None:
    with pytest.raises(InvalidArchive) as err:
        apply(root, tm.tar(tm.hardlink("l", "nothing")))
    assert err.value.entry == "l"


def test_hardlink_to_a_directory_is_refused(root: Path) -> None:
    with pytest.raises(InvalidArchive, match="directory"):
        apply(root, tm.tar(tm.directory("d"), tm.hardlink("l", "d")))


def test_hardlink_target_is_copied_up_from_the_nearest_lower_root(tmp_path: Path) -> None:
    lower1 = tmp_path / "l1"
    lower2 = tmp_path / "l2"
    (lower1 / "usr/bin").mkdir(parents=True)
    (lower2 / "usr/bin").mkdir(parents=True)
    (lower1 / "usr").chmod(0o751)
    (lower1 / "usr/bin/tool").write_bytes(b"nearest")
    (lower1 / "usr/bin/tool").chmod(0o751)
    (lower2 / "usr/bin/tool").write_bytes(b"farther")
    upper = tmp_path / "upper"
    apply(upper, tm.tar(tm.hardlink("tool-link", "usr/bin/tool", mode=0o751)),
          lower_roots=[lower1, lower2], whiteouts="overlay")
    assert (upper / "usr/bin/tool").read_bytes() == b"nearest"
    assert (upper / "tool-link").stat().st_ino == (upper / "usr/bin/tool").stat().st_ino
    assert mode_of(upper / "usr/bin/tool") == 0o751
    assert mode_of(upper / "usr") == 0o751
    assert (lower1 / "usr/bin/tool").stat().st_nlink == 1


def test_hardlink_copy_up_stops_at_a_whiteout_in_a_lower_root(tmp_path: Path) -> None:
    lower1 = tmp_path / "l1"
    lower2 = tmp_path / "l2"
    lower1.mkdir()
    lower2.mkdir()
    (lower2 / "f").write_text("deleted above")
    try:
        os.mknod(lower1 / "f", stat.S_IFCHR | 0o600, 0)
    except PermissionError:
        skip_or_fail("cannot make a whiteout device here (mknod of a 0/0 char device needs CAP_MKNOD)")
    with pytest.raises(InvalidArchive, match="does not exist"):
        apply(tmp_path / "up", tm.tar(tm.hardlink("l", "f")), lower_roots=[lower1, lower2],
              whiteouts="overlay")


# -- special files and ownership ----------------------------------------------------


def test_fifo_is_made(root: Path) -> None:
    apply(root, tm.tar(tm.header("p", type=b"6", mode=0o620)))
    assert stat.S_ISFIFO((root / "p").lstat().st_mode)
    assert mode_of(root / "p") == 0o620


def test_devices_are_skipped_when_unprivileged(root: Path) -> None:
    apply(root, tm.tar(tm.header("null", type=b"3", devmajor=1, devminor=3)), privileged=False)
    assert not (root / "null").exists()


def test_devices_are_made_when_privileged(root: Path) -> None:
    require_root()
    apply(root, tm.tar(tm.header("null", type=b"3", devmajor=1, devminor=3, mode=0o666),
                       tm.header("blk", type=b"4", devmajor=7, devminor=200, mode=0o660)))
    st = (root / "null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE(st.st_mode) == 0o666
    assert stat.S_ISBLK((root / "blk").lstat().st_mode)


def test_ownership_is_set_when_privileged(root: Path) -> None:
    require_root()
    apply(root, tm.tar(tm.directory("d", uid=5, gid=6), tm.file("d/f", b"x", uid=7, gid=8),
                       tm.symlink("d/l", "f", uid=9, gid=10),
                       tm.file("d/suid", b"x", uid=11, gid=12, mode=0o6755)))
    assert ((root / "d").stat().st_uid, (root / "d").stat().st_gid) == (5, 6)
    assert ((root / "d/f").stat().st_uid, (root / "d/f").stat().st_gid) == (7, 8)
    assert ((root / "d/l").lstat().st_uid, (root / "d/l").lstat().st_gid) == (9, 10)
    assert mode_of(root / "d/suid") == 0o6755  # chmod after chown keeps setuid


def test_ownership_is_left_alone_when_unprivileged(root: Path) -> None:
    apply(root, tm.tar(tm.file("f", b"x", uid=4242, gid=4242)), privileged=False)
    assert (root / "f").stat().st_uid == os.geteuid()


def test_id_maps_translate_container_ids_to_host_ids(root: Path) -> None:
    require_root()
    apply(root, tm.tar(tm.file("a/f", b"x", uid=0, gid=0), tm.file("g", b"y", uid=1000, gid=50)),
          uid_map=[(0, 100000, 65536)], gid_map=[(0, 200000, 65536)])
    st = (root / "a/f").stat()
    assert (st.st_uid, st.st_gid) == (100000, 200000)
    st = (root / "g").stat()
    assert (st.st_uid, st.st_gid) == (101000, 200050)
    st = (root / "a").stat()  # implied parent: the mapped root
    assert (st.st_uid, st.st_gid) == (100000, 200000)


def test_an_id_outside_the_map_is_refused(root: Path) -> None:
    with pytest.raises(InvalidArchive, match="uid 70000") as err:
        apply(root, tm.tar(tm.file("f", b"x", uid=70000)), privileged=True,
              uid_map=[(0, 100000, 65536)])
    assert err.value.entry == "f"


def test_xattrs_from_pax_records(root: Path) -> None:
    require_user_xattrs(root)
    apply(root, tm.tar(tm.pax({"SCHILY.xattr.user.comment": b"bin\0ary"}), tm.file("f", b"x"),
                       tm.pax({"SCHILY.xattr.user.d": b"dir"}), tm.directory("d")))
    assert os.getxattr(root / "f", "user.comment") == b"bin\0ary"
    assert os.getxattr(root / "d", "user.d") == b"dir"


def test_xattr_eperm_is_tolerated(root: Path) -> None:
    # user.* xattrs are not allowed on symlinks: EPERM, which Docker logs and skips.
    apply(root, tm.tar(tm.pax({"SCHILY.xattr.user.x": b"1"}), tm.symlink("l", "t")))
    assert os.readlink(root / "l") == "t"


# -- formats -------------------------------------------------------------------------


def test_pax_overrides_path_linkpath_size_ids_and_times(root: Path) -> None:
    long = "deep/" + "n" * 150 + "/file"
    target = "t" * 120
    data = b"0123456789"
    apply(root, tm.tar(
        tm.pax({"path": long, "size": str(len(data)), "mtime": f"{MTIME}.25", "atime": "1"}),
        tm.header("short", size=0) + tm.pad(data),
        tm.pax({"linkpath": target}), tm.symlink("link", "ignored"),
    ))
    p = root / long
    assert p.read_bytes() == data
    assert p.stat().st_mtime_ns == MTIME * 10**9 + 250_000_000
    assert os.readlink(root / "link") == target


def test_gnu_long_names_and_long_links(root: Path) -> None:
    name = "g/" + "x" * 200
    link = "y" * 180
    apply(root, tm.tar(tm.gnu_long(b"L", name), tm.file("trunc", b"data"),
                       tm.gnu_long(b"K", link), tm.gnu_long(b"L", "sl"), tm.symlink("t2", "short")))
    assert (root / name).read_bytes() == b"data"
    assert os.readlink(root / "sl") == link


def test_ustar_prefix_is_joined(root: Path) -> None:
    apply(root, tm.tar(tm.file("name.txt", b"p", prefix=b"pre/fix")))
    assert (root / "pre/fix/name.txt").read_bytes() == b"p"


def test_base256_numbers(root: Path) -> None:
    require_root()
    apply(root, tm.tar(tm.file("f", b"abc", raw_fields={
        "uid": tm.base256(3_000_000, 8), "size": tm.base256(3, 12)})))
    assert (root / "f").read_bytes() == b"abc"
    assert (root / "f").stat().st_uid == 3_000_000


def test_global_pax_header_is_ignored(root: Path) -> None:
    apply(root, tm.tar(tm.pax({"comment": "git archive"}, type=b"g", name="pax_global_header"),
                       tm.file("f", b"x")))
    assert sorted(os.listdir(root)) == ["f"]


def test_tarfile_made_archive_applies(root: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(3):
            ti = tarfile.TarInfo(f"dir{i}/" + "f" * 120)
            ti.size = 4
            tf.addfile(ti, io.BytesIO(b"data"))
    apply(root, buf.getvalue())
    assert (root / "dir2" / ("f" * 120)).read_bytes() == b"data"


def test_trailing_bytes_after_the_end_are_drained(root: Path) -> None:
    stream = io.BytesIO(tm.tar(tm.file("f", b"x")) + b"\0" * 5000 + b"junk")
    apply_tar(root, stream, ApplyOptions())
    assert stream.read() == b""


def test_tar_without_end_blocks_is_accepted(root: Path) -> None:
    apply(root, tm.file("f", b"x"))
    assert (root / "f").read_bytes() == b"x"


def test_empty_stream_is_an_empty_layer(root: Path) -> None:
    assert apply(root, b"") == 0
    assert os.listdir(root) == []


def test_gnu_sparse_is_refused_by_name(root: Path) -> None:
    with pytest.raises(InvalidArchive, match="sparse") as err:
        apply(root, tm.tar(tm.header("sp", type=b"S", magic=b"ustar  \0")))
    assert err.value.entry == "sp"


# -- whiteouts -----------------------------------------------------------------------


def test_delete_whiteout_removes_a_file_and_a_tree(root: Path) -> None:
    (root / "f").write_text("x")
    (root / "d/sub").mkdir(parents=True)
    (root / "d/sub/g").write_text("y")
    apply(root, tm.tar(tm.file(".wh.f"), tm.file(".wh.d"), tm.file(".wh.never-there")))
    assert os.listdir(root) == []


def test_delete_opaque_keeps_only_what_this_tar_unpacked(root: Path) -> None:
    (root / "d/old/deep").mkdir(parents=True)
    (root / "d/old/deep/f").write_text("lower")
    (root / "d/lowerfile").write_text("lower")
    (root / "other").write_text("untouched")
    apply(root, tm.tar(tm.directory("d"), tm.file("d/new", b"n"), tm.directory("d/kept"),
                       tm.file("d/kept/x", b"x"), tm.file("d/.wh..wh..opq")))
    assert sorted(os.listdir(root / "d")) == ["kept", "new"]
    assert os.listdir(root / "d/kept") == ["x"]
    assert (root / "other").read_text() == "untouched"


def test_overlay_whiteout_is_a_0_0_char_device(root: Path) -> None:
    try:
        apply(root, tm.tar(tm.directory("d"), tm.file("d/.wh.gone")), whiteouts="overlay")
    except PermissionError:
        skip_or_fail("cannot make a whiteout device here (mknod of a 0/0 char device needs CAP_MKNOD)")
    st = (root / "d/gone").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert not (root / "d/.wh.gone").exists()


def test_overlay_opaque_sets_the_xattr(root: Path) -> None:
    require_user_xattrs(root)
    apply(root, tm.tar(tm.directory("d"), tm.file("d/.wh..wh..opq"), tm.file("d/f", b"x")),
          whiteouts="overlay", opaque_xattr="user.overlay.opaque")
    assert os.getxattr(root / "d", "user.overlay.opaque") == b"y"
    assert sorted(os.listdir(root / "d")) == ["f"]


def test_overlay_trusted_opaque_xattr_as_root(root: Path) -> None:
    require_root()
    apply(root, tm.tar(tm.file("d/.wh..wh..opq")), whiteouts="overlay")
    assert os.getxattr(root / "d", "trusted.overlay.opaque") == b"y"


def test_overlay_mode_drops_overlay_private_xattrs_from_the_tar(root: Path) -> None:
    require_user_xattrs(root)
    apply(root, tm.tar(tm.pax({"SCHILY.xattr.user.overlay.redirect": b"/etc"}),
                       tm.directory("d")), whiteouts="overlay")
    assert "user.overlay.redirect" not in os.listxattr(root / "d")


@pytest.mark.parametrize(("key", "kept"), [
    ("user.overlay.redirect", False), ("user.overlay.metacopy", False), ("user.overlay.opaque", False),
    ("user.overlay.", False), ("user.overlayfoo", True), ("user.overlay", True), ("user.other", True),
])
def test_drop_overlay_xattrs_is_an_option_of_its_own(root: Path, key: str, kept: bool) -> None:
    """Issue 16: in delete mode too (an overlay base layer), overlayfs's own names go,
    their neighbours stay; without the option (vfs) everything stays."""
    try:
        os.setxattr(root, "user.probe", b"1")
    except OSError:
        skip_or_fail("no user xattrs on this filesystem")
    data = tm.tar(tm.pax({f"SCHILY.xattr.{key}": b"/etc"}), tm.directory("d"))
    apply(root, data, whiteouts="delete", drop_overlay_xattrs=True)
    assert (key in os.listxattr(root / "d")) is kept
    other = root.parent / "plain"
    apply(other, data, whiteouts="delete")
    assert key in os.listxattr(other / "d")


def test_aufs_metadata_is_skipped(root: Path) -> None:
    apply(root, tm.tar(tm.directory(".wh..wh.plnk"), tm.file(".wh..wh.plnk/123.4", b"x"),
                       tm.file(".wh..wh.aufs"), tm.file("real", b"r")))
    assert sorted(os.listdir(root)) == ["real"]
