"""The windowsfilter driver's seed behaviours (chain file, ID indirection, the -init
parent, -removing recovery, Status, GetMetadata, refusal of a bad filesystem, the size
option) and its sandboxes: the union view, and their export as a Windows diff layer
that hcsshim's importer accepts."""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from winfixtures import driver_at, export, import_layer, sandbox
from wintarmaker import BA, BU, SY, SYSTEM_FILE_SD, LayerTar, decode_sd, hcs_check

from conftest import layer_hold, require_root
from lamina.archive.change import Change, ChangeKind
from lamina.drivers.base import CreateOptions, DriverContext
from lamina.drivers.windowsfilter import WindowsFilterDriver
from lamina.errors import InvalidLayerID, InvalidOption, ParentNotFound, UnsupportedFilesystem
from lamina.fs.mount import is_mountpoint, mount, umount


@pytest.fixture
def wf(tmp_path: Path) -> Iterator[WindowsFilterDriver]:
    yield from driver_at(tmp_path)


def base_tar() -> bytes:
    t = LayerTar.base_layer()
    t.dir("Files/app")
    t.file("Files/app/tool.exe", b"MZ tool", streams={"Zone.Identifier": b"ZoneId=3"})
    t.file("Files/app/readme.txt", b"read me")
    t.dir("Files/data")
    t.file("Files/data/a.dat", b"a")
    t.file("Files/data/b.dat", b"b")
    return t.bytes()


def child_tar() -> bytes:
    t = LayerTar.diff_layer()
    t.dir("Files/app")
    t.file("Files/app/update.dll", b"update")
    t.file("Hives/Software_Delta", b"regf delta")
    return t.bytes()


# -- the chain file, IDs, -init ------------------------------------------------------------


def test_layerchain_json_is_the_seeds_bytes(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, base_tar())
    import_layer(wf, "child", "base", child_tar())
    wf.create("ctr", "child", rw=True, opts=CreateOptions())
    layers = wf.ctx.layers
    assert (layers / "base/layerchain.json").read_bytes() == b"null"
    assert (layers / "child/layerchain.json").read_bytes() == f'["{layers}/base"]'.encode()
    assert json.loads((layers / "ctr/layerchain.json").read_bytes()) == [f"{layers}/child", f"{layers}/base"]
    assert wf.get_layer_chain("ctr") == [str(layers / "child"), str(layers / "base")]
    assert stat.S_IMODE((layers / "ctr/layerchain.json").stat().st_mode) == 0o600


def test_init_parent_without_files_is_left_out_of_the_chain(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "img", None, base_tar())
    wf.create("ctr-init", "img", rw=True, opts=CreateOptions())  # read-write: no Files/
    wf.create("ctr", "ctr-init", rw=True, opts=CreateOptions())
    assert not (wf.dir("ctr-init") / "Files").exists()
    assert wf.get_layer_chain("ctr") == [str(wf.dir("img"))]
    view = wf.mount("ctr", ["ctr", "ctr-init", "img"], rw=True)
    assert (view / "app/readme.txt").read_bytes() == b"read me"


def test_missing_parent_is_refused(wf: WindowsFilterDriver) -> None:
    with pytest.raises(ParentNotFound, match="missing parent nothere"):
        wf.create("x", "nothere", rw=False, opts=CreateOptions())
    assert not wf.dir("x").exists()


@pytest.mark.parametrize("spelling", ["layerID", "layerId"])
def test_layer_id_indirection(wf: WindowsFilterDriver, spelling: str) -> None:
    data = base_tar()
    import_layer(wf, "old", None, data)
    wf.dir("new").mkdir()
    (wf.dir("new") / spelling).write_text("old")
    assert wf.resolve_id("new") == "old"
    assert wf.exists("new")
    assert export(wf, "new") == data
    view = wf.mount("new", [], rw=False)
    assert (view / "app/readme.txt").read_bytes() == b"read me"
    wf.unmount("new")
    wf.create("kid", "new", rw=False, opts=CreateOptions())
    assert wf.get_layer_chain("kid") == [str(wf.dir("old"))]
    wf.remove("new")  # the target goes, and so does the folder that pointed at it
    assert not wf.dir("old").exists() and not wf.dir("new").exists()


