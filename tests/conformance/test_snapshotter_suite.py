"""containerd's snapshotter conformance suite (``snapshots/testsuite``), ported, run
through lamina's gRPC face on every driver that serves it.

Each test talks to a fresh store over the real socket with containerd's messages, and
mounts what Prepare/View/Mounts return the way containerd's ``mount.All`` does
(:mod:`snapshotter_support`). Keys are the suite's own: absolute paths of the work
directory, and ``%p-%d``-style names, in one space with the committed names. The
test names are the suite's (``t.Run`` names, typos mended); Rename, which containerd
skips on overlay, runs here with mv(1)'s fallback where overlay refuses a directory
rename with EXDEV. The drivers are the registry's that can serve containerd
(:func:`lamina.snapshotter.service.serving_drivers`). Trees are compared with extended
attributes too (see :mod:`conformance.fstest`), and one test beyond the suite puts
some in layers.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from conformance.conftest import require_driver
from conformance.fstest import (
    Applier,
    apply_all,
    check_directory_equal,
    chown,
    create_dir,
    create_file,
    link,
    remove_all,
    rename,
    set_xattr,
)
from conftest import require_root
from lamina.fs.mount import mounts_under, umount
from lamina.snapshotter.errors import SnapshotterClosed
from lamina.snapshotter.service import serving_drivers
from snapshotter_support import (
    Client,
    InProcessSnapshotter,
    SnapshotError,
    mount_all,
    mounted,
    unmount_all,
)

#: the drivers of the registry that serve containerd
SNAPSHOTTER_DRIVERS = list(serving_drivers())
GC_ROOT = {"containerd.io/gc.root": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class Ctx:
    def __init__(self, server: InProcessSnapshotter, work: Path) -> None:
        self.server, self.sn, self.work = server, server.client, work


@pytest.fixture(params=SNAPSHOTTER_DRIVERS)
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ctx]:
    require_root()
    root = tmp_path / "root"
    require_driver(request.param, root)
    old = os.umask(0)  # the suite clears the umask (clearMask)
    server = InProcessSnapshotter(root, request.param)
    work = tmp_path / "work"
    work.mkdir(mode=0o777)
    try:
        yield Ctx(server, work)
    finally:
        os.umask(old)
        for point in sorted(mounts_under(tmp_path), reverse=True):
            umount(point)
        server.close()


def prepare_mount(c: Ctx, name: str, parent: str = "") -> Path:
    target = c.work / name
    target.mkdir(parents=True, exist_ok=True)
    mounts = c.sn.prepare(str(target), parent, GC_ROOT)
    assert mounts, "expected mounts to have entries"
    mount_all(mounts, target)
    return target


# -- the helpers of testsuite/helpers.go ---------------------------------------------------


def apply_to_mounts(c: Ctx, mounts: list, applier: Applier) -> None:
    td = c.work / f"prepare{random.randrange(1 << 30)}"
    with mounted(mounts, td):
        applier(td)
    td.rmdir()


def create_snapshot(c: Ctx, parent: str, applier: Applier) -> str:
    name = f"{id(applier):#x}-{random.randrange(1 << 62)}"
    prepare = f"{name}-prepare"
    mounts = c.sn.prepare(prepare, parent, GC_ROOT)
    apply_to_mounts(c, mounts, applier)
    c.sn.commit(name, prepare, GC_ROOT)
    return name


def check_snapshot(c: Ctx, name: str, check: Path) -> None:
    td = c.work / f"check{random.randrange(1 << 30)}"
    view = f"{name}-view"
    mounts = c.sn.view(view, name, GC_ROOT)
    try:
        with mounted(mounts, td):
            check_directory_equal(check, td)
    finally:
        c.sn.remove(view)
        td.rmdir()


def check_snapshots(c: Ctx, *appliers: Applier) -> None:
    flat = c.work / f"flat{random.randrange(1 << 30)}"
    flat.mkdir()
    parent = ""
    for applier in appliers:
        snap = create_snapshot(c, parent, applier)
        applier(flat)
        check_snapshot(c, snap, flat)
        parent = snap


def base_test_snapshots(sn: Client) -> None:
    sn.prepare("c1-a", "", GC_ROOT)
    sn.commit("c1", "c1-a", GC_ROOT)
    sn.prepare("c2-a", "c1", GC_ROOT)
    sn.commit("c2", "c2-a", GC_ROOT)
    sn.prepare("a1", "c2", GC_ROOT)
    sn.prepare("a2", "", GC_ROOT)
    sn.view("v1", "c2", GC_ROOT)
    sn.view("v2", "", GC_ROOT)


def raises(code: grpc.StatusCode | None = None) -> pytest.RaisesExc:
    return pytest.raises(SnapshotError, check=(lambda e: e.code == code) if code else None)


# -- testsuite.go ---------------------------------------------------------------------------


def test_basic(ctx: Ctx) -> None:
    c, sn = ctx, ctx.sn
    initial = apply_all(create_file("/foo", b"foo\n", 0o777), create_dir("/a", 0o755),
                        create_dir("/a/b", 0o755), create_dir("/a/b/c", 0o755))
    diff = apply_all(create_file("/bar", b"bar\n", 0o777), create_file("/foo", b"bar\n", 0o777),
                     remove_all("/a/b"))
    preparing = prepare_mount(c, "preparing")
    initial(preparing)
    unmount_all(preparing)
    committed = str(c.work / "committed")
    sn.commit(committed, str(preparing), GC_ROOT)
    si = sn.stat(committed)
    assert (si.parent, si.kind) == ("", "committed")
    with raises(grpc.StatusCode.NOT_FOUND):
        sn.stat(str(preparing))

    nxt = prepare_mount(c, "nextlayer", committed)
    flat = c.work / "flat-initial"
    flat.mkdir()
    initial(flat)
    check_directory_equal(nxt, flat)
    diff(nxt)
    unmount_all(nxt)
    ni = sn.stat(str(nxt))
    assert (ni.parent, ni.kind) == (committed, "active")
    next_committed = str(c.work / "committed-next")
    sn.commit(next_committed, str(nxt), GC_ROOT)
    si2 = sn.stat(next_committed)
    assert (si2.parent, si2.kind) == (committed, "committed")
    with raises(grpc.StatusCode.NOT_FOUND):
        sn.stat(str(nxt))
    walked = {i.name: i for i in sn.walk()}
    assert walked[si.name] == si and walked[si2.name] == si2

    nextnext = c.work / "nextnextlayer"
    nextnext.mkdir()
    mounts = sn.view(str(nextnext), next_committed, GC_ROOT)
    mount_all(mounts, nextnext)
    both = c.work / "flat-both"
    both.mkdir()
    apply_all(initial, diff)(both)
    try:
        check_directory_equal(nextnext, both)
    finally:
        unmount_all(nextnext)
    sn.remove(str(nextnext))
    with raises(grpc.StatusCode.FAILED_PRECONDITION) as e:
        sn.remove(committed)
    assert "remove" in str(e.value)
    sn.remove(next_committed)
    sn.remove(committed)


def test_stat_active(ctx: Ctx) -> None:
    preparing = prepare_mount(ctx, "preparing")
    (preparing / "foo").write_bytes(b"foo\n")
    si = ctx.sn.stat(str(preparing))
    assert (si.name, si.kind, si.parent) == (str(preparing), "active", "")


def test_stat_committed(ctx: Ctx) -> None:
    preparing = prepare_mount(ctx, "preparing")
    (preparing / "foo").write_bytes(b"foo\n")
    committed = str(ctx.work / "committed")
    ctx.sn.commit(committed, str(preparing), GC_ROOT)  # still mounted, as in the suite
    si = ctx.sn.stat(committed)
    assert (si.name, si.kind, si.parent) == (committed, "committed", "")


def test_transitivity(ctx: Ctx) -> None:
    sn = ctx.sn
    preparing = prepare_mount(ctx, "preparing")
    (preparing / "foo").write_bytes(b"foo\n")
    unmount_all(preparing)
    snap_a = str(ctx.work / "snapA")
    sn.commit(snap_a, str(preparing), GC_ROOT)
    nxt = prepare_mount(ctx, "next", snap_a)
    (nxt / "foo").write_bytes(b"foo bar\n")
    unmount_all(nxt)
    snap_b = str(ctx.work / "snapB")
    sn.commit(snap_b, str(nxt), GC_ROOT)
    si_a, si_b = sn.stat(snap_a), sn.stat(snap_b)
    si_parent_b = sn.stat(si_b.parent)
    assert (si_a.parent, si_b.parent, si_parent_b.parent) == ("", snap_a, "")


def test_prepare_view_failing(ctx: Ctx) -> None:
    sn = ctx.sn
    preparing = prepare_mount(ctx, "preparing")
    unmount_all(preparing)
    snap_a = str(ctx.work / "snapA")
    sn.commit(snap_a, str(preparing), GC_ROOT)
    new_layer = str(ctx.work / "newlayer")
    sn.prepare(new_layer, snap_a, GC_ROOT)
    with raises(grpc.StatusCode.ALREADY_EXISTS):
        sn.view(new_layer, snap_a, GC_ROOT)
    prep_layer = str(ctx.work / "prepLayer")
    sn.prepare(prep_layer, snap_a, GC_ROOT)
    with raises(grpc.StatusCode.ALREADY_EXISTS):
        sn.prepare(prep_layer, snap_a, GC_ROOT)
    view_layer = str(ctx.work / "viewLayer")
    sn.view(view_layer, snap_a, GC_ROOT)
    with raises(grpc.StatusCode.ALREADY_EXISTS):
        sn.view(view_layer, snap_a, GC_ROOT)


def test_update(ctx: Ctx) -> None:
    sn = ctx.sn
    t1 = time.time_ns()
    base_test_snapshots(sn)
    t2 = time.time_ns()
    cases = [("c1", "committed", ""), ("c2", "committed", "c1"), ("a1", "active", "c2"),
             ("a2", "active", ""), ("v1", "view", "c2"), ("v2", "view", "")]
    for name, kind, parent in cases:
        st = sn.stat(name)
        assert t1 <= st.created <= t2, name
        assert st.created == st.updated, name
        assert (st.kind, st.parent, st.name) == (kind, parent, name)
        created = st.created
        root_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", "containerd.io/gc.root": root_time}
        st.parent, st.labels = "doesnotexist", dict(expected)
        u1 = time.time_ns()
        st = sn.update(st)
        u2 = time.time_ns()
        assert st.created == created
        assert u1 <= st.updated <= u2
        assert (st.kind, st.parent, st.name) == (kind, parent, name)
        assert st.labels == expected

        st.labels = {"l1": "updated", "l4": "v4"}
        st = sn.update(st, "labels.l1", "labels.l2")
        assert st.labels == {"l1": "updated", "l3": "v3", "containerd.io/gc.root": root_time}

        expected = {"l4": "v4", "containerd.io/gc.root": root_time}
        st.labels = dict(expected)
        st = sn.update(st, "labels")
        assert st.labels == expected

        st.parent = "doesnotexist"
        with raises(grpc.StatusCode.INVALID_ARGUMENT):
            sn.update(st, "parent")


def test_remove(ctx: Ctx) -> None:
    sn = ctx.sn
    sn.prepare("committed-a", "", GC_ROOT)
    sn.commit("committed-1", "committed-a", GC_ROOT)
    sn.prepare("reuse-1", "committed-1", GC_ROOT)
    sn.remove("reuse-1")
    sn.view("reuse-1", "committed-1", GC_ROOT)
    sn.remove("reuse-1")
    sn.prepare("reuse-1", "", GC_ROOT)
    sn.remove("committed-1")
    sn.commit("committed-1", "reuse-1", GC_ROOT)


def test_walk(ctx: Ctx) -> None:
    sn = ctx.sn
    opt = {"containerd.io/gc.root": "check-walk"}
    sn.prepare("a-np", "", opt)
    sn.prepare("p-tmp", "", opt)
    sn.commit("p", "p-tmp", opt)
    sn.prepare("a", "p", opt)
    sn.view("v", "p", opt)
    sn.prepare("p-wl-tmp", "", opt)
    sn.commit("p-wl", "p-wl-tmp", {"l": "1", **opt})
    sn.prepare("a-wl", "p-wl", {"l": "2", **opt})
    sn.view("v-wl", "p-wl", {"l": "3", **opt})
    sn.prepare("a-np-wl", "", {"l": "2", **opt})
    cases = [
        (["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"], ['labels."containerd.io/gc.root"==check-walk']),
        (["a-np", "a", "a-wl", "a-np-wl"], ['kind==active,labels."containerd.io/gc.root"==check-walk']),
        (["v", "v-wl"], ['kind==view,labels."containerd.io/gc.root"==check-walk']),
        (["p", "p-wl"], ['kind==committed,labels."containerd.io/gc.root"==check-walk']),
        (["p", "a-np-wl"], ["name==p", "name==a-np-wl"]),
        (["a-wl"], ["name==a-wl,labels.l"]),
        (["a", "v"], ["parent==p"]),
        (["a", "v", "a-wl", "v-wl"], ['parent!="",labels."containerd.io/gc.root"==check-walk']),
        (["p-wl", "a-wl", "v-wl", "a-np-wl"], ["labels.l"]),
        (["a-wl", "a-np-wl"], ["labels.l==2"]),
    ]
    for i, (matches, filters) in enumerate(cases):
        assert sorted(i.name for i in sn.walk(*filters)) == sorted(matches), (i, filters)


def test_view_readonly(ctx: Ctx) -> None:
    sn = ctx.sn
    preparing = str(ctx.work / "preparing")
    sn.prepare(preparing, "", GC_ROOT)
    committed = str(ctx.work / "committed")
    sn.commit(committed, preparing, GC_ROOT)
    view = str(ctx.work / "view")
    m = sn.view(view, committed, GC_ROOT)
    point = ctx.work / "view-mount"
    point.mkdir()
    mount_all(m, point)
    try:
        with pytest.raises(OSError):
            (point / "testfile").write_bytes(b"testcontent")
    finally:
        unmount_all(point)
    sn.remove(view)
    sn.remove(committed)


def test_close_twice(ctx: Ctx) -> None:
    """The snapshotter, after some work, closed twice: neither close raises. Here the
    snapshotter is the service (and its store) with its gRPC server; once closed, a
    call is refused as containerd's Unavailable, through gRPC and in Python alike, not
    a failure somewhere inside a closed store."""
    n = f"closeTwice-{random.randrange(1 << 62)}"
    ctx.sn.prepare(f"{n}-prepare", "", GC_ROOT)
    ctx.sn.commit(n, f"{n}-prepare", GC_ROOT)
    ctx.sn.remove(n)
    service = ctx.server.service
    service.close()
    service.close()
    assert service.closed
    with raises(grpc.StatusCode.UNAVAILABLE) as e:
        ctx.sn.prepare(f"{n}-after", "", GC_ROOT)
    assert "closed" in e.value.message
    ctx.server.close()
    ctx.server.close()
    with pytest.raises(SnapshotterClosed):
        service.stat(n)


def test_root_permission(ctx: Ctx) -> None:
    preparing = prepare_mount(ctx, "preparing")
    assert os.stat(preparing).st_mode & 0o777 == 0o755


def test_128_layers_mount(ctx: Ctx) -> None:
    lowest = apply_all(
        create_file("/bottom", b"way at the bottom\n", 0o777),
        create_file("/overwriteme", b"FIRST!\n", 0o777),
        create_dir("/ADDHERE", 0o755), create_dir("/ONLYME", 0o755),
        create_file("/ONLYME/bottom", b"bye!\n", 0o777))
    appliers = [lowest] + [apply_all(
        create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
        create_file(f"/ADDHERE/file-{i}", b"same\n", 0o755),
        remove_all("/ONLYME"), create_dir("/ONLYME", 0o755),
        create_file(f"/ONLYME/file-{i}", b"only me!\n", 0o777)) for i in range(1, 128)]
    flat = ctx.work / "flat"
    flat.mkdir()
    parent = ""
    for i, applier in enumerate(appliers):
        preparing = ctx.work / f"prepare-layer-{i}"
        preparing.mkdir()
        mounts = ctx.sn.prepare(str(preparing), parent, GC_ROOT)
        mount_all(mounts, preparing)
        try:
            check_directory_equal(preparing, flat)
            applier(flat)
            applier(preparing)
            check_directory_equal(preparing, flat)
        finally:
            unmount_all(preparing)
        parent = str(ctx.work / f"committed-{i}")
        ctx.sn.commit(parent, str(preparing), GC_ROOT)
    view = ctx.work / "fullview"
    view.mkdir()
    with mounted(ctx.sn.view(str(view), parent, GC_ROOT), view):
        check_directory_equal(view, flat)


def test_stat_in_walk(ctx: Ctx) -> None:
    sn, prefix = ctx.sn, "stats-in-walk-"
    sn.prepare(f"{prefix}c1-a", "", GC_ROOT)
    sn.commit(f"{prefix}c1", f"{prefix}c1-a", GC_ROOT)
    sn.prepare(f"{prefix}c2-a", f"{prefix}c1", GC_ROOT)
    sn.commit(f"{prefix}c2", f"{prefix}c2-a", GC_ROOT)
    sn.prepare(f"{prefix}a1", f"{prefix}c2", GC_ROOT)
    sn.view(f"{prefix}v1", f"{prefix}c2", GC_ROOT)
    statted = []
    for si in sn.walk_stream():  # Stat inside the walk, with the List stream still open
        if si.name.startswith(prefix):
            assert sn.stat(si.name) == si
            statted.append(si.name)
    assert sorted(statted) == [f"{prefix}{n}" for n in ("a1", "c1", "c2", "v1")]


# -- issues.go --------------------------------------------------------------------------------


def test_layer_file_update(ctx: Ctx) -> None:
    l1 = apply_all(create_dir("/etc", 0o700), create_file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
                   create_file("/etc/profile", b"PATH=/usr/bin", 0o644))
    l2 = apply_all(create_file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
                   create_file("/etc/profile", b"PATH=/usr/bin", 0o666),
                   create_dir("/root", 0o700), create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644))
    sleep = 0.0
    for _ in range(5):  # across second boundaries: same-size rewrites must still show
        time.sleep(sleep)
        check_snapshots(ctx, l1, l2)
        now = time.time()
        sleep = int(now) + 1 - now


def test_remove_directory_in_lower_layer(ctx: Ctx) -> None:
    check_snapshots(ctx,
                    apply_all(create_dir("/lib", 0o700), create_file("/lib/hidden", b"", 0o644)),
                    apply_all(remove_all("/lib"), create_dir("/lib", 0o700), create_file("/lib/not-hidden", b"", 0o644)),
                    apply_all(create_file("/lib/newfile", b"", 0o644)))


def test_chown(ctx: Ctx) -> None:
    check_snapshots(ctx,
                    apply_all(create_dir("/opt", 0o700), create_dir("/opt/a", 0o700), create_dir("/opt/a/b", 0o700),
                              create_file("/opt/a/b/file.txt", b"hello", 0o644)),
                    apply_all(chown("/opt", 1, 1), chown("/opt/a", 1, 1), chown("/opt/a/b", 1, 1),
                              chown("/opt/a/b/file.txt", 1, 1)))


def test_directory_permission_on_commit(ctx: Ctx) -> None:
    check_snapshots(ctx,
                    apply_all(create_dir("/dir1", 0o700), create_dir("/dir2", 0o700), create_dir("/dir3", 0o700),
                              create_dir("/dir4", 0o700), create_file("/dir4/f1", b"...", 0o644),
                              create_dir("/dir5", 0o700), create_file("/dir5/f1", b"...", 0o644),
                              chown("/dir1", 1, 1), chown("/dir2", 1, 1), chown("/dir3", 1, 1),
                              chown("/dir5", 1, 1), chown("/dir5/f1", 1, 1)),
                    apply_all(chown("/dir2", 0, 0), remove_all("/dir3"), chown("/dir4", 1, 1),
                              chown("/dir4/f1", 1, 1)),
                    apply_all(create_dir("/dir3", 0o700), chown("/dir3", 1, 1), remove_all("/dir5"),
                              create_dir("/dir5", 0o700), chown("/dir5", 1, 1)))


def test_remove_intermediate_snapshot(ctx: Ctx) -> None:
    sn = ctx.sn
    base = prepare_mount(ctx, "base")
    unmount_all(base)  # unmount before commit, as the suite does
    committed_base = str(ctx.work / "committed-base")
    sn.commit(committed_base, str(base), GC_ROOT)
    intermediate = str(ctx.work / "intermediate")
    sn.prepare(intermediate, committed_base, GC_ROOT)
    committed_inter = str(ctx.work / "committed-inter")
    sn.commit(committed_inter, intermediate, GC_ROOT)
    top = str(ctx.work / "toplayer")
    sn.prepare(top, committed_inter, GC_ROOT)
    with raises(grpc.StatusCode.FAILED_PRECONDITION):
        sn.remove(committed_inter)
    sn.remove(top)
    sn.remove(committed_inter)
    sn.remove(committed_base)
    assert sn.walk() == []


def test_deleted_files_in_child_snapshot(ctx: Ctx) -> None:
    check_snapshots(ctx,
                    apply_all(create_file("/foo", b"foo\n", 0o777), create_file("/foobar", b"foobar\n", 0o777)),
                    apply_all(remove_all("/foobar")),
                    apply_all())


def test_move_file_from_lower_layer(ctx: Ctx) -> None:
    check_snapshots(ctx,
                    apply_all(create_dir("/dir1", 0o700), create_file("/dir1/f1", b"Hello", 0o644),
                              create_dir("dir2", 0o700), create_file("dir2/f2", b"...", 0o644)),
                    apply_all(create_dir("/dir3", 0o700), create_file("/dir3/f1", b"Hello", 0o644),
                              remove_all("/dir1"), link("dir2/f2", "dir3/f2"), remove_all("dir2/f2")))


def test_rename(ctx: Ctx) -> None:
    check_snapshots(ctx,
                    apply_all(create_dir("/dir1", 0o700), create_dir("/somefiles", 0o700),
                              create_file("/somefiles/f1", b"was here first!", 0o644),
                              create_file("/somefiles/f2", b"nothing interesting", 0o644)),
                    apply_all(rename("/dir1", "/dir2"),
                              create_file("/somefiles/f1-overwrite", b"new content 1", 0o644),
                              rename("/somefiles/f1-overwrite", "/somefiles/f1"),
                              rename("/somefiles/f2", "/somefiles/f3")))


# -- beyond the suite -------------------------------------------------------------------------


def test_xattrs_are_kept_through_layers(ctx: Ctx) -> None:
    """Extended attributes a layer sets, changes in a child, or leaves to a copy-up
    (a write to a file of a lower layer) are what a view shows."""
    check_snapshots(ctx,
                    apply_all(create_dir("/bin", 0o755), create_file("/bin/ping", b"ping", 0o755),
                              set_xattr("/bin/ping", "security.capability",
                                        bytes.fromhex("0100000200200000000000000000000000000000")),
                              create_file("/data", b"one", 0o644), set_xattr("/data", "user.origin", b"base"),
                              set_xattr("/bin", "user.dir", b"kept")),
                    apply_all(set_xattr("/data", "user.origin", b"child"),
                              create_file("/bin/ping", b"ping v2", 0o755)),  # copy-up, keeps its capability
                    apply_all(create_file("/new", b"", 0o600), set_xattr("/new", "user.empty", b"")))


def test_the_tree_comparison_sees_xattrs(tmp_path: Path) -> None:
    """The comparison above can fail: two trees that differ only in an xattr differ."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        create_file("/f", b"same", 0o644)(d)
    set_xattr("/f", "user.x", b"1")(a)
    with pytest.raises(AssertionError, match="/f"):
        check_directory_equal(a, b)
    set_xattr("/f", "user.x", b"1")(b)
    check_directory_equal(a, b)
