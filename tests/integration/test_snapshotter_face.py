"""The snapshotter face on its own: filters, error codes, usage, records, recovery,
readiness. (containerd's own suite is tests/conformance/test_snapshotter_suite.py; a
real containerd is tests/integration/test_snapshotter_containerd.py.)"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import lamina
from conftest import require_overlay, run_cli
from lamina.errors import ChainTooDeep, LayerNamedBySnapshot, LayerNotFound
from lamina.fs.mount import mounts_under, umount
from lamina.records import LayerState
from lamina.snapshotter.filters import InvalidFilter, parse_all
from lamina.snapshotter.service import SnapshotService
from snapshotter_support import (
    Client,
    InProcessSnapshotter,
    Mount,
    SnapshotError,
    SnapshotterProcess,
    half_made_snapshot,
    interrupted_removal,
    mounted,
    short_socket_dir,
)

NOT_FOUND, EXISTS = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS
PRECONDITION, INVALID = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def snap(tmp_path: Path) -> Iterator[InProcessSnapshotter]:
    s = InProcessSnapshotter(tmp_path / "store", "vfs")  # vfs: no mounts, no root needed
    yield s
    s.close()


def code_of(fn, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(SnapshotError) as e:
        fn(*args)
    return e.value.code


def _fields(**f: str):  # type: ignore[no-untyped-def]
    labels = {k.removeprefix("l_"): v for k, v in f.items() if k.startswith("l_")}

    def field(path):  # type: ignore[no-untyped-def]
        if path[0] == "labels":
            if not labels:
                return "", False
            key = ".".join(path[1:])
            return labels.get(key, ""), key in labels
        return f.get(path[0], ""), path[0] in f
    return field


@pytest.mark.parametrize(("flt", "match"), [
    (["kind==active"], True), (["kind==view"], False), (["kind!=view"], True),
    (['labels."containerd.io/gc.root"==x'], True), (["labels.other"], False),
    (["kind~=^act"], True), (["name~=/a.*c/"], True), (["name~=|^a.c$|"], True),
    (["kind==view", "name==abc"], True), (["kind==view,name==abc"], False),
    (['name=="abc"'], True), (['name=="a\\x62c"'], True), (["parent!=\"\""], False),
    ([""], True), ([], True), (["name==abc,labels.\"containerd.io/gc.root\""], True),
])
def test_filters_match_as_containerd(flt: list[str], match: bool) -> None:
    fields = _fields(kind="active", name="abc", parent="", **{"l_containerd.io/gc.root": "x"})
    assert parse_all(flt).matches(fields) is match


@pytest.mark.parametrize("bad", ["name==/tmp/x", "kind==", "==x", "name==a b", 'name=="unterminated',
                                 "name=/x/", "labels.", "a,,b", 'labels."\\q"'])
def test_malformed_filters_are_invalid(bad: str) -> None:
    with pytest.raises(InvalidFilter):
        parse_all([bad])


def test_error_codes(snap: InProcessSnapshotter) -> None:
    sn = snap.client
    sn.prepare("a")
    assert code_of(sn.prepare, "a") == EXISTS
    assert code_of(sn.prepare, "b", "a") == INVALID  # parent not committed
    assert code_of(sn.prepare, "b", "nothing") == NOT_FOUND
    assert code_of(sn.prepare, "") == INVALID
    sn.commit("A", "a")
    assert code_of(sn.mounts, "A") == PRECONDITION
    assert code_of(sn.commit, "B", "A") == PRECONDITION  # not active
    assert code_of(sn.commit, "B", "nothing") == NOT_FOUND
    sn.view("v", "A")
    assert code_of(sn.commit, "V", "v") == PRECONDITION
    sn.prepare("b")
    assert code_of(sn.commit, "A", "b") == EXISTS  # names and keys share one space
    assert code_of(sn.commit, "v", "b") == EXISTS
    assert code_of(sn.remove, "A") == PRECONDITION  # has a child (the view)
    assert code_of(sn.stat, "nothing") == NOT_FOUND
    assert code_of(sn.usage, "nothing") == NOT_FOUND
    assert code_of(sn.walk, "name==/x") == INVALID
    assert code_of(sn.prepare, "c", "", {"k": "x" * 5000}) == INVALID


def test_usage_and_commit_measure_the_layer(snap: InProcessSnapshotter) -> None:
    sn = snap.client
    (m,) = sn.prepare("a")
    Path(m.source, "f").write_bytes(b"x" * 100_000)
    size, inodes = sn.usage("a")
    assert inodes == 2 and size >= 100_000
    sn.commit("A", "a", {"after": "commit"})
    assert sn.usage("A") == (size, inodes)
    info = sn.stat("A")
    assert info.labels == {"after": "commit"} and info.created == info.updated
    sn.view("v", "A")
    assert sn.usage("v") == (0, 0)


@pytest.fixture(params=["vfs", "overlay"])
def any_snap(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InProcessSnapshotter]:
    if request.param == "overlay":
        require_overlay()
    s = InProcessSnapshotter(tmp_path / "store", request.param)
    yield s
    for point in mounts_under(tmp_path):
        umount(point)
    s.close()


def test_cleanup_rpc_mends_what_interrupted_calls_left(any_snap: InProcessSnapshotter) -> None:
    """containerd's Cleanup (called after its garbage collection) finishes an
    interrupted Remove and drops a half-made Prepare, rows and layers alike, and leaves
    every whole snapshot as it was."""
    sn, store = any_snap.client, any_snap.store
    sn.prepare("base-a")
    sn.commit("base", "base-a")
    sn.prepare("keep", "base")
    sn.prepare("going", "base")
    gone = interrupted_removal(store, "going")
    half = half_made_snapshot(store, "half")
    for layer in (gone, half):
        assert store.driver.layer_dir(layer).exists()
    assert sorted(i.name for i in sn.walk()) == ["base", "keep"]  # neither is seen meanwhile
    with pytest.raises(SnapshotError) as e:
        sn.prepare("half")  # the key is taken until Cleanup frees it
    assert e.value.code == EXISTS
    sn.cleanup()
    with store.records.read() as db:
        rows = {s.key: s.layer for s in db.snapshots(ready_only=False)}
        raw = {r.id: r.state for r in db.layers()}
    assert set(rows) == {"base", "keep"}
    assert set(raw) == set(rows.values()) and set(raw.values()) == {"ready"}
    for layer in (gone, half):
        assert not store.driver.layer_dir(layer).exists()
    assert run_cli("--root", str(store.root), "check", "--fast").returncode == 0
    sn.prepare("half")  # free again
    sn.cleanup()  # nothing to do: changes nothing
    assert sorted(i.name for i in sn.walk()) == ["base", "half", "keep"]


def test_calls_beside_a_running_cleanup_never_fail(any_snap: InProcessSnapshotter) -> None:
    """containerd runs Cleanup in the background after each garbage collection, beside
    whatever its clients call meanwhile: Cleanup's looks and short holds on layers must
    not make a Prepare, Commit, View or Remove fail as busy (a Commit did, in CI)."""
    sn = any_snap.client
    sn.prepare("base-a")
    sn.commit("base", "base-a")
    other = Client(any_snap.socket)
    stop, failures = threading.Event(), []

    def clean() -> None:
        while not stop.is_set():
            try:
                other.cleanup()
            except SnapshotError as e:  # pragma: no cover - what the test is about
                failures.append(f"cleanup: {e}")

    cleaners = [threading.Thread(target=clean) for _ in range(2)]
    for t in cleaners:
        t.start()
    try:
        for i in range(100):
            sn.prepare(f"a{i}", "base")
            sn.mounts(f"a{i}")
            sn.commit(f"c{i}", f"a{i}")
            sn.view(f"v{i}", f"c{i}")
            sn.remove(f"v{i}")
            sn.remove(f"c{i}")
    finally:
        stop.set()
        for t in cleaners:
            t.join()
        other.close()
    assert failures == []
    assert [i.name for i in sn.walk()] == ["base"]


def _du(path: str) -> tuple[int, int]:
    """coreutils du's count of a tree: (bytes allocated, inodes), hard links once."""
    size = subprocess.run(["du", "-s", "-B1", path], capture_output=True, text=True, check=True)
    inodes = subprocess.run(["du", "-s", "--inodes", path], capture_output=True, text=True, check=True)
    return int(size.stdout.split()[0]), int(inodes.stdout.split()[0])