def test_set_id_writes_layerId_and_bad_ids_are_refused(wf: WindowsFilterDriver) -> None:
    wf.create("a", None, rw=False, opts=CreateOptions())
    wf.set_id("a", "b")
    assert (wf.dir("a") / "layerId").read_bytes() == b"b"
    assert wf.resolve_id("a") == "b"
    (wf.dir("a") / "layerId").write_text("../../etc")
    with pytest.raises(InvalidLayerID):
        wf.resolve_id("a")
    assert not wf.exists("a")


# -- remove, cleanup, status, metadata ----------------------------------------------------------


def test_remove_renames_then_deletes_and_tolerates_a_missing_layer(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, base_tar())
    wf.remove("base")
    assert os.listdir(wf.ctx.layers) == []
    wf.remove("base")  # gone already: fine


def test_remove_releases_mounts_a_crash_left(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, base_tar())
    view = sandbox(wf, "ctr", "base")
    (view / "new.txt").write_text("x")
    wf.remove("ctr")  # still mounted, as after a crash
    assert not wf.dir("ctr").exists() and not is_mountpoint(view)
    assert (wf.dir("base") / "Files/app/readme.txt").exists()


def test_cleanup_finishes_interrupted_removals(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, base_tar())
    view = sandbox(wf, "ctr", "base")
    layers = wf.ctx.layers
    # a crash between the rename and the delete, with the sandbox still mounted
    wf.unmount("ctr")
    wf.mount("ctr", [], rw=True)
    os.rename(layers / "ctr", layers / "ctr-removing")
    (layers / "gone-removing").mkdir()
    (layers / "gone-removing/Files").mkdir()
    done = wf.cleanup({"base"}, layer_hold(wf.ctx.root / "locks", {"base"}))
    assert sorted(done) == ["removed ctr-removing (an interrupted removal)",
                            "removed gone-removing (an interrupted removal)"]
    assert sorted(os.listdir(layers)) == ["base"]
    assert not is_mountpoint(view)


def test_cleanup_drops_a_dead_imports_staging(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, base_tar())
    stale = wf.dir("base") / ".import-99999"
    (stale / "Files").mkdir(parents=True)
    assert wf.cleanup({"base"}, layer_hold(wf.ctx.root / "locks", {"base"})) == [
        "removed base/.import-99999 (an import that died)"]
    assert not stale.exists()


def test_status_and_metadata_are_the_seeds(wf: WindowsFilterDriver) -> None:
    assert wf.status() == [("Windows", "")]
    assert wf.metadata("abc") == {"dir": str(wf.ctx.layers / "abc")}


def test_unsupported_filesystem_is_refused_at_init(tmp_path: Path) -> None:
    require_root()
    ram = tmp_path / "ram"
    ram.mkdir()
    mount("ramfs", ram, "ramfs")
    try:
        with pytest.raises(UnsupportedFilesystem, match=r"ramfs filesystem, which cannot hold trusted\.\* xattrs"):
            WindowsFilterDriver(DriverContext(root=ram))
    finally:
        umount(ram)


# -- the sandbox: size, view ---------------------------------------------------------------------


