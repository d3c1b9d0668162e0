"""The overlay driver: overlay2's layout, views, whiteouts, deep chains, rootless, crashes.

Most tests drive :class:`OverlayDriver` directly through a :class:`DriverContext`, so a
failure points at the driver and not the store; the ones about mounts outliving a
process and cleanup after a crash go through the store, because that is where mount
references live. All need root and overlayfs (``require_overlay``); the store root is
under pytest's tmp_path, on a real disk (ext4 here), not tmpfs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, layer_hold, require_loop, require_overlay, require_tool, skip_or_fail
from lamina.archive.change import Change, ChangeKind
from lamina.drivers.base import CreateOptions, DriverContext
from lamina.drivers.overlay import ChainTooDeep, OverlayDriver, probe
from lamina.errors import InvalidOption, UnsupportedFilesystem
from lamina.fs.mount import is_mountpoint, mounts_under, umount
from lamina.worklocks import WorkLocks
from unprivileged import AS_NOBODY, NOBODY, nobody_python

RO = CreateOptions()


@pytest.fixture
def root(tmp_path: Path):
    require_overlay()
    r = tmp_path / "store"
    yield r
    for point in mounts_under(tmp_path):
        umount(point)


@pytest.fixture
def driver(root: Path) -> OverlayDriver:
    return OverlayDriver(DriverContext(root))


def chain_of(driver: OverlayDriver, layer_id: str) -> list[str]:
    """The chain as the store would pass it, read back from the driver's own links."""
    return [layer_id, *(driver._lower_ids(layer_id) or [])]


def mount(driver: OverlayDriver, layer_id: str) -> Path:
    return driver.mount(layer_id, chain_of(driver, layer_id), rw=False)