def _upperdir(mounts: list[Mount]) -> str:
    (m,) = mounts
    if m.type == "bind":
        return m.source
    return next(o.removeprefix("upperdir=") for o in m.options if o.startswith("upperdir="))


def test_usage_on_overlay_is_what_du_counts(tmp_path: Path) -> None:
    """Usage of an active snapshot is its own upper directory now (not its parents'),
    of a committed one what it was at commit: bytes allocated and inodes, as du counts
    them and containerd's overlayfs snapshotter reports."""
    require_overlay()
    snap = InProcessSnapshotter(tmp_path / "store", "overlay")
    try:
        sn = snap.client
        m = sn.prepare("a")
        with mounted(m, tmp_path / "a") as root:
            (root / "dir").mkdir()
            (root / "dir" / "four-k").write_bytes(b"x" * 4096)
            (root / "forty-k").write_bytes(os.urandom(40960))
            (root / "empty").write_bytes(b"")
            os.link(root / "forty-k", root / "dir" / "same-inode")
        size, inodes = sn.usage("a")
        assert inodes == 5  # the root, dir and three files: the hard link adds none
        assert size >= 4096 + 40960
        assert (size, inodes) == _du(_upperdir(m))
        sn.commit("A", "a")
        assert sn.usage("A") == (size, inodes)
        m = sn.prepare("b", "A")
        with mounted(m, tmp_path / "b") as root:
            assert (root / "forty-k").stat().st_size == 40960  # the parent's, not counted
            (root / "new").write_bytes(b"y" * 8192)
            with open(root / "dir" / "four-k", "ab") as f:  # a copy-up: the child's now
                f.write(b"z")
        b_size, b_inodes = sn.usage("b")
        assert b_inodes == 4  # the root, the copied-up dir and file, the new file
        assert 8192 + 4096 <= b_size < size
        assert (b_size, b_inodes) == _du(_upperdir(m))
        sn.commit("B", "b")
        assert sn.usage("B") == (b_size, b_inodes)
        assert sn.usage("A") == (size, inodes)
    finally:
        for point in mounts_under(tmp_path):
            umount(point)
        snap.close()