def fill(view: Path, mib: int) -> None:
    chunk = bytes(1 << 20)
    with open(view / "big.bin", "wb") as f:
        for _ in range(mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def test_sandbox_is_sized_and_the_size_option_grows_it(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, base_tar())
    small = sandbox(wf, "small", "base")  # the driver's default here: 64M
    with pytest.raises(OSError) as info:
        fill(small, 100)
    assert info.value.errno == errno.ENOSPC
    grown = sandbox(wf, "grown", "base", Size="160M")  # key case-blind, as in the seed
    fill(grown, 100)
    vfs = os.statvfs(grown)
    assert vfs.f_blocks * vfs.f_frsize >= 160 << 20
    shrunk = sandbox(wf, "shrunk", "base", size="16M")  # grows only, never below the default
    vfs = os.statvfs(shrunk)
    assert vfs.f_blocks * vfs.f_frsize >= 64 << 20


def test_bad_size_option_is_refused_with_the_seeds_words(wf: WindowsFilterDriver) -> None:
    with pytest.raises(InvalidOption, match="Failed to parse storage options"):
        wf.create("x", None, rw=True, opts=CreateOptions(storage_opt={"size": "12Q"}))
    assert not wf.dir("x").exists()


def test_views_show_the_chain_and_a_read_only_layer_stays_read_only(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, base_tar())
    import_layer(wf, "child", "base", child_tar())
    ro = wf.mount("child", [], rw=False)
    assert sorted(os.listdir(ro / "app")) == ["readme.txt", "tool.exe", "tool.exe:Zone.Identifier", "update.dll"]
    with pytest.raises(OSError) as info:
        (ro / "app/new.txt").write_text("x")
    assert info.value.errno == errno.EROFS
    wf.unmount("child")
    view = sandbox(wf, "ctr", "child")
    (view / "app/readme.txt").write_text("edited")
    assert (wf.dir("base") / "Files/app/readme.txt").read_bytes() == b"read me"
    assert wf.is_mounted("ctr")
    wf.unmount("ctr")
    assert not wf.is_mounted("ctr")


# -- sandbox export ---------------------------------------------------------------------------------


def edited_sandbox(wf: WindowsFilterDriver) -> Path:
    import_layer(wf, "base", None, base_tar())
    view = sandbox(wf, "ctr", "base")
    with open(view / "app/tool.exe", "ab") as f:  # a Windows file edited from Linux
        f.write(b" patched")
    os.mkdir(view / "linux")
    (view / "linux/new.txt").write_text("written from Linux")
    os.link(view / "linux/new.txt", view / "linux/again.txt")
    os.symlink("/app/readme.txt", view / "linux/link")
    os.unlink(view / "app/readme.txt")
    for name in os.listdir(view / "data"):  # a folder deleted and made again: opaque
        os.unlink(view / "data" / name)
    os.rmdir(view / "data")
    os.mkdir(view / "data")
    (view / "data/c.dat").write_text("c")
    return view


def members_by_name(data: bytes) -> dict[str, tarfile.TarInfo]:
    return {m.name: m for m in tarfile.open(fileobj=io.BytesIO(data)).getmembers()}


def test_sandbox_exports_a_diff_layer_hcsshim_accepts(wf: WindowsFilterDriver) -> None:
    edited_sandbox(wf)
    data = export(wf, "ctr")
    members = hcs_check(data)
    names = [m.name for m in members]
    assert names[:2] == ["Files", "Hives"]
    assert "Files/.wh.data" not in names  # made again: its old names go one by one
    assert names.index("Files/app/.wh.readme.txt") == names.index("Files/app") + 1
    # the recreated folder: one deletion per name it had below
    assert {"Files/data/.wh.a.dat", "Files/data/.wh.b.dat"} <= set(names)
    assert "Files/data/c.dat" in names
    by = members_by_name(data)
    tool = by["Files/app/tool.exe"]
    assert tool.pax_headers["MSWINDOWS.rawsd"] == base64.b64encode(SYSTEM_FILE_SD).decode()
    assert tool.pax_headers["LIBARCHIVE.creationtime"] == "1600000000.0000001"
    assert tool.size == len(b"MZ tool patched")
    assert "Files/app/tool.exe:Zone.Identifier" in by  # its stream went along
    # the two names of one file: the first in byte order is written whole, the other links
    # to it (with attributes but no descriptor, as hcsshim's BasicInfoHeader writes links)
    first, second = by["Files/linux/again.txt"], by["Files/linux/new.txt"]
    assert first.isreg() and first.size == len("written from Linux")
    assert second.islnk() and second.linkname == "Files/linux/again.txt"
    assert first.pax_headers["MSWINDOWS.fileattr"] == second.pax_headers["MSWINDOWS.fileattr"] == "32"
    owner, group, aces = decode_sd(base64.b64decode(first.pax_headers["MSWINDOWS.rawsd"]))
    assert (owner, group) == (BA, SY) and [a[3] for a in aces] == [BA, SY, BU]
    owner, group, aces = decode_sd(base64.b64decode(by["Files/linux"].pax_headers["MSWINDOWS.rawsd"]))
    assert (owner, group) == (BA, SY) and len(aces) == 7  # the folder default
    assert by["Files/linux"].pax_headers["MSWINDOWS.fileattr"] == "16"
    sym = by["Files/linux/link"]
    assert sym.issym() and sym.linkname == "C:\\app\\readme.txt"
    assert int(sym.pax_headers["MSWINDOWS.fileattr"]) & 0x400


def test_exported_sandbox_imports_back_to_the_same_view(wf: WindowsFilterDriver) -> None:
    view = edited_sandbox(wf)
    before = {str(p.relative_to(view)): p.read_bytes() for p in sorted(view.rglob("*"))
              if p.is_file() and not p.is_symlink()}
    data = export(wf, "ctr")
    import_layer(wf, "committed", "base", data)
    assert export(wf, "committed") == data
    after_view = wf.mount("committed", [], rw=False)
    after = {str(p.relative_to(after_view)): p.read_bytes() for p in sorted(after_view.rglob("*"))
             if p.is_file() and not p.is_symlink()}
    assert after == before


def test_changes_follow_the_seed(wf: WindowsFilterDriver) -> None:
    edited_sandbox(wf)
    changes = wf.changes("ctr", None)
    assert changes == sorted(changes)
    assert Change("/Files/app/readme.txt", ChangeKind.DELETE) in changes
    assert Change("/Files/data/a.dat", ChangeKind.DELETE) in changes
    assert Change("/Files/linux/new.txt", ChangeKind.MODIFY) in changes  # no Add on Windows
    assert Change("/Files/app/tool.exe", ChangeKind.MODIFY) in changes
    assert {c.kind for c in changes} == {ChangeKind.MODIFY, ChangeKind.DELETE}
    wf.unmount("ctr")
    assert wf.changes("ctr", None) == changes  # also with the sandbox not mounted


def test_diff_size_counts_regular_files_once(wf: WindowsFilterDriver) -> None:
    edited_sandbox(wf)
    expected = len(b"MZ tool patched") + len("written from Linux") + len("c")
    assert wf.diff_size("ctr", None) == expected
    import_layer(wf, "child", "base", child_tar())
    assert wf.diff_size("child", None) == len(b"update") + len(b"regf delta")


def test_changes_of_an_imported_layer_list_its_entries(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, base_tar())
    t = LayerTar.diff_layer()
    t.dir("Files/app")
    t.whiteout("Files/app/readme.txt")
    import_layer(wf, "child", "base", t.bytes())
    assert wf.changes("child", None) == [
        Change("/Files", ChangeKind.MODIFY),
        Change("/Files/app", ChangeKind.MODIFY),
        Change("/Files/app/readme.txt", ChangeKind.DELETE),
        Change("/Hives", ChangeKind.MODIFY),
    ]


def test_empty_read_only_layer_exports_files_and_hives(wf: WindowsFilterDriver) -> None:
    wf.create("empty", None, rw=False, opts=CreateOptions())
    assert [m.name for m in hcs_check(export(wf, "empty"))] == ["Files", "Hives"]


def test_deep_chains_mount_past_the_mount_option_page(wf: WindowsFilterDriver) -> None:
    parent = None
    for i in range(48):  # long IDs: the lowerdir list alone is far over 4 KiB
        layer = f"{i:02d}" + "d" * 100
        wf.create(layer, parent, rw=False, opts=CreateOptions())
        parent = layer
    (wf.dir("00" + "d" * 100) / "Files/bottom.txt").write_text("from the base")
    assert len(wf.get_layer_chain(parent)) == 47
    view = wf.mount(parent, [], rw=False)
    assert (view / "bottom.txt").read_text() == "from the base"
    wf.unmount(parent)
    top = sandbox(wf, "ctr", parent)
    assert (top / "bottom.txt").read_text() == "from the base"


def test_driver_is_available_as_root() -> None:
    require_root()
    assert WindowsFilterDriver.unavailable_reason(Path("/")) is None
