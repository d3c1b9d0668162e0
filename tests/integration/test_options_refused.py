"""Unknown options are refused, naming the key and the known ones (issue 16).

``--storage-opt siz=10G`` used to make an unlimited layer and ``--opt bogus=1`` was
accepted: an option nobody reads is refused, as overlay2 refuses it ("Unknown option").
Per-layer storage options: every Linux driver knows ``size`` (vfs then says it cannot
limit), windowsfilter too; driver options: overlay knows size/quota/mount_api (bare or
``overlay.``/``overlay2.``-prefixed), windowsfilter size, vfs none. Keys are case-blind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import lamina
from conftest import require_overlay, require_root, run_cli, skip_or_fail
from lamina.drivers.base import CreateOptions
from lamina.drivers.windowsfilter import parse_storage_opt
from lamina.errors import InvalidOption, QuotaNotSupported


@pytest.fixture(params=["vfs", "overlay"])
def driver(request: pytest.FixtureRequest) -> str:
    if request.param == "overlay":
        require_overlay()
    return str(request.param)


@pytest.mark.parametrize("key", ["siz", "Sise", "", " size", "size.", "overlay.size", "bogus"])
def test_unknown_storage_option_is_refused(tmp_path: Path, driver: str, key: str) -> None:
    with lamina.open(tmp_path / "s", driver=driver) as s:
        s.create("base")
        with pytest.raises(InvalidOption) as e:
            s.create_rw("ctr", "base", storage_opt={key: "10G"})
        assert str(e.value) == f"unknown storage option {key!r} for driver {driver} (known: size)"
        assert not s.exists("ctr")
        assert not list((s.root / "tmp").iterdir())
        with pytest.raises(InvalidOption):
            s.create("ro", "base", storage_opt={key: "1"})


@pytest.mark.parametrize("key", ["size", "SIZE", "Size"])
def test_size_in_any_case_is_the_size(tmp_path: Path, driver: str, key: str) -> None:
    """A known key in another case is the key (overlay2 lowercases): vfs refuses to limit,
    overlay limits; it is never silently unlimited."""
    with lamina.open(tmp_path / "s", driver=driver) as s:
        s.create("base")
        if driver == "vfs":
            with pytest.raises(QuotaNotSupported):
                s.create_rw("ctr", "base", storage_opt={key: "10M"})
            return
        try:
            s.create_rw("ctr", "base", storage_opt={key: "10M"})
        except QuotaNotSupported as e:
            skip_or_fail(f"no size limits on this machine: {e}")
        try:
            with s.mounted("ctr") as view, pytest.raises(OSError), open(view / "big", "wb") as f:
                for _ in range(30):  # three times the limit
                    f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())
        finally:
            s.remove("ctr")  # and with it the size-limit image's mount


@pytest.mark.parametrize("key", ["bogus", "Bogus", "overlay.bogus", "overlay2.sizee", "quota2", "vfs.size"])
def test_unknown_driver_option_is_refused(tmp_path: Path, driver: str, key: str) -> None:
    with pytest.raises(InvalidOption) as e:
        lamina.open(tmp_path / "s", driver=driver, options={key: "1"})
    known = ("none" if driver == "vfs" else
             "mount_api, overlay.mount_api, overlay.quota, overlay.size, overlay2.mount_api, "
             "overlay2.quota, overlay2.size, quota, size")
    assert str(e.value) == f"unknown driver option {key!r} for driver {driver} (known: {known})"


def test_overlay_driver_options_in_any_case(tmp_path: Path) -> None:
    require_overlay()
    with lamina.open(tmp_path / "s", driver="overlay", options={"Overlay.Mount_API": "legacy"}) as s:
        assert not s.driver.features.lowerdir_plus


def test_cli_names_the_key(tmp_path: Path) -> None:
    root = tmp_path / "s"
    assert run_cli("--driver", "vfs", "create", "base", root=root).returncode == 0
    r = run_cli("--driver", "vfs", "create-rw", "--storage-opt", "siz=10G", "--parent", "base", "ctr", root=root)
    assert r.returncode == 1
    assert r.stderr.decode() == ("lamina: unknown storage option 'siz' for driver vfs (known: size)\n")
    r = run_cli("--driver", "vfs", "--opt", "bogus=1", "ls", root=root)
    assert r.returncode == 1
    assert r.stderr.decode() == "lamina: unknown driver option 'bogus' for driver vfs (known: none)\n"


@pytest.mark.parametrize(("opts", "size"), [({"size": "1G"}, 1 << 30), ({"SIZE": "2G"}, 2 << 30), ({}, 0)])
def test_windowsfilter_storage_options(opts: dict[str, str], size: int) -> None:
    assert parse_storage_opt(opts) == size


@pytest.mark.parametrize("key", ["siz", "", "sandbox_size"])
def test_windowsfilter_refuses_unknown_storage_options(tmp_path: Path, key: str) -> None:
    with pytest.raises(InvalidOption) as e:
        parse_storage_opt({key: "1G"})
    assert str(e.value) == f"unknown storage option {key!r} for driver windowsfilter (known: size)"
    require_root()
    from lamina.drivers.windowsfilter import WindowsFilterDriver

    reason = WindowsFilterDriver.unavailable_reason(tmp_path)
    if reason:
        skip_or_fail(reason)
    with pytest.raises(InvalidOption):
        lamina.open(tmp_path / "w", driver="windowsfilter", options={key: "1G"})
    with lamina.open(tmp_path / "w2", driver="windowsfilter") as s:
        with pytest.raises(InvalidOption):
            s.driver.create("x", None, rw=True, opts=CreateOptions(storage_opt={key: "1G"}))