def test_snapshots_are_layers_of_the_store(snap: InProcessSnapshotter, tmp_path: Path) -> None:
    sn = snap.client
    sn.prepare("default/1/extract-1 sha256:abc")
    sn.commit("default/2/sha256:abc", "default/1/extract-1 sha256:abc")
    sn.prepare("default/3/container", "default/2/sha256:abc")
    with snap.store.records.read() as db:
        rows = {s.key: s for s in db.snapshots()}
    committed, active = rows["default/2/sha256:abc"], rows["default/3/container"]
    assert not snap.store.layer(committed.layer).rw and snap.store.layer(active.layer).rw
    assert snap.store.layer(active.layer).parent == committed.layer
    out = run_cli("--root", str(tmp_path / "store"), "--json", "ls")
    assert committed.layer in out.stdout.decode() and active.layer in out.stdout.decode()
    assert run_cli("--root", str(tmp_path / "store"), "check").returncode == 0


def test_recovery_forgets_snapshots_whose_layer_is_gone(tmp_path: Path) -> None:
    store = lamina.open(tmp_path / "store", "vfs")
    svc = SnapshotService(store)
    svc.prepare("a")
    svc.commit("A", "a")
    svc.prepare("b", "A")
    layer = next(s.layer for s in svc.list() if s.key == "b")
    # as if a Remove died after marking its layer, and a cleanup finished the layer's
    # removal without the snapshotter's hook that drops the row
    store.remove(layer, snapshot="b")
    assert [s.key for s in svc.list()] == ["A"]  # a row without its layer is not seen
    assert svc.recover() == ["forgot snapshot 'b': its layer is gone"]
    svc.prepare("b", "A")  # the key is free again
    with pytest.raises(LayerNotFound):
        store.layer("no-such-layer")
    store.close()


