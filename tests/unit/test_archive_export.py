"""Layer tars out: tar_tree and tar_changes, read back with tarfile and GNU tar.

The checks follow Docker's archive.Tar / ExportChanges: relative names, "/" on
directories, byte-order depth-first walk, whole-second mtimes, numeric owners, the
file-type bits in the mode field, hardlinks as links to the first name, xattrs as
SCHILY.xattr records (overlayfs's own left out), overlay whiteouts converted.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_root, require_tool
from conftest import write_file as write
from lamina.archive import export as export_mod
from lamina.archive.change import Change, ChangeKind
from lamina.archive.changes import changes_dirs
from lamina.archive.export import tar_changes, tar_tree
from lamina.errors import InvalidArchive, UnsupportedFilesystem

M, A, D = ChangeKind.MODIFY, ChangeKind.ADD, ChangeKind.DELETE


def as_bytes(chunks: Iterator[bytes]) -> bytes:
    return b"".join(chunks)


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return tf.getmembers()


def contents(data: bytes) -> dict[str, bytes]:
    """The data of every regular-file entry, by name."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            if m.isreg():
                out[m.name] = tf.extractfile(m).read()  # type: ignore[union-attr]
    return out


def raw_names(data: bytes) -> list[bytes]:
    """Names exactly as stored (tarfile drops a directory's trailing '/')."""
    return [os.fsencode(line) for line in _gnu_list(data)]


def _gnu_list(data: bytes) -> list[str]:
    require_tool("tar")
    out = subprocess.run(["tar", "-tf", "-"], input=data, capture_output=True, check=True)
    return out.stdout.decode("utf-8", "surrogateescape").splitlines()


def by_name(data: bytes) -> dict[str, tarfile.TarInfo]:
    return {m.name: m for m in members(data)}


# -- tar_tree -----------------------------------------------------------------------


def test_names_order_and_types(tmp_path: Path) -> None:
    write(tmp_path / "a" / "x", "ax")
    write(tmp_path / "a-b", "ab")
    write(tmp_path / "a.txt", "at")
    (tmp_path / "empty").mkdir()
    os.symlink("a/x", tmp_path / "sym")
    os.mkfifo(tmp_path / "fifo")
    data = as_bytes(tar_tree(tmp_path))
    # Go's WalkDir order: each directory's names sorted, depth first
    assert _gnu_list(data) == ["a/", "a/x", "a-b", "a.txt", "empty/", "fifo", "sym"]
    m = by_name(data)
    assert m["a"].isdir() and m["empty"].isdir()
    assert m["a/x"].isreg() and contents(data)["a/x"] == b"ax"
    assert m["sym"].issym() and m["sym"].linkname == "a/x" and m["sym"].size == 0
    assert m["fifo"].isfifo()
    # Docker's FileInfoHeader keeps the file-type bits in the mode field
    assert m["a/x"].mode == stat.S_IFREG | 0o644
    assert m["a"].mode == stat.S_IFDIR | 0o755
    assert m["sym"].mode == stat.S_IFLNK | 0o777
    assert m["fifo"].mode & ~0o7777 == stat.S_IFIFO
    # numeric owners only, no names
    assert all(x.uname == "" and x.gname == "" for x in m.values())
    # the archive ends with two zero blocks and is whole blocks
    assert len(data) % 512 == 0 and data.endswith(bytes(1024))


def test_root_is_not_an_entry_and_empty_tree(tmp_path: Path) -> None:
    data = as_bytes(tar_tree(tmp_path))
    assert data == bytes(1024)


def test_modes_times_and_owners(tmp_path: Path) -> None:
    f = write(tmp_path / "suid", "s", 0o4755)
    g = write(tmp_path / "sticky-dir" / "f", "f")
    os.chmod(g.parent, 0o1777)
    os.utime(f, ns=(0, 1_600_000_000_999_999_999))  # ns are dropped, not rounded
    os.utime(g, ns=(0, 5))
    data = as_bytes(tar_tree(tmp_path))
    m = by_name(data)
    assert m["suid"].mode & 0o7777 == 0o4755
    assert m["sticky-dir"].mode & 0o7777 == 0o1777
    assert m["suid"].mtime == 1_600_000_000
    assert m["sticky-dir/f"].mtime == 0
    assert not any(m2.pax_headers.get("atime") or m2.pax_headers.get("ctime") for m2 in m.values())
    if os.geteuid() == 0:
        os.chown(f, 3_000_000, 7)  # too big for the ustar field: a PAX uid record
        m = by_name(as_bytes(tar_tree(tmp_path)))
        assert (m["suid"].uid, m["suid"].gid) == (3_000_000, 7)
        assert m["suid"].pax_headers["uid"] == "3000000"


