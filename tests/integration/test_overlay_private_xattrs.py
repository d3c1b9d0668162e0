"""overlayfs's own xattrs from a tar (issue 16): what each driver keeps, base layer or not.

A ``trusted.overlay.redirect``/``metacopy``/``opaque`` (or ``user.overlay.*``, what
rootless overlayfs reads) set on a layer's files steers every overlay mount the layer is
a lower of: files then fail with EPERM in containers. overlay drops them on every layer,
the base layer included (applied in delete mode, so the drop is an option of its own);
windowsfilter keeps no Linux xattr from a tar at all; vfs, shown by a bind mount, keeps
every xattr as Docker's vfs does. Neighbours that are not overlayfs's own are kept.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.corpus import OVERLAY_XATTR_NEIGHBOURS  # noqa: E402
from fuzz.rawtar import DIR, entry, pax, pax_record, tar  # noqa: E402

import lamina  # noqa: E402
from conftest import require_overlay, require_root  # noqa: E402

OVERLAYS_OWN = ("trusted.overlay.", "user.overlay.")


def _name_of(raw_entry: bytes) -> str:
    return raw_entry[:100].rstrip(b"\0").decode()


def _tar(key: str, value: bytes, raw_entry: bytes) -> bytes:
    return tar(pax(pax_record(f"SCHILY.xattr.{key}", value)), raw_entry)


@pytest.fixture(params=["vfs", "overlay"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    require_root()
    if request.param == "overlay":
        require_overlay()
    s = lamina.open(tmp_path / "store", driver=request.param)
    s.apply_diff("parent", None, io.BytesIO(tar(entry("etc", typeflag=DIR, mode=0o755))))
    yield s
    s.close()


def _own_tree(s: lamina.Store, layer_id: str) -> Path:
    d = s.driver.layer_dir(layer_id)
    return d / "diff" if s.driver.name == "overlay" else d


@pytest.mark.parametrize("parent", [None, "parent"], ids=["base", "child"])
@pytest.mark.parametrize(("key", "value", "raw_entry"), OVERLAY_XATTR_NEIGHBOURS,
                         ids=[k for k, _, _ in OVERLAY_XATTR_NEIGHBOURS])
def test_what_each_driver_keeps(store: lamina.Store, parent: str | None, key: str, value: bytes,
                                raw_entry: bytes) -> None:
    s = store
    s.apply_diff("layer", parent, io.BytesIO(_tar(key, value, raw_entry)))
    path = _own_tree(s, "layer") / _name_of(raw_entry)
    names = os.listxattr(path, follow_symlinks=False)
    dropped = s.driver.name == "overlay" and key.startswith(OVERLAYS_OWN)
    if dropped:
        assert key not in names
    else:
        assert key in names
        assert os.getxattr(path, key, follow_symlinks=False) == value
    assert s.layer("layer").diff_id  # applied, nothing refused
    # the diff gives back the very tar (tar-split), the dropped record included
    with s.diff("layer") as d:
        assert d.read() == _tar(key, value, raw_entry)


def test_a_base_layer_redirect_does_not_reach_the_container(tmp_path: Path) -> None:
    """The auditor's case: a base layer with metacopy/redirect on overlay, a container on
    top; every file must read normally in the container's view."""
    require_overlay()
    s = lamina.open(tmp_path / "store", driver="overlay")
    base = tar(pax(pax_record("SCHILY.xattr.trusted.overlay.metacopy", b"")), entry("bin-sh", b"#!sh\n"),
               pax(pax_record("SCHILY.xattr.trusted.overlay.redirect", b"/nowhere")),
               entry("etc", typeflag=DIR, mode=0o755), entry("etc/hosts", b"127.0.0.1 localhost\n"))
    s.apply_diff("base", None, io.BytesIO(base))
    s.create_rw("ctr", "base")
    with s.mounted("ctr") as view:
        assert (view / "bin-sh").read_bytes() == b"#!sh\n"
        assert (view / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
        (view / "bin-sh").write_bytes(b"changed")  # copy-up works too
    s.close()
