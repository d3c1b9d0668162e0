"""Importing Windows layer tars: every record kept, streams, links, deletions, the
base-layer and UVM rules, the BCD backup, the child process, byte-exact export.

Every tar here comes from the independent writer in wintarmaker.py.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from winfixtures import driver_at, export, import_layer
from wintarmaker import DIR_SD, KO_SD, SYSTEM_FILE_SD, LayerTar, Meta

from lamina.drivers.base import CreateOptions
from lamina.drivers.windowsfilter import NOREEXEC_ENV, WindowsFilterDriver
from lamina.drivers.windowsfilter_meta import XATTR_NAME, read_meta
from lamina.errors import InvalidArchive, LaminaError


@pytest.fixture
def wf(tmp_path: Path) -> Iterator[WindowsFilterDriver]:
    yield from driver_at(tmp_path)


def files(wf: WindowsFilterDriver, layer_id: str) -> Path:
    return wf.dir(layer_id) / "Files"


def a_base() -> LayerTar:
    t = LayerTar.base_layer()
    t.dir("Files/Program Files")
    t.file("Files/Program Files/app.exe", b"MZ" + bytes(100))
    return t


# -- metadata ------------------------------------------------------------------------------


def test_every_windows_record_is_kept_as_an_xattr(wf: WindowsFilterDriver) -> None:
    t = a_base()
    meta = Meta(0x27, sd=SYSTEM_FILE_SD, eas={"$CI.CATALOGHINT": b"\x01\x00hint"},
                extra={"MSWINDOWS.sd": "O:BAG:SY", "LIBARCHIVE.future": "x=y\nz"})
    t.file("Files/Windows/notepad.exe", b"MZ notepad", meta=meta)
    import_layer(wf, "base", None, t.bytes())
    path = files(wf, "base") / "Windows/notepad.exe"
    assert read_meta(path) == {
        "MSWINDOWS.fileattr": "39",
        "MSWINDOWS.rawsd": base64.b64encode(SYSTEM_FILE_SD).decode(),
        "MSWINDOWS.sd": "O:BAG:SY",
        "MSWINDOWS.xattr.$CI.CATALOGHINT": base64.b64encode(b"\x01\x00hint").decode(),
        "LIBARCHIVE.creationtime": "1600000000.0000001",
        "LIBARCHIVE.future": "x=y\nz",
        "atime": "1700000100",
        "ctime": "1700000200.0000005",
    }
    st = path.stat()
    assert st.st_mtime_ns == 1_700_000_000_123_456_700  # exact, not through a float
    assert st.st_atime_ns == 1_700_000_100_000_000_000
    # directories keep theirs too, times set after their children were written
    win = files(wf, "base") / "Windows"
    assert read_meta(win)["MSWINDOWS.rawsd"] == base64.b64encode(DIR_SD).decode()
    assert win.stat().st_mtime_ns == 1_700_000_000_123_456_700


def test_alternate_data_streams_are_sibling_files(wf: WindowsFilterDriver) -> None:
    t = a_base()
    t.file("Files/doc.txt", b"text", streams={"Zone.Identifier": b"[ZoneTransfer]\r\nZoneId=3", "s2": b"2"})
    size = import_layer(wf, "base", None, t.bytes())
    folder = files(wf, "base")
    assert (folder / "doc.txt:Zone.Identifier").read_bytes() == b"[ZoneTransfer]\r\nZoneId=3"
    assert (folder / "doc.txt:s2").read_bytes() == b"2"
    hives = sum(len(b"regf" + h.encode() * 10) for h in ("DEFAULT", "SAM", "SECURITY", "SOFTWARE", "SYSTEM"))
    assert size == hives + 102 + 4  # streams are not counted, as in the seed


def test_symlinks_and_junctions_keep_their_windows_target(wf: WindowsFilterDriver) -> None:
    t = a_base()
    t.symlink("Files/Windows/sys", "C:\\Windows\\System32", is_dir=True)
    t.symlink("Files/Windows/rel.txt", "..\\Program Files\\app.exe")
    t.symlink("Files/Documents", "C:\\Users\\Public\\Documents", junction=True)
    import_layer(wf, "base", None, t.bytes())
    folder = files(wf, "base")
    assert os.readlink(folder / "Windows/sys") == "/Windows/System32"
    assert os.readlink(folder / "Windows/rel.txt") == "../Program Files/app.exe"
    junction = read_meta(folder / "Documents")
    assert junction["linkpath"] == "C:\\Users\\Public\\Documents"
    assert junction["MSWINDOWS.mountpoint"] == "1"
    assert junction["MSWINDOWS.fileattr"] == str(0x410)


def test_hard_links_inside_the_tar_and_into_the_chain(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, a_base().bytes())
    child = LayerTar.diff_layer()
    child.dir("Files/Program Files")
    child.hardlink("Files/Program Files/app-copy.exe", "Files/Program Files/app.exe")  # in the parent
    child.hardlink("Files/Program Files/app-case.exe", "Files/PROGRAM FILES/App.EXE")  # NTFS resolves case
    child.file("Files/new.dll", b"dll")
    child.hardlink("Files/new-link.dll", "Files/new.dll")  # in this tar
    size = import_layer(wf, "child", "base", child.bytes())
    assert size == 3
    parent_app = (files(wf, "base") / "Program Files/app.exe").stat()
    for name in ("app-copy.exe", "app-case.exe"):
        st = (files(wf, "child") / "Program Files" / name).stat()
        assert (st.st_ino, st.st_dev) == (parent_app.st_ino, parent_app.st_dev)
    assert (files(wf, "child") / "new-link.dll").stat().st_ino == (files(wf, "child") / "new.dll").stat().st_ino


def test_deletions_become_overlay_whiteouts_that_hide_the_parent(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, a_base().bytes())
    child = LayerTar.diff_layer()
    child.dir("Files/Program Files")
    child.whiteout("Files/Program Files/app.exe")
    child.whiteout("Files/Windows/System32/config/SAM")  # parent folders not listed: made, metadata copied
    child.whiteout("Files/Windows/.wh..opq")  # no opaque folders on Windows: nothing happens
    import_layer(wf, "child", "base", child.bytes())
    st = (files(wf, "child") / "Program Files/app.exe").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    config = files(wf, "child") / "Windows/System32/config"
    assert read_meta(config) == read_meta(files(wf, "base") / "Windows/System32/config")
    assert not os.path.lexists(files(wf, "child") / "Windows/.wh..opq")
    assert not os.path.lexists(files(wf, "child") / "Windows/.opq")
    view = wf.mount("child", [], rw=False)
    try:
        assert sorted(os.listdir(view / "Program Files")) == []
        assert "SAM" not in os.listdir(view / "Windows/System32/config")
        assert "SYSTEM" in os.listdir(view / "Windows/System32/config")
    finally:
        wf.unmount("child")


# -- rules -------------------------------------------------------------------------------


def rejected(wf: WindowsFilterDriver, parent: str | None, data: bytes, match: str) -> InvalidArchive:
    wf.create("bad", parent, rw=False, opts=CreateOptions())
    with pytest.raises(InvalidArchive, match=match) as info:
        wf.apply_diff("bad", parent, [], io.BytesIO(data))
    # a failed import leaves the layer as empty as create made it
    assert sorted(os.listdir(wf.dir("bad"))) == ["Files", "layerchain.json"]
    assert os.listdir(wf.dir("bad") / "Files") == []
    return info.value


def test_base_layer_cannot_delete(wf: WindowsFilterDriver) -> None:
    t = a_base()
    t.whiteout("Files/Windows/old.txt")
    err = rejected(wf, None, t.bytes(), "base layer cannot have tombstones")
    assert err.entry == "Files/Windows/.wh.old.txt"


@pytest.mark.parametrize("hive", ["SAM", "SYSTEM"])
def test_base_layer_needs_every_registry_hive(wf: WindowsFilterDriver, hive: str) -> None:
    t = LayerTar.base_layer(hives=False)
    for h in ("DEFAULT", "SAM", "SECURITY", "SOFTWARE", "SYSTEM"):
        if h != hive:
            t.file(f"Files/Windows/System32/config/{h}", b"regf")
    err = rejected(wf, None, t.bytes(), "registry hive")
    assert err.entry == f"Files/Windows/System32/config/{hive}"


def test_base_layer_uvm_needs_a_bcd_store(wf: WindowsFilterDriver) -> None:
    t = a_base()
    t.dir("UtilityVM")
    t.dir("UtilityVM/Files")
    t.file("UtilityVM/Files/kernel", b"k")
    rejected(wf, None, t.bytes(), "BCD")


def test_diff_layer_needs_its_hives_folder(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, a_base().bytes())
    t = LayerTar()
    t.dir("Files")
    t.file("Files/x", b"x")
    rejected(wf, "base", t.bytes(), "Hives directory entry")


@pytest.mark.parametrize("build, match", [
    (lambda t: t.file("Files/nodir/x", b"x"), "parent directory Files/nodir is missing"),
    (lambda t: t.file("Other/x", b"x"), "not under Files/, Hives/ or UtilityVM/"),
    (lambda t: (t.file("Files/a", b"1"), t.file("Files/A", b"2")), "duplicate entry"),
    (lambda t: t.hardlink("Files/l", "Hives/Sam_Delta"), "invalid hard link"),
    (lambda t: t.hardlink("Files/l", "Files/nowhere"), "failed to find link target"),
    (lambda t: t.whiteout("Hives/Sam_Delta"), "invalid tombstone"),
    (lambda t: t.file("UtilityVM/Files/x", b"x"), "missing UtilityVM directory"),
    (lambda t: (t.dir("UtilityVM"), t.dir("UtilityVM/Other")), "invalid UtilityVM layer"),
    (lambda t: t.file("Files/bad", b"x", meta=Meta(0x10)), "has FILE_ATTRIBUTE_DIRECTORY"),
    (lambda t: t.dir("Files/bad", meta=Meta(0x20)), "lacks FILE_ATTRIBUTE_DIRECTORY"),
    (lambda t: t.file("Files/bad", b"x", meta=Meta(0x20, extra={"MSWINDOWS.rawsd": "!!"})), "not base64"),
    (lambda t: t.file("Files/bad", b"x", meta=Meta(0x20, sd=b"\x01\x00\x04\x80")), "security descriptor"),
    (lambda t: t.file("Files/bad", b"x", meta=Meta(0x20, extra={"MSWINDOWS.fileattr": "0x20"})), "unsigned"),
])
def test_diff_layer_rules(wf: WindowsFilterDriver, build, match: str) -> None:  # type: ignore[no-untyped-def]
    import_layer(wf, "base", None, a_base().bytes())
    t = LayerTar.diff_layer()
    build(t)
    rejected(wf, "base", t.bytes(), match)


def test_hostile_tars_write_nothing_outside_the_layer(wf: WindowsFilterDriver, canary: Path) -> None:
    import_layer(wf, "base", None, a_base().bytes())
    escape = os.path.relpath(canary.parent, wf.dir("bad")) + "/" + canary.name
    for build in (
        lambda t: t.file("Files/../../../" + canary.name, b"pwned"),
        lambda t: (t.symlink("Files/up", escape), t.file("Files/up/canary.txt", b"pwned")),
        lambda t: (t.symlink("Files/up", "C:\\..\\..\\.."), t.hardlink("Files/x", "Files/up/etc/passwd")),
    ):
        t = LayerTar.diff_layer()
        build(t)
        wf.remove("bad")
        wf.create("bad", "base", rw=False, opts=CreateOptions())
        with pytest.raises(InvalidArchive):
            wf.apply_diff("bad", "base", [], io.BytesIO(t.bytes()))
        assert canary.read_text() == "untouched\n"


# -- the child process --------------------------------------------------------------------------


def test_child_failure_is_reported_with_the_childs_message(wf: WindowsFilterDriver) -> None:
    t = a_base()
    t.whiteout("Files/x")
    wf.create("bad", None, rw=False, opts=CreateOptions())
    with pytest.raises(InvalidArchive) as info:
        wf.apply_diff("bad", None, [], io.BytesIO(t.bytes()))
    text = str(info.value)
    assert text.startswith("Files/.wh.x: windowsfilter import of layer bad failed (exit status 1): ")
    assert text.endswith("base layer cannot have tombstones (.wh. entries)")


def test_child_that_dies_is_reported(wf: WindowsFilterDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    # a Python that cannot import the importer: the child dies before reading the tar
    monkeypatch.setattr("sys.executable", "/bin/false")
    wf.create("bad", None, rw=False, opts=CreateOptions())
    with pytest.raises(LaminaError, match="exit status 1"):
        wf.apply_diff("bad", None, [], io.BytesIO(a_base().bytes()))


def test_import_runs_in_another_process(wf: WindowsFilterDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    import lamina.drivers.windowsfilter_import as imp

    def refuse(*args: object) -> int:
        raise AssertionError("imported in this process")

    monkeypatch.setattr(imp, "write_layer", refuse)
    assert import_layer(wf, "base", None, a_base().bytes()) > 0
    monkeypatch.setenv(NOREEXEC_ENV, "1")  # the seed's debugging switch
    with pytest.raises(AssertionError, match="in this process"):
        import_layer(wf, "base2", None, a_base().bytes())


# -- export ---------------------------------------------------------------------------------


def rich_base() -> bytes:
    t = a_base()
    t.file("Files/doc.txt", b"text" * 1000, streams={"Zone.Identifier": b"z"})
    t.symlink("Files/link", "C:\\Windows")
    t.hardlink("Files/doc2.txt", "Files/doc.txt")
    t.file("Files/" + "long name ü " * 12 + ".txt", b"long")
    t.file("Files/ko.exe", b"MZ", meta=Meta(0x20, sd=KO_SD))
    t.dir("Hives")
    return t.bytes()


@pytest.mark.parametrize("tail", [b"", bytes(10240), b"trailing bytes after the end blocks"])
def test_imported_layer_exports_the_same_bytes(wf: WindowsFilterDriver, tail: bytes) -> None:
    data = rich_base() + tail
    import_layer(wf, "base", None, data)
    assert export(wf, "base") == data


def test_tar_split_given_to_the_store_rebuilds_the_tar(wf: WindowsFilterDriver) -> None:
    from lamina.archive.tar.split import reassemble

    data = rich_base()
    wf.create("base", None, rw=False, opts=CreateOptions())
    record = io.BytesIO()
    wf.apply_diff("base", None, [], io.BytesIO(data), tarsplit=record)
    record.seek(0)
    with wf.diff_getter("base") as getter:
        assert b"".join(reassemble(record, getter)) == data


def uvm_base() -> LayerTar:
    t = a_base()
    t.dir("UtilityVM")
    t.dir("UtilityVM/Files")
    for d in ("EFI", "EFI/Microsoft", "EFI/Microsoft/Boot"):
        t.dir(f"UtilityVM/Files/{d}")
    t.file("UtilityVM/Files/EFI/Microsoft/Boot/BCD", b"BCD store " * 50)
    t.file("UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG", b"log")
    t.file("UtilityVM/Files/kernel.exe", b"kernel")
    return t


def test_bcd_files_are_backed_up_and_served_to_the_exporter(wf: WindowsFilterDriver) -> None:
    data = uvm_base().bytes()
    import_layer(wf, "base", None, data)
    layer = wf.dir("base")
    assert (layer / "bcd.bak").read_bytes() == b"BCD store " * 50
    assert (layer / "bcd.log.bak").read_bytes() == b"log"
    assert not (layer / "bcd.log1.bak").exists()
    # what ProcessUtilityVMImage does on Windows: the BCD is edited in place
    (layer / "UtilityVM/Files/EFI/Microsoft/Boot/BCD").write_bytes(b"mutated by the UVM import" * 20)
    with wf.diff_getter("base") as getter:
        with getter.get("UtilityVM/Files/EFI/Microsoft/Boot/BCD") as f:
            assert f.read() == b"BCD store " * 50
    assert export(wf, "base") == data


def test_diff_layer_with_a_uvm_clones_the_parents(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, uvm_base().bytes())
    child = LayerTar.diff_layer()
    child.dir("UtilityVM")
    child.whiteout("UtilityVM/Files/kernel.exe")
    child.file("UtilityVM/Files/new.sys", b"new")
    data = child.bytes()
    import_layer(wf, "child", "base", data)
    uvm = wf.dir("child") / "UtilityVM/Files"
    assert not os.path.lexists(uvm / "kernel.exe")
    assert (uvm / "new.sys").read_bytes() == b"new"
    bcd, parent_bcd = uvm / "EFI/Microsoft/Boot/BCD", wf.dir("base") / "UtilityVM/Files/EFI/Microsoft/Boot/BCD"
    assert bcd.read_bytes() == parent_bcd.read_bytes()
    assert bcd.stat().st_ino != parent_bcd.stat().st_ino  # copied: the import mutates it
    log_ = uvm / "EFI/Microsoft/Boot/BCD.LOG"
    assert log_.stat().st_ino != (wf.dir("base") / "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG").stat().st_ino
    assert export(wf, "child") == data
    # a tombstone for a UVM file that is not there fails, as hcsshim makes it fail
    bad = LayerTar.diff_layer()
    bad.dir("UtilityVM")
    bad.whiteout("UtilityVM/Files/nothing")
    rejected(wf, "base", bad.bytes(), "does not exist")


def test_export_reads_back_with_tarfile_and_keeps_records(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, rich_base())
    members = tarfile.open(fileobj=io.BytesIO(export(wf, "base"))).getmembers()
    ko = next(m for m in members if m.name == "Files/ko.exe")
    assert ko.pax_headers["MSWINDOWS.rawsd"] == base64.b64encode(KO_SD).decode()
    assert any(m.name == "Files/doc.txt:Zone.Identifier" for m in members)


def test_metadata_xattrs_use_the_trusted_namespace(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, rich_base())
    assert os.listxattr(files(wf, "base") / "link", follow_symlinks=False) == [XATTR_NAME]


@pytest.mark.parametrize("key", ["trusted.overlay.redirect", "trusted.overlay.metacopy",
                                 "trusted.overlay.opaque", "user.overlay.redirect",
                                 "trusted.overlayfoo", "security.capability"])
def test_no_linux_xattr_from_the_tar_is_set(wf: WindowsFilterDriver, key: str) -> None:
    """Issue 16: overlayfs's own xattrs (and every other Linux xattr) in a tar's PAX records
    never reach a windowsfilter layer, whose Files/ are overlay lowers: only the one
    metadata xattr of the import is there."""
    t = a_base()
    t.file("Files/redirected.exe", b"MZ", meta=Meta(0x20, extra={f"SCHILY.xattr.{key}": "/Files"}))
    t.dir("Files/opaque", meta=Meta(0x10, extra={f"SCHILY.xattr.{key}": "y"}))
    import_layer(wf, "base", None, t.bytes())
    for name in ("redirected.exe", "opaque"):
        assert os.listxattr(files(wf, "base") / name, follow_symlinks=False) == [XATTR_NAME]
