"""``lamina win inspect``'s engine (lamina.wininspect), and the driver under the store:
a pull (apply_diff) gives back the same bytes through the store's tar-split, a
sandbox's diff goes through the driver."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from winfixtures import driver_at, import_layer, sandbox
from wintarmaker import BA, BU, SY, SYSTEM_FILE_SD, TRUSTED_INSTALLER, LayerTar, Meta, hcs_check

import lamina
from conftest import require_loop, require_overlay
from lamina.drivers.windowsfilter import WindowsFilterDriver
from lamina.wininspect import format_inspect, inspect, inspect_path


@pytest.fixture
def wf(tmp_path: Path) -> Iterator[WindowsFilterDriver]:
    yield from driver_at(tmp_path)


def base_tar() -> bytes:
    t = LayerTar.base_layer()
    t.file("Files/Windows/notepad.exe", b"MZ", meta=Meta(0x21, sd=SYSTEM_FILE_SD, eas={"$KERNEL.PURGE.ESBCACHE": b"cache"}),
           streams={"Zone.Identifier": b"[ZoneTransfer]"})
    t.symlink("Files/Users", "C:\\Users", junction=True)
    return t.bytes()


def test_inspect_decodes_a_windows_file(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, base_tar())
    view = wf.mount("base", [], rw=False)
    for spelling in ("C:\\Windows\\notepad.exe", "/windows/NOTEPAD.EXE", "Files/Windows/notepad.exe"):
        d = inspect_path(view, spelling)
        assert d["path"] == "C:\\Windows\\notepad.exe" and d["name"] == "Files/Windows/notepad.exe"
    assert d["type"] == "file" and d["size"] == 2 and d["recorded"]
    assert d["attributes"]["names"] == ["FILE_ATTRIBUTE_READONLY", "FILE_ATTRIBUTE_ARCHIVE"]
    sd = d["security_descriptor"]
    assert sd["owner"] == {"sid": TRUSTED_INSTALLER, "name": "NT SERVICE\\TrustedInstaller"}
    assert [(a["sid"], a["rights"]) for a in sd["dacl"]] == [
        (TRUSTED_INSTALLER, ["FILE_ALL_ACCESS"]), (BA, ["FILE_GENERIC_READ|EXECUTE"]),
        (SY, ["FILE_GENERIC_READ|EXECUTE"]), (BU, ["FILE_GENERIC_READ|EXECUTE"]),
    ]
    assert d["times"] == {
        "creation": "2020-09-13T12:26:40.0000001Z",
        "last_write": "2023-11-14T22:13:20.1234567Z",
        "last_access": "2023-11-14T22:15:00.0000000Z",
        "change": "2023-11-14T22:16:40.0000005Z",
    }
    assert d["streams"] == [{"name": "Zone.Identifier", "size": 14}]
    assert d["extended_attributes"]["$KERNEL.PURGE.ESBCACHE"]["text"] == "cache"
    text = format_inspect(d)
    assert "attributes  0x21  FILE_ATTRIBUTE_READONLY FILE_ATTRIBUTE_ARCHIVE" in text
    assert "owner       S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464 (NT SERVICE\\TrustedInstaller)" in text
    assert "created     2020-09-13T12:26:40.0000001Z" in text
    junction = inspect_path(view, "C:\\Users")
    assert junction["type"] == "junction" and junction["link_target"] == "C:\\Users"


def test_inspect_shows_defaults_for_a_file_written_from_linux(wf: WindowsFilterDriver) -> None:
    import_layer(wf, "base", None, base_tar())
    view = sandbox(wf, "ctr", "base")
    (view / "linux.txt").write_text("hi")
    d = inspect_path(view, "C:\\linux.txt")
    assert not d["recorded"]
    assert d["security_descriptor_source"].startswith("default")
    assert d["security_descriptor"]["sddl"] == "O:BAG:SYD:(A;;FA;;;BA)(A;;FA;;;SY)(A;;FX;;;BU)"
    assert d["attributes"]["value"] == 0x20
    with pytest.raises(FileNotFoundError):
        inspect_path(view, "C:\\nothing")


# -- through the store ------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[lamina.store.Store]:
    require_overlay()
    require_loop()
    s = lamina.open(tmp_path / "store", driver="windowsfilter", options={"size": "64M"})
    try:
        yield s
    finally:
        s.cleanup(unmount_all=True)
        s.close()


def test_store_pull_and_diff_give_back_the_same_bytes(store: lamina.store.Store) -> None:
    data = base_tar()
    store.apply_diff("base", None, io.BytesIO(data))
    with store.diff("base") as f:
        assert f.read() == data
    d = inspect(store, "base", "C:\\Windows\\notepad.exe")
    assert d["attributes"]["value"] == 0x21


def test_store_sandbox_diff_is_a_windows_diff_layer(store: lamina.store.Store) -> None:
    store.apply_diff("base", None, io.BytesIO(base_tar()))
    store.create_rw("ctr", "base")
    with store.mounted("ctr") as view:
        (view / "Windows/new.txt").write_text("new")
    with store.diff("ctr") as f:
        names = [m.name for m in hcs_check(f.read())]
    assert names == ["Files", "Hives", "Files/Windows", "Files/Windows/new.txt"]


def test_cli_win_inspect(tmp_path: Path) -> None:
    """``lamina win inspect`` through the real command, text and --json."""
    import json

    from conftest import run_cli

    require_overlay()
    require_loop()
    root = tmp_path / "store"
    tar_path = tmp_path / "base.tar"
    tar_path.write_bytes(base_tar())
    try:
        r = run_cli("--driver", "windowsfilter", "apply", "base", str(tar_path), root=root)
        assert r.returncode == 0, r.stderr
        r = run_cli("win", "inspect", "base", "C:\\Windows\\notepad.exe", root=root)
        assert r.returncode == 0, r.stderr
        assert "READONLY" in r.stdout.decode() and "ARCHIVE" in r.stdout.decode()
        r = run_cli("--json", "win", "inspect", "base", "/Windows/notepad.exe", root=root)
        assert json.loads(r.stdout)["attributes"]["value"] == 0x21
        r = run_cli("win", "inspect", "base", "C:\\nothing\\here", root=root)
        assert r.returncode == 1 and len(r.stderr.decode().strip().splitlines()) == 1, r.stderr
    finally:
        run_cli("cleanup", root=root)


def test_the_store_keeps_the_one_tar_split_and_replays_it_for_any_parent(store: lamina.store.Store) -> None:
    """A Windows layer is exported against its own chain, so its tar comes back the same
    whatever parent is asked for; the only copy of its tar-split is the store's."""
    from lamina.drivers.windowsfilter_meta import TAR_RECORD

    store.apply_diff("base", None, io.BytesIO(base_tar()))
    t = LayerTar.diff_layer()
    t.file("Files/new.txt", b"new", meta=Meta(0x20, sd=SYSTEM_FILE_SD))
    data = t.bytes()
    store.apply_diff("top", "base", io.BytesIO(data))
    for parent in (None, ""):
        with store.diff("top", parent) as f:
            assert f.read() == data, parent
    for lid in ("base", "top"):
        assert store.tarsplits.exists(lid)
        assert not (store.driver.layer_dir(lid) / TAR_RECORD).exists()