def test_hardlinks_first_name_is_the_file(tmp_path: Path) -> None:
    write(tmp_path / "b" / "orig", "data")
    os.link(tmp_path / "b" / "orig", tmp_path / "a-link")
    os.link(tmp_path / "b" / "orig", tmp_path / "c-link")
    m = members(as_bytes(tar_tree(tmp_path)))
    names = [x.name for x in m]
    assert names == ["a-link", "b", "b/orig", "c-link"]
    first, later = m[0], [m[2], m[3]]
    assert first.isreg() and first.size == 4
    for x in later:
        assert x.islnk() and x.linkname == "a-link" and x.size == 0


def test_long_and_unicode_names(tmp_path: Path) -> None:
    long_dir = "d" * 120
    deep = Path(long_dir) / ("e" * 90) / ("f" * 99)
    write(tmp_path / deep, "deep")
    write(tmp_path / "ünïcødé", "u")
    write(tmp_path / ("n" * 200), "single long component")
    target = "t" * 150
    os.symlink(target, tmp_path / "longlink")
    raw = os.fsencode("bad-\udcff-utf8")  # a name that is not UTF-8
    write(tmp_path / os.fsdecode(raw), "b")
    data = as_bytes(tar_tree(tmp_path))
    m = by_name(data)
    assert contents(data)[str(deep)] == b"deep"
    assert m["ünïcødé"].pax_headers["path"] == "ünïcødé"
    assert contents(data)["n" * 200] == b"single long component"
    assert m["longlink"].linkname == target
    assert os.fsencode(long_dir + "/") in raw_names(data)
    assert any(os.fsencode(n) == raw for n in m) or raw in raw_names(data)