def layer_tar(*entries: tuple[str, str, bytes]) -> io.BytesIO:
    """A small layer tar: (kind, name, data) with kind "f" file, "d" dir."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "d":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


# -- layout ----------------------------------------------------------------------------


def test_layout_is_overlay2s(driver: OverlayDriver, root: Path) -> None:
    driver.create("base", None, rw=False, opts=RO)
    driver.create("child", "base", rw=True, opts=CreateOptions())
    base, child = root / "layers" / "base", root / "layers" / "child"
    assert (base / "diff").is_dir() and not (base / "lower").exists() and not (base / "work").exists()
    assert (child / "diff").is_dir() and (child / "work").is_dir()
    short_base = (base / "link").read_text()
    short_child = (child / "link").read_text()
    assert len(short_base) == 26 and short_base.isalnum() and short_base.isupper()
    assert (child / "lower").read_text() == f"l/{short_base}"
    assert os.readlink(root / "l" / short_base) == "../layers/base/diff"
    assert (root / "l" / short_child).resolve() == (child / "diff").resolve()
    assert (base / "committed").exists(), "a parent is marked committed when built on"
    assert stat.S_IMODE(os.stat(child / "diff").st_mode) == 0o755
    assert list((root / "tmp").iterdir()) == []


def test_lower_file_lists_the_whole_chain_nearest_first(driver: OverlayDriver, root: Path) -> None:
    driver.create("a", None, rw=False, opts=RO)
    driver.create("b", "a", rw=False, opts=RO)
    driver.create("c", "b", rw=False, opts=RO)
    links = {x: (root / "layers" / x / "link").read_text() for x in "abc"}
    assert (root / "layers/c/lower").read_text() == f"l/{links['b']}:l/{links['a']}"
    assert driver._lower_ids("c") == ["b", "a"]


# -- views -----------------------------------------------------------------------------


def test_base_layer_is_a_plain_directory(driver: OverlayDriver, root: Path) -> None:
    driver.create("base", None, rw=False, opts=RO)
    view = mount(driver, "base")
    assert view == root / "layers/base/diff"
    assert not driver.is_mounted("base")
    (view / "f").write_text("x")  # writable until a layer is built on it
    driver.unmount("base")  # nothing mounted: must not fail


def test_child_view_is_an_overlay_of_the_chain(driver: OverlayDriver, root: Path) -> None:
    driver.create("base", None, rw=False, opts=RO)
    (mount(driver, "base") / "from-base").write_text("b")
    driver.create("mid", "base", rw=False, opts=RO)
    view = mount(driver, "mid")
    assert view == root / "layers/mid/merged" and driver.is_mounted("mid")
    assert (view / "from-base").read_text() == "b"
    (view / "from-mid").write_text("m")
    driver.unmount("mid")
    assert not is_mountpoint(view)
    assert (root / "layers/mid/diff/from-mid").read_text() == "m"
    assert not (root / "layers/mid/diff/from-base").exists()
    driver.create("top", "mid", rw=True, opts=CreateOptions())
    view = driver.mount("top", ["top", "mid", "base"], rw=True)
    assert sorted(os.listdir(view)) == ["from-base", "from-mid"]
    driver.unmount("top")


def test_deletions_become_whiteouts_and_opaque_dirs(driver: OverlayDriver, root: Path) -> None:
    driver.create("base", None, rw=False, opts=RO)
    v = mount(driver, "base")
    (v / "gone").write_text("x")
    (v / "dir").mkdir()
    (v / "dir" / "old").write_text("x")
    driver.create("upper", "base", rw=True, opts=CreateOptions())
    v = driver.mount("upper", ["upper", "base"], rw=True)
    (v / "gone").unlink()
    shutil.rmtree(v / "dir")
    (v / "dir").mkdir()
    (v / "dir" / "new").write_text("y")
    driver.unmount("upper")
    upper = root / "layers/upper/diff"
    st = os.lstat(upper / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "a whiteout is a 0/0 char device"
    assert os.getxattr(upper / "dir", driver.opaque_xattr) == b"y"
    assert driver.opaque_xattr == "trusted.overlay.opaque"
    changes = driver.changes("upper", "base")
    assert Change("/gone", ChangeKind.DELETE) in changes
    assert Change("/dir/new", ChangeKind.ADD) in changes
    assert Change("/dir/old", ChangeKind.DELETE) in changes


def test_a_layer_built_on_is_mounted_read_only(driver: OverlayDriver) -> None:
    driver.create("base", None, rw=False, opts=RO)
    driver.create("mid", "base", rw=False, opts=RO)
    driver.create("top", "mid", rw=False, opts=RO)
    for layer in ("base", "mid"):
        view = mount(driver, layer)
        assert driver.is_mounted(layer)
        with pytest.raises(OSError) as e:
            (view / "new").write_text("x")
        assert e.value.errno == 30  # EROFS
        driver.unmount(layer)
    (mount(driver, "top") / "new").write_text("x")  # the top is still writable
    driver.unmount("top")


# -- native diff operations ------------------------------------------------------------


def test_native_only_against_the_direct_parent(driver: OverlayDriver) -> None:
    driver.create("a", None, rw=False, opts=RO)
    driver.create("b", "a", rw=False, opts=RO)
    driver.create("c", "b", rw=False, opts=RO)
    assert driver.changes("c", "a") is None
    assert driver.changes("c", None) is None
    assert driver.diff("c", "a") is None
    assert driver.diff_size("b", None) is None
    assert driver.changes("c", "b") == []
    assert driver.changes("a", None) == []
    assert driver.apply_diff("c", "a", ["c", "b", "a"], io.BytesIO()) is None


def test_apply_and_diff_round_trip_overlay_whiteouts(driver: OverlayDriver, root: Path) -> None:
    driver.create("base", None, rw=False, opts=RO)
    base_tar = layer_tar(("f", "keep", b"k"), ("f", "gone", b"g"), ("d", "dir", b""),
                         ("f", "dir/old", b"o"))
    assert driver.apply_diff("base", None, ["base"], base_tar) == 3
    driver.create("child", "base", rw=False, opts=RO)
    child_tar = layer_tar(("f", ".wh.gone", b""), ("d", "dir", b""), ("f", "dir/.wh..wh..opq", b""),
                          ("f", "dir/new", b"nn"))
    assert driver.apply_diff("child", "base", ["child", "base"], child_tar) == 2
    upper = root / "layers/child/diff"
    assert stat.S_ISCHR(os.lstat(upper / "gone").st_mode)
    assert os.getxattr(upper / "dir", "trusted.overlay.opaque") == b"y"
    view = mount(driver, "child")
    assert sorted(os.listdir(view)) == ["dir", "keep"]
    assert os.listdir(view / "dir") == ["new"]
    driver.unmount("child")
    assert driver.diff_size("child", "base") == 2
    with tarfile.open(fileobj=io.BytesIO(b"".join(driver.diff("child", "base")))) as tf:
        names = tf.getnames()
    assert ".wh.gone" in names and "dir/.wh..wh..opq" in names and "dir/new" in names
    assert "keep" not in names


def test_apply_into_a_mounted_layer_is_not_native(driver: OverlayDriver) -> None:
    driver.create("base", None, rw=False, opts=RO)
    driver.create("child", "base", rw=False, opts=RO)
    mount(driver, "child")
    assert driver.apply_diff("child", "base", ["child", "base"], io.BytesIO()) is None
    driver.unmount("child")


def test_diff_getter_reads_the_layer_own_files(driver: OverlayDriver) -> None:
    driver.create("base", None, rw=False, opts=RO)
    (mount(driver, "base") / "f").write_bytes(b"data")
    with driver.diff_getter("base") as getter, getter.get("f") as f:
        assert f.read() == b"data"


# -- deep chains -----------------------------------------------------------------------


def _stack(driver: OverlayDriver, count: int, prefix: str = "L") -> list[str]:
    """``count`` layers, each on the previous; returns the chain, top first."""
    chain: list[str] = []
    for i in range(count):
        layer = f"{prefix}{i:03d}"
        driver.create(layer, chain[0] if chain else None, rw=False, opts=RO)
        chain.insert(0, layer)
    return chain


def test_deep_layer_read_500(driver: OverlayDriver, root: Path) -> None:
    """graphtest's DeepLayerRead at the kernel's limit: 500 lower directories."""
    if not driver.features.lowerdir_plus:
        skip_or_fail("the kernel lacks fsconfig lowerdir+ (Linux 6.8+): deep chains unavailable")
    assert driver.max_depth == 500
    chain = _stack(driver, 501)
    (root / "layers" / chain[-1] / "diff" / "testfile.txt").write_text("test content")
    for i, layer in enumerate(reversed(chain[1:6])):
        (root / "layers" / layer / "diff" / f"layer-{i}").write_text(layer)
    view = driver.mount(chain[0], chain, rw=False)
    try:
        assert (view / "testfile.txt").read_text() == "test content"
        assert (view / "layer-4").read_text() == chain[1]
        line = next(x for x in open("/proc/self/mountinfo", "rb") if str(view).encode() in x)
        # runc reads mountinfo with a 64 KiB line limit: a longer line breaks every
        # container start on the host while this mount exists
        assert len(line) < 32 * 1024, f"mountinfo line of {len(line)} bytes"
        assert b"lowerdir+=l/" in line
    finally:
        driver.unmount(chain[0])
    with pytest.raises(ChainTooDeep, match="at most 500"):
        driver.create("one-too-many", chain[0], rw=False, opts=RO)
    assert not (root / "layers" / "one-too-many").exists()


def test_without_the_new_mount_api_short_links_carry_128(root: Path) -> None:
    driver = OverlayDriver(DriverContext(root, options={"overlay.mount_api": "legacy"}))
    assert not driver.features.lowerdir_plus
    assert driver.max_depth == 128
    chain = _stack(driver, 129, prefix="x" * 60)  # long IDs: absolute paths cannot fit
    (root / "layers" / chain[-1] / "diff" / "bottom").write_text("b")
    view = driver.mount(chain[0], chain, rw=False)
    try:
        assert (view / "bottom").read_text() == "b"
        opts = next(line for line in open("/proc/self/mountinfo") if str(view) in line)
        assert "lowerdir=l/" in opts, "the retry with relative short links was used"
    finally:
        driver.unmount(chain[0])
    with pytest.raises(ChainTooDeep, match="mount\\(2\\)"):
        driver.create("too-deep", chain[0], rw=False, opts=RO)
    assert "mount(2) with l/ short links" in dict(driver.status())["Deep Chains"]


# -- options, status, metadata ---------------------------------------------------------


def test_size_on_a_read_only_layer_is_refused(driver: OverlayDriver) -> None:
    with pytest.raises(InvalidOption):
        driver.create("ro", None, rw=False, opts=CreateOptions(size=1 << 20))


def test_unknown_driver_option_is_refused(root: Path) -> None:
    with pytest.raises(InvalidOption):
        OverlayDriver(DriverContext(root, options={"overlay.bogus": "1"}))


def test_status_names_backing_fs_quota_rootless_and_chains(driver: OverlayDriver) -> None:
    status = dict(driver.status())
    assert status["Backing Filesystem"] == "extfs"
    assert status["Supports d_type"] == "true"
    assert status["Native Overlay Diff"] == "true"
    assert status["userxattr"] == "false"
    assert "loop device" in status["Quota"] or "project" in status["Quota"]
    assert "lowerdir+" in status["Deep Chains"] or "short links" in status["Deep Chains"]
    assert status["Rootless"].startswith(("supported", "unavailable"))


def test_metadata_names_overlay2s_dirs(driver: OverlayDriver, root: Path) -> None:
    driver.create("a", None, rw=False, opts=RO)
    driver.create("b", "a", rw=False, opts=RO)
    driver.create("c", "b", rw=False, opts=RO)
    meta = driver.metadata("c")
    assert meta["UpperDir"] == str(root / "layers/c/diff")
    assert meta["WorkDir"] == str(root / "layers/c/work")
    assert meta["MergedDir"] == str(root / "layers/c/merged")
    real = os.path.realpath(root)
    assert meta["LowerDir"] == f"{real}/layers/b/diff:{real}/layers/a/diff"
    assert "LowerDir" not in driver.metadata("a")


def test_probe_is_cached_per_kernel_and_boot(driver: OverlayDriver, root: Path) -> None:
    saved = json.loads((root / "overlay/features.json").read_text())
    assert saved["key"]["kernel"] == os.uname().release
    assert saved["features"]["backing_fs"] == "extfs"
    assert probe(root) == probe(root, use_cache=False)


# -- refusing filesystems overlay cannot use -------------------------------------------


def _loop_fs(tmp_path: Path, name: str, mkfs: list[str]) -> Path:
    require_loop()
    image, point = tmp_path / f"{name}.img", tmp_path / name
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    point.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True, capture_output=True)
    return point


def test_backing_fs_without_d_type_is_refused_at_open(tmp_path: Path, root: Path) -> None:
    point = _loop_fs(tmp_path, "nodtype", ["mkfs.ext4", "-q", "-F", "-O", "^filetype"])
    store = point / "store"
    reason = OverlayDriver.unavailable_reason(store)
    assert reason and "d_type" in reason
    with pytest.raises(UnsupportedFilesystem, match="d_type"):
        OverlayDriver(DriverContext(store))


def test_overlay_on_overlay_is_refused_at_open(tmp_path: Path, root: Path) -> None:
    for name in ("lo", "up", "wk", "mnt"):
        (tmp_path / name).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={tmp_path}/lo,upperdir={tmp_path}/up,workdir={tmp_path}/wk",
                    str(tmp_path / "mnt")], check=True)
    store = tmp_path / "mnt" / "store"
    reason = OverlayDriver.unavailable_reason(store)
    if reason is None:
        # by design: the refusal can only be checked on a kernel that refuses (no
        # feature is missing: the driver then works on overlay and is right to)
        pytest.skip("this kernel accepts overlay upper directories on overlay")
    assert "overlayfs" in reason and "upper" in reason
    with pytest.raises(UnsupportedFilesystem, match="overlayfs"):
        OverlayDriver(DriverContext(store))


# -- housekeeping ----------------------------------------------------------------------


def test_remove_unmounts_and_drops_the_short_link(driver: OverlayDriver, root: Path) -> None:
    driver.create("base", None, rw=False, opts=RO)
    driver.create("child", "base", rw=True, opts=CreateOptions())
    short = (root / "layers/child/link").read_text()
    view = driver.mount("child", ["child", "base"], rw=True)
    (view / "f").write_text("x")
    driver.remove("child")
    assert not is_mountpoint(view)
    assert not (root / "layers/child").exists() and not os.path.lexists(root / "l" / short)
    assert list((root / "tmp").iterdir()) == []
    driver.remove("child")  # gone already: fine


def test_cleanup_mends_links_and_drops_unknown_layers(driver: OverlayDriver, root: Path) -> None:
    driver.create("kept", None, rw=False, opts=RO)
    driver.create("stray", "kept", rw=False, opts=RO)
    mount(driver, "stray")
    short = (root / "layers/kept/link").read_text()
    (root / "l" / short).unlink()  # as after a crash between two steps
    (root / "l" / "DANGLINGDANGLINGDANGLING00").symlink_to("../layers/nothing/diff")
    done = driver.cleanup({"kept"}, layer_hold(root / "locks", {"kept"}))
    assert any("stray" in line for line in done)
    assert any(f"restored short link l/{short}" == line for line in done)
    assert any("DANGLING" in line for line in done)
    assert not (root / "layers/stray").exists() and not mounts_under(root)
    assert os.readlink(root / "l" / short) == "../layers/kept/diff"
    assert sorted(os.listdir(root / "l")) == [short]


def test_cleanup_leaves_the_link_of_a_layer_being_made(driver: OverlayDriver, root: Path) -> None:
    """A create writes l/<short> before renaming its dir into layers/: a cleanup running
    in between must not take the link away (its maker holds the layer)."""
    (root / "tmp" / "busy~creating").mkdir()
    (root / "l" / "INPROGRESSINPROGRESSINPROG").symlink_to("../layers/busy/diff")
    (root / "locks").mkdir(exist_ok=True)
    locks = WorkLocks(root / "locks")
    with locks.busy("busy"):
        assert driver.cleanup(set(), layer_hold(root / "locks", {"busy"})) == []
    assert os.path.lexists(root / "l" / "INPROGRESSINPROGRESSINPROG")
    (root / "tmp" / "busy~creating").rmdir()
    assert driver.cleanup(set(), layer_hold(root / "locks", set())) == [
        "removed stale short link l/INPROGRESSINPROGRESSINPROG"]


def test_cleanup_spares_what_was_made_after_it_listed_the_records(driver: OverlayDriver, root: Path) -> None:
    """``known`` is the records as cleanup began; a layer made since (recorded now) keeps
    its directory and its link, and one being made is not touched at all."""
    driver.create("new", None, rw=False, opts=RO)
    driver.create("making", None, rw=False, opts=RO)
    (root / "locks").mkdir(exist_ok=True)
    locks = WorkLocks(root / "locks")
    with locks.busy("making"):
        assert driver.cleanup(set(), layer_hold(root / "locks", {"new", "making"})) == []
    assert (root / "layers/new").is_dir() and (root / "layers/making").is_dir()
    assert sorted(os.listdir(root / "l")) == sorted((root / f"layers/{i}/link").read_text() for i in ("new", "making"))


# -- across processes (through the store) ----------------------------------------------


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=str(REPO / "src"), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full, timeout=120)


def test_mount_outlives_the_process_and_umount_in_another(root: Path) -> None:
    import lamina

    with lamina.open(root, driver="overlay") as store:
        store.create("img")
        store.create_rw("ctr", "img")
    done = _run(f"""
        import lamina
        s = lamina.open({str(root)!r}, driver="overlay")
        print(s.get("ctr", persistent=True))
        """)
    assert done.returncode == 0, done.stderr
    view = Path(done.stdout.strip())
    assert is_mountpoint(view), "the mount stays after the process that made it exits"
    (view / "written-later").write_text("x")
    done = _run(f"""
        import lamina
        s = lamina.open({str(root)!r}, driver="overlay")
        s.put("ctr", persistent=True)
        """)
    assert done.returncode == 0, done.stderr
    assert not is_mountpoint(view)
    assert (root / "layers/ctr/diff/written-later").exists()


def test_cleanup_unmounts_what_a_crashed_process_left(root: Path) -> None:
    import lamina

    with lamina.open(root, driver="overlay") as store:
        store.create("img")
        store.create_rw("ctr", "img")
    done = _run(f"""
        import os, signal, lamina
        s = lamina.open({str(root)!r}, driver="overlay")
        print(s.get("ctr"), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    assert done.returncode == -signal.SIGKILL
    view = Path(done.stdout.strip())
    assert is_mountpoint(view)
    with lamina.open(root, driver="overlay") as store:
        lines = store.cleanup()
        assert not is_mountpoint(view)
        assert any("ctr" in line for line in lines), lines
        assert store.layer("ctr").mount_count == 0
        with store.mounted("ctr") as again:  # and it mounts again afterwards
            assert again == view


# -- rootless --------------------------------------------------------------------------

_ROOTLESS_CHILD = """
    import io, json, os, shutil, tarfile, sys
    from pathlib import Path
    from lamina.drivers.base import CreateOptions, DriverContext
    from lamina.drivers.overlay import OverlayDriver
    root = Path(sys.argv[1])
    out = {"uid_map": open("/proc/self/uid_map").read().split(),
           "reason": OverlayDriver.unavailable_reason(root)}
    d = OverlayDriver(DriverContext(root))
    out["opaque_xattr"] = d.opaque_xattr
    d.create("base", None, rw=False, opts=CreateOptions())
    v = d.mount("base", ["base"], rw=False)
    (v / "gone").write_text("x"); (v / "dir").mkdir(); (v / "dir" / "old").write_text("x")
    d.create("ctr", "base", rw=True, opts=CreateOptions())
    v = d.mount("ctr", ["ctr", "base"], rw=True)
    out["mounted"] = d.is_mounted("ctr")
    (v / "gone").unlink(); shutil.rmtree(v / "dir"); (v / "dir").mkdir(); (v / "dir" / "new").write_text("y")
    out["view"] = sorted(os.listdir(v)) + sorted(os.listdir(v / "dir"))
    d.unmount("ctr")
    out["changes"] = [str(c) for c in d.changes("ctr", "base")]
    out["opaque"] = os.getxattr(root / "layers/ctr/diff/dir", "user.overlay.opaque").decode()
    names = tarfile.open(fileobj=io.BytesIO(b"".join(d.diff("ctr", "base")))).getnames()
    out["diff"] = sorted(names)
    print(json.dumps(out))
"""


_IN_USERNS = ("unshare", "--user", "--map-root-user", "--mount")


def test_rootless_mount_in_a_user_namespace() -> None:
    """As an unprivileged user in its own user and mount namespace (what rootlesskit
    gives), the driver mounts with userxattr and marks opaque dirs with user.overlay.*"""
    require_overlay()
    require_tool("unshare")
    with nobody_python(AS_NOBODY + _IN_USERNS, deps=False) as nobody:
        store = nobody.work / "store"
        store.mkdir()
        os.chown(store, NOBODY, NOBODY)
        done = nobody.run("-c", textwrap.dedent(_ROOTLESS_CHILD), str(store),
                          prefix=AS_NOBODY + _IN_USERNS, timeout=120)
    if done.returncode != 0 and "unshare failed" in done.stderr:
        skip_or_fail(f"unprivileged user namespaces are off here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["uid_map"] == ["0", "65534", "1"]
    assert out["reason"] is None
    assert out["opaque_xattr"] == "user.overlay.opaque"
    assert out["mounted"] is True
    assert out["view"] == ["dir", "new"]
    assert sorted(out["changes"]) == ["A /dir/new", "C /dir", "D /dir/old", "D /gone"]
    assert out["opaque"] == "y"
    assert set(out["diff"]) == {"dir", "dir/.wh..wh..opq", "dir/new", ".wh.gone"}


def test_not_root_outside_a_user_namespace_is_unavailable_with_a_reason() -> None:
    require_overlay()
    code = ("from pathlib import Path; from lamina.drivers.overlay import OverlayDriver; "
            "from lamina.drivers.registry import default_driver; "
            "print(default_driver(Path('/tmp/nowhere')), OverlayDriver.unavailable_reason(Path('/tmp/nowhere')))")
    with nobody_python(deps=False) as nobody:
        done = nobody.run("-c", code)
    assert done.returncode == 0, done.stderr
    chosen, _, reason = done.stdout.partition(" ")
    assert chosen == "vfs", "the default driver falls back to vfs"
    assert "root" in reason and "user namespace" in reason


def test_probe_results_are_reused_across_opens(tmp_path: Path) -> None:
    """A probe mounts once; later opens read the cache (each CLI command is a process)."""
    require_overlay()
    r = tmp_path / "store"
    OverlayDriver(DriverContext(r))
    t = time.perf_counter()
    for _ in range(20):
        probe(r)
    assert (time.perf_counter() - t) / 20 < 0.005


def test_bench_quick_smoke_run() -> None:
    """bench/bench_overlay.py --quick runs to its summary (its numbers mean little)."""
    require_overlay()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_overlay.py"), "--quick", "--runs", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("summary: changes_speedup="), done.stdout
    assert "create_mount_ms=" in summary and "deep_mount_ms=" in summary


def test_a_stale_mount_is_replaced_not_stacked(driver: OverlayDriver, root: Path) -> None:
    driver.create("base", None, rw=False, opts=RO)
    driver.create("child", "base", rw=False, opts=RO)
    mount(driver, "child")
    view = mount(driver, "child")  # as after a crash lost the record of the first
    assert sum(1 for line in open("/proc/self/mountinfo") if f" {view} " in line) == 1
    driver.unmount("child")
    assert not is_mountpoint(view)