def test_lamina_rm_of_a_snapshot_layer_is_refused_naming_the_key(snap: InProcessSnapshotter,
                                                                 tmp_path: Path) -> None:
    sn = snap.client
    sn.prepare("default/1/extract-1 sha256:abc")
    sn.commit("default/2/sha256:abc", "default/1/extract-1 sha256:abc")
    sn.prepare("default/3/container", "default/2/sha256:abc")
    rows = {s.key: s.layer for s in snap.service.list()}
    active = rows["default/3/container"]
    with pytest.raises(LayerNamedBySnapshot) as e:
        snap.store.remove(active)
    assert e.value.key == "default/3/container" and e.value.kind == "active"
    root = str(tmp_path / "store")
    out = run_cli("--root", root, "--json", "rm", active)
    assert out.returncode == 1
    (failed,) = json.loads(out.stdout)["failed"]
    assert failed["kind"] == "LayerNamedBySnapshot" and "'default/3/container'" in failed["message"]
    assert "'default/3/container'" in out.stderr.decode()
    assert snap.store.exists(active) and "default/3/container" in {s.key for s in snap.service.list()}
    # through the snapshotter it goes, and its row with it
    sn.remove("default/3/container")
    assert not snap.store.exists(active)
    # a plain layer beside them is still removed as ever
    snap.store.create("f" * 64)
    assert run_cli("--root", root, "rm", "f" * 64).returncode == 0


def test_lamina_ls_shows_each_layers_containerd_key(snap: InProcessSnapshotter, tmp_path: Path) -> None:
    sn = snap.client
    sn.prepare("default/1/extract-1 sha256:abc")
    sn.commit("default/2/sha256:abc", "default/1/extract-1 sha256:abc")
    sn.prepare("default/3/container", "default/2/sha256:abc")
    snap.store.create("p" * 64)
    rows = {s.key: s.layer for s in snap.service.list()}
    root = str(tmp_path / "store")
    listed = {r["id"]: r["snapshot"] for r in json.loads(run_cli("--root", root, "--json", "ls").stdout)}
    assert listed == {rows["default/2/sha256:abc"]: "default/2/sha256:abc",
                      rows["default/3/container"]: "default/3/container", "p" * 64: None}
    lines = run_cli("--root", root, "ls").stdout.decode().splitlines()
    assert lines[0].split() == ["ID", "PARENT", "KIND", "SIZE", "MOUNTS", "SNAPSHOT"]
    table = {line.split()[0]: line for line in lines[1:]}
    assert table[rows["default/3/container"]].endswith("  default/3/container")
    assert table["p" * 64].endswith("  -")


def _set_row(store: lamina.Store, key: str, sql: str, *args: object) -> None:
    """Damage one snapshot row, as a bug or a hand at the database would."""
    with store.records.write() as db:
        db._db.execute(f"UPDATE snapshots SET {sql} WHERE key = ?", (*args, key))