def test_special_files_and_sockets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / "sock"))
        write(tmp_path / "file", "f")
        if os.geteuid() == 0:
            os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
            os.mknod(tmp_path / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
        with caplog.at_level("INFO"):
            m = by_name(as_bytes(tar_tree(tmp_path)))
    finally:
        s.close()
    assert "sock" not in m
    assert "socket" in caplog.text
    if os.geteuid() == 0:
        assert m["null"].ischr() and (m["null"].devmajor, m["null"].devminor) == (1, 3)
        assert m["blk"].isblk() and (m["blk"].devmajor, m["blk"].devminor) == (7, 200)


def test_xattrs_exported_except_overlays_own(tmp_path: Path) -> None:
    f = write(tmp_path / "f", "f")
    os.setxattr(f, "user.note", b"hello\x00binary")
    os.setxattr(f, "user.overlay.origin", b"skip me")
    if os.geteuid() == 0:
        os.setxattr(f, "trusted.app", b"t")
        os.setxattr(f, "trusted.overlay.opaque", b"y")
        rev3 = bytes([0, 0, 0, 3]) + bytes(range(1, 17)) + bytes([0xAA, 0xBB, 0xCC, 0xDD])
        os.setxattr(f, "security.capability", rev3)
    pax = by_name(as_bytes(tar_tree(tmp_path)))["f"].pax_headers

    def value(key: str) -> bytes:
        return pax[key].encode("utf-8", "surrogateescape")

    assert value("SCHILY.xattr.user.note") == b"hello\x00binary"
    assert not any("overlay" in k for k in pax)
    if os.geteuid() == 0:
        assert value("SCHILY.xattr.trusted.app") == b"t"
        # revision 3 (with a namespace root uid) goes out as revision 2, 20 bytes
        assert value("SCHILY.xattr.security.capability") == bytes([0, 0, 0, 2]) + bytes(range(1, 17))


def test_big_files_stream_in_bounded_chunks(tmp_path: Path) -> None:
    big = os.urandom(3 * export_mod.CHUNK + 12345)
    write(tmp_path / "big", big)
    for i in range(300):
        write(tmp_path / "small" / f"{i:03d}", os.urandom(5000))
    chunks = list(tar_tree(tmp_path))
    assert max(len(c) for c in chunks) <= export_mod.CHUNK + export_mod._BIG_FILE + 4096
    assert len(chunks) > 4
    data = b"".join(chunks)
    m = by_name(data)
    assert contents(data)["big"] == big
    assert len(m) == 302


def test_file_that_shrinks_while_streaming_keeps_the_tar_valid(tmp_path: Path) -> None:
    f = write(tmp_path / "big", b"A" * (2 * export_mod.CHUNK))
    write(tmp_path / "z-after", "after")
    it = tar_tree(tmp_path)
    first = next(it)  # holds big's header; the data comes next
    os.truncate(f, 1000)
    data = first + b"".join(it)
    m = by_name(data)
    assert m["big"].size == 2 * export_mod.CHUNK
    assert contents(data)["big"] == b"A" * 1000 + bytes(2 * export_mod.CHUNK - 1000)
    assert contents(data)["z-after"] == b"after"


def test_closing_the_stream_early_releases_files(tmp_path: Path) -> None:
    write(tmp_path / "big", b"A" * (3 * export_mod.CHUNK))
    before = len(os.listdir("/proc/self/fd"))
    it = tar_tree(tmp_path)
    next(it)
    next(it)
    it.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_id_maps_host_to_container(tmp_path: Path) -> None:
    require_root()
    f = write(tmp_path / "f", "f")
    os.chown(f, 100_005, 100_007)
    os.chown(tmp_path, 100_000, 100_000)
    maps = [(0, 100_000, 65536)]
    m = by_name(as_bytes(tar_tree(tmp_path, uid_map=maps, gid_map=maps)))
    assert (m["f"].uid, m["f"].gid) == (5, 7)
    os.chown(f, 5, 5)  # outside the mapped range
    with pytest.raises(InvalidArchive, match="f: host uid 5"):
        as_bytes(tar_tree(tmp_path, uid_map=maps, gid_map=maps))


def test_overlay_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    require_root()
    (tmp_path / "d").mkdir()
    os.mknod(tmp_path / "d" / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    os.chown(tmp_path / "d" / "gone", 100_003, 100_004)
    os.mknod(tmp_path / "realdev", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    for p in (tmp_path / "d", tmp_path / "realdev"):
        os.chown(p, 100_000, 100_000)
    opq = tmp_path / "opq"
    opq.mkdir(mode=0o750)
    os.chmod(opq, 0o2750)
    os.chown(opq, 100_001, 100_002)
    os.setxattr(opq, "trusted.overlay.opaque", b"y")
    os.setxattr(opq, "user.keep", b"k")
    for name in ("-first", "inside"):  # "-first" sorts before the marker
        os.chown(write(opq / name, name), 100_000, 100_000)
    maps = [(0, 100_000, 65536)]
    data = as_bytes(tar_tree(tmp_path, whiteouts="overlay", uid_map=maps, gid_map=maps))
    names = _gnu_list(data)
    assert names == ["d/", "d/.wh.gone", "opq/", "opq/.wh..wh..opq", "opq/-first", "opq/inside", "realdev"]
    m = by_name(data)
    wo = m["d/.wh.gone"]
    assert wo.isreg() and wo.size == 0 and wo.mode == 0o600
    assert (wo.uid, wo.gid) == (100_003, 100_004)  # kernel-made: not mapped
    marker = m["opq/.wh..wh..opq"]
    assert marker.isreg() and marker.size == 0 and marker.mode == 0o750 and marker.mtime == 0
    assert (marker.uid, marker.gid) == (1, 2)
    assert m["opq"].pax_headers == {"SCHILY.xattr.user.keep": "k"}
    assert m["realdev"].ischr()
    # without overlay mode the same tree is plain: a device, a dir without marker
    plain = by_name(as_bytes(tar_tree(tmp_path)))
    assert plain["d/gone"].ischr() and "opq/.wh..wh..opq" not in plain


def test_user_overlay_opaque_for_rootless(tmp_path: Path) -> None:
    opq = tmp_path / "opq"
    write(opq / "f", "f")
    os.setxattr(opq, "user.overlay.opaque", b"y")
    data = as_bytes(tar_tree(tmp_path, whiteouts="overlay", opaque_xattr="user.overlay.opaque"))
    assert _gnu_list(data) == ["opq/", "opq/.wh..wh..opq", "opq/f"]
    assert by_name(data)["opq"].pax_headers == {}


def test_overlay_redirect_is_refused(tmp_path: Path) -> None:
    require_root()
    (tmp_path / "renamed").mkdir()
    os.setxattr(tmp_path / "renamed", "trusted.overlay.redirect", b"/orig")
    with pytest.raises(UnsupportedFilesystem, match="redirect"):
        as_bytes(tar_tree(tmp_path, whiteouts="overlay"))


def test_roundtrip_through_gnu_tar(tmp_path: Path) -> None:
    require_tool("tar")
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "etc" / "conf", "c" * 777, 0o640)
    write(src / "bin" / "tool", os.urandom(300_000), 0o4755)
    os.link(src / "bin" / "tool", src / "bin" / "tool2")
    os.symlink("../etc/conf", src / "bin" / "conf-link")
    (src / "var" / "empty").mkdir(parents=True)
    os.setxattr(src / "etc" / "conf", "user.a", b"1")
    os.mkfifo(src / "var" / "pipe")
    if os.geteuid() == 0:
        os.chown(src / "etc" / "conf", 12, 34)
    dst.mkdir()
    tar = as_bytes(tar_tree(src))
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-", "-C", str(dst)],
        input=tar, check=True,
    )
    # Docker's rules see no difference: mtimes came back as whole seconds
    assert changes_dirs(dst, src) == []
    assert os.getxattr(dst / "etc" / "conf", "user.a") == b"1"
    assert os.stat(dst / "bin" / "tool").st_ino == os.stat(dst / "bin" / "tool2").st_ino


# -- tar_changes --------------------------------------------------------------------


def _changed_pair(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old", tmp_path / "new"
    write(old / "etc" / "conf", "old")
    write(old / "etc" / "drop", "d")
    write(old / "tree" / "sub" / "leaf", "l")
    write(old / "keep", "k")
    shutil.copytree(old, new, symlinks=True, copy_function=shutil.copy2)
    write(new / "etc" / "conf", "new content")
    (new / "etc" / "drop").unlink()
    shutil.rmtree(new / "tree")
    write(new / "added" / "a", "a")
    os.link(new / "added" / "a", new / "added" / "b")
    return old, new


def test_tar_changes_entries_and_whiteouts(tmp_path: Path) -> None:
    old, new = _changed_pair(tmp_path)
    changes = changes_dirs(new, old)
    data = as_bytes(tar_changes(new, list(reversed(changes))))  # sorts them itself
    assert _gnu_list(data) == [
        # by change path: /etc/conf < /etc/drop, whatever the names become
        "added/", "added/a", "added/b", "etc/", "etc/conf", "etc/.wh.drop", ".wh.tree",
    ]
    m = by_name(data)
    for name in ("etc/.wh.drop", ".wh.tree"):
        assert m[name].isreg() and m[name].size == 0 and m[name].mode == 0
        assert (m[name].uid, m[name].gid) == (0, 0)
    assert contents(data)["etc/conf"] == b"new content"
    assert m["added/b"].islnk() and m["added/b"].linkname == "added/a"


def test_tar_changes_is_not_recursive_and_skips_vanished(tmp_path: Path) -> None:
    write(tmp_path / "dir" / "child", "c")
    changes = [Change("/dir", M), Change("/gone", A), Change("/", M)]
    data = as_bytes(tar_changes(tmp_path, changes))
    assert _gnu_list(data) == ["dir/"]


def test_tar_changes_never_reads_through_a_swapped_symlink(tmp_path: Path) -> None:
    """A live container replaces a changed file's directory by a symlink to the host
    between changes and export: the entry is left out, nothing outside is read."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(outside / "secret", "host data")
    write(root / "dir" / "secret", "layer data")
    changes = [Change("/dir", M), Change("/dir/secret", A)]
    shutil.rmtree(root / "dir")
    os.symlink(outside, root / "dir")
    data = as_bytes(tar_changes(root, changes))
    assert b"host data" not in data
    m = by_name(data)
    assert "dir/secret" not in m
    assert m["dir"].issym()  # the entry itself is what is there now: a symlink


def test_tar_changes_roundtrip_with_apply(tmp_path: Path) -> None:
    """old + export(changes(new, old)) == new, through the apply engine."""
    from lamina.archive import apply as apply_mod
    old, new = _changed_pair(tmp_path)
    data = as_bytes(tar_changes(new, changes_dirs(new, old)))
    target = tmp_path / "target"
    shutil.copytree(old, target, symlinks=True, copy_function=shutil.copy2)
    apply_mod.apply_tar(target, io.BytesIO(data))
    assert changes_dirs(target, new) == []


def test_tar_tree_roundtrip_with_apply(tmp_path: Path) -> None:
    from lamina.archive import apply as apply_mod
    src = tmp_path / "src"
    write(src / "a" / "f", os.urandom(70_000), 0o600)
    os.link(src / "a" / "f", src / "hl")
    os.symlink("a/f", src / "s")
    os.setxattr(src / "a", "user.x", b"y")
    dst = tmp_path / "dst"
    dst.mkdir()
    size = apply_mod.apply_tar(dst, io.BytesIO(as_bytes(tar_tree(src))))
    assert size == 70_000
    assert changes_dirs(dst, src) == []
    assert os.getxattr(dst / "a", "user.x") == b"y"


# -- the header writer ----------------------------------------------------------------


def test_pax_record_length_counts_itself() -> None:
    from lamina.archive.tar.pax import record as pax_record

    for n in range(0, 1100):
        rec = pax_record(b"k", b"v" * n)
        length, _, rest = rec.partition(b" ")
        assert int(length) == len(rec), n
        assert rest == b"k=" + b"v" * n + b"\n"


@pytest.mark.parametrize(
    "name",
    [
        "n" * 100,  # fits the name field exactly, no NUL
        "p" * 155 + "/" + "n" * 100,  # the largest ustar split
        "p" * 156 + "/" + "n" * 10,  # prefix one too long: PAX path
        "p" * 20 + "/" + "n" * 101,  # last component too long: PAX path
        "a/" * 60 + "end",
        "d" * 99 + "/",  # a directory name of 100 bytes with its slash
        "ü" * 30,
    ],
)
def test_header_names_read_back(name: str) -> None:
    from lamina.archive.tar import writer as tw

    raw = os.fsencode(name)
    typeflag = tw.DIRTYPE if name.endswith("/") else tw.REGTYPE
    data = tw.header(raw, 0o100644, 1, 2, 0, 1_700_000_000, typeflag) + tw.END_OF_ARCHIVE
    (m,) = members(data)
    assert m.name == name.rstrip("/")
    assert (m.uid, m.gid, m.mtime) == (1, 2, 1_700_000_000)
    long_or_unicode = len(raw) > 100 or not raw.isascii()
    fits = tw.ustar_split(raw) is not None and raw.isascii()
    assert ("path" in m.pax_headers) == (long_or_unicode and not fits)


def test_header_big_numbers_go_to_pax() -> None:
    from lamina.archive.tar import writer as tw

    size = 0o77777777777 + 1  # 8 GiB: one more than the 12-byte field holds
    data = tw.header(b"f", 0o100644, 2**21, 2**22, size, -5, tw.REGTYPE)
    # read only the header: the data would be 8 GiB
    info = tarfile.TarInfo.frombuf(data[-512:], "utf-8", "surrogateescape")
    assert info.size == 0  # the ustar field overflowed and holds 0
    with tarfile.open(fileobj=io.BytesIO(data + bytes(1024)), mode="r:") as tf:
        m = tf.next()
        assert m is not None
        assert (m.uid, m.gid, m.size, m.mtime) == (2**21, 2**22, size, -5)