def test_check_reports_snapshots_whose_layer_is_missing_or_unfinished(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = lamina.open(root, "vfs")
    svc = SnapshotService(store)
    svc.prepare("a")
    svc.commit("A", "a")
    svc.prepare("gone", "A")
    svc.prepare("half", "A")
    rows = {s.key: s.layer for s in svc.list()}
    _set_row(store, "gone", "layer = ?", "0" * 32)  # its layer has no record
    with store.records.write() as db:  # a Prepare killed while its layer was made
        db.set_state(rows["half"], LayerState.CREATING)
    out = run_cli("--root", str(root), "--json", "check", "--fast")
    assert out.returncode == 1
    problems = {(p["layer"], p["message"]) for p in json.loads(out.stdout)["problems"]}
    assert ("0" * 32, "containerd snapshot 'gone' names this layer, which has no record") in problems
    assert (rows["half"], "containerd snapshot 'half' names this layer, whose creation was interrupted") in problems
    fixed = run_cli("--root", str(root), "--json", "check", "--fast", "--repair")
    assert fixed.returncode == 0, fixed.stdout
    repaired = json.loads(fixed.stdout)["repaired"]
    assert "forgot snapshot 'gone': its layer is gone" in repaired
    assert f"dropped half-made layer {rows['half']}" in repaired
    assert "forgot snapshot 'half': its layer is gone" in repaired
    with store.records.read() as db:
        assert [s.key for s in db.snapshots(ready_only=False)] == ["A"]
    assert run_cli("--root", str(root), "check", "--fast").returncode == 0
    store.close()


def test_check_reports_a_snapshot_that_disagrees_with_its_layer(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = lamina.open(root, "vfs")
    svc = SnapshotService(store)
    svc.prepare("a")
    svc.commit("A", "a")
    svc.prepare("b", "A")
    svc.prepare("c")
    _set_row(store, "b", "kind = 'committed'")
    _set_row(store, "c", "parent = 'A'")
    out = run_cli("--root", str(root), "--json", "check", "--fast", "--repair")
    assert out.returncode == 1
    found = {p["message"]: p["repairable"] for p in json.loads(out.stdout)["problems"]}
    assert found == {
        "containerd snapshot 'b': it is committed but its layer is read-write": False,
        f"containerd snapshot 'c': its parent 'A' is layer {svc.stat('A').layer}, but its layer's parent is None":
            False,
    }
    assert {s.key for s in svc.list()} == {"A", "b", "c"}, "never repaired away"
    store.close()


def test_a_failed_rollback_does_not_hide_why_prepare_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Prepare's own error reaches the client even when undoing it fails too; the
    rollback's failure is logged, and what it left is mended later."""
    store = lamina.open(tmp_path / "store", "vfs")
    svc = SnapshotService(store)

    def refuse(layer_id: str) -> list:  # type: ignore[type-arg]
        raise ChainTooDeep(f"layer {layer_id}: too deep for containerd")

    def broken_remove(layer_id: str, **kw: object) -> None:
        raise OSError(errno.EIO, "disk went away")

    monkeypatch.setattr(store, "mount_specs", refuse)
    monkeypatch.setattr(store, "remove", broken_remove)
    with caplog.at_level(logging.ERROR, logger="lamina.snapshotter.service"):
        with pytest.raises(ChainTooDeep, match="too deep") as e:
            svc.prepare("k")
    assert any("disk went away" in note for note in e.value.__notes__)
    assert "undoing it failed too: [Errno 5] disk went away" in caplog.text
    monkeypatch.undo()
    # the layer could not go, so its row stays, for containerd's GC (or Remove) to drop
    assert [s.key for s in svc.list()] == ["k"]
    svc.remove("k")
    assert store.layers() == []
    store.close()


def test_deep_chain_refused_when_containerd_could_not_mount_it(tmp_path: Path) -> None:
    require_overlay()
    store = lamina.open(tmp_path / "store", "overlay")
    svc = SnapshotService(store)
    parent = ""
    for i in range(200):
        try:
            svc.prepare(f"k{i}", parent)
        except Exception as e:  # noqa: BLE001 - the refusal is what is looked for
            assert "one page" in str(e), e
            assert i >= 129  # 128 layers must mount
            assert f"k{i}" not in {s.key for s in svc.list()}
            break
        svc.commit(f"c{i}", f"k{i}")
        parent = f"c{i}"
    else:
        pytest.fail("a 200-layer chain was accepted")
    assert len(store.layers()) == i  # the refused layer was not kept
    store.close()


def test_server_tells_systemd_when_ready(tmp_path: Path) -> None:
    sockdir = short_socket_dir()
    notify = sockdir / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(60)
    proc = SnapshotterProcess(tmp_path, tmp_path / "store", "vfs", sockdir / "s.sock")
    try:
        # nothing waits for the socket here: READY=1 alone must mean it answers
        proc.start(env={"NOTIFY_SOCKET": str(notify)}, wait=False)
        assert listener.recv(100) == b"READY=1"
        client = Client(proc.socket)  # at once, no retry: gRPC fails fast if nobody listens
        try:
            assert client.walk() == []
            with pytest.raises(SnapshotError) as e:
                client.stat("nothing")
            assert e.value.code == NOT_FOUND
        finally:
            client.close()
    finally:
        proc.stop()
        listener.close()
        shutil.rmtree(sockdir, ignore_errors=True)
