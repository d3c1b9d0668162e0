"""A real containerd (Debian's 1.6, with runc) keeping its layers in lamina.

One private containerd and one ``lamina serve containerd-snapshotter`` (overlay) per
module, lamina loaded as the proxy plugin ``lamina``; everything is checked with ``ctr``
and, across faces, with lamina's own store API on the same root.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
from conformance.fstest import check_directory_equal
from conftest import require_containerd, run_cli
from containerd import ContainerdDaemon, ContainerdError
from dockerd import busybox_rootfs_tar, ensure_cgroups
from images_support import Image, docker_save, layer_tar
from lamina.fs.mount import mounts_under, umount
from lamina.snapshotter.service import SnapshotService
from snapshotter_support import (
    Mount,
    SnapshotterProcess,
    half_made_snapshot,
    interrupted_removal,
    mount_one,
    short_socket_dir,
    unmount_all,
)

IMAGE = "docker.io/lamina-test/union:1"


def _layers(tmp: Path) -> list[bytes]:
    base = busybox_rootfs_tar(tmp / "rootfs.tar", extra={"etc/motd": b"hello\n"}).read_bytes()
    second = layer_tar({"data/keep.txt": b"keep\n", "data/gone.txt": b"gone\n", "opq/old1": b"1\n",
                        "opq/old2": b"2\n", "etc/motd": b"second\n"}, dirs=["data", "opq"])
    third = layer_tar({"data/gone.txt": None, "opq/.wh..wh..opq": b"", "opq/new": b"new\n",
                       "etc/motd": b"third\n"}, dirs=["opq"])
    return [base, second, third]


def chain_id(layers: list[bytes]) -> str:
    chain = ""
    for tar in layers:
        diff = "sha256:" + hashlib.sha256(tar).hexdigest()
        chain = diff if not chain else "sha256:" + hashlib.sha256(f"{chain} {diff}".encode()).hexdigest()
    return chain


class Rig:
    def __init__(self, tmp: Path, options: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.root = tmp / "lamina"
        self.sockdir = short_socket_dir()
        self.lamina = SnapshotterProcess(tmp, self.root, "overlay", self.sockdir / "l.sock", options)
        self.containerd = ContainerdDaemon(tmp / "containerd", proxy={"lamina": self.lamina.socket})
        self.layers = _layers(tmp)
        self.image_tar = docker_save(tmp / "image.tar", [Image(self.layers, names=["lamina-test/union:1"])])

    def ctr(self, *args: str, check: bool = True) -> str:
        return self.containerd.ctr(*args, check=check).stdout

    def snapshots(self) -> dict[str, object]:
        """key -> SnapshotRecord, read from the store directly (another face)."""
        with lamina.open(self.root) as store, store.records.read() as db:
            return {s.key: s for s in db.snapshots()}

    def gc(self) -> None:
        """A garbage collection pass: ``images rm --sync`` of a throwaway image runs one
        and waits for it (containerd 1.6 has no other way to ask for one)."""
        tar = docker_save(self.tmp / "gc-trigger.tar", [Image(
            [layer_tar({"x": b"%d" % random.randrange(1 << 60)})], names=["lamina-test/gc-trigger:1"])])
        self.ctr("images", "import", "--no-unpack", str(tar))
        self.ctr("images", "rm", "--sync", "docker.io/lamina-test/gc-trigger:1")

    def layer_ids(self) -> set[str]:
        with lamina.open(self.root) as store:
            return {r.id for r in store.layers()}

    def raw(self) -> tuple[dict[str, str], dict[str, str]]:
        """(layer ID -> state, every record in any state; snapshot key -> layer, every
        row, seen or not): what the API hides, to check what it must not show."""
        with lamina.open(self.root) as store, store.records.read() as db:
            return ({r.id: r.state.value for r in db.layers()},
                    {s.key: s.layer for s in db.snapshots(ready_only=False)})


@contextlib.contextmanager
def running_rig(tmp: Path, options: dict[str, str] | None = None) -> Iterator[Rig]:
    require_containerd()
    ensure_cgroups()
    r = Rig(tmp, options)
    r.lamina.start()
    try:
        r.containerd.start()
        r.ctr("images", "import", "--snapshotter", "lamina", str(r.image_tar))
        yield r
    finally:
        r.containerd.close()
        r.lamina.stop()
        for point in sorted(mounts_under(r.tmp), reverse=True):
            umount(point)
        shutil.rmtree(r.sockdir, ignore_errors=True)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with running_rig(tmp_path_factory.mktemp("ctd")) as r:
        yield r


def test_plugin_is_loaded(rig: Rig) -> None:
    lines = [ln.split() for ln in rig.ctr("plugins", "ls").splitlines()]
    assert ["io.containerd.snapshotter.v1", "lamina", "-", "ok"] in lines


def test_imported_rootfs_is_the_union_of_the_layers(rig: Rig, tmp_path: Path) -> None:
    top = chain_id(rig.layers)
    info = rig.ctr("snapshots", "--snapshotter", "lamina", "info", top)
    assert '"Kind": "Committed"' in info
    # the other faces' union: apply the same tars in a plain vfs store
    with lamina.open(tmp_path / "vfs", "vfs") as ref:
        parent = None
        for i, tar in enumerate(rig.layers):
            ref.apply_diff(f"l{i}", parent, _reader(tar))
            parent = f"l{i}"
        expected = ref.driver.layer_dir(parent)
        rig.ctr("snapshots", "--snapshotter", "lamina", "view", "union-check", top)
        try:
            printed = rig.ctr("snapshots", "--snapshotter", "lamina", "mounts", str(tmp_path / "mnt"), "union-check")
            target = tmp_path / "mnt"
            target.mkdir()
            for line in printed.splitlines():
                argv = shlex.split(line)  # mount -t TYPE SOURCE TARGET -o OPTIONS
                assert argv[:2] == ["mount", "-t"], line
                mount_one(Mount(argv[2], argv[3], tuple(argv[6].split(","))), target)
            try:
                check_directory_equal(expected, target)
                assert (target / "etc/motd").read_bytes() == b"third\n"
                assert sorted(os.listdir(target / "opq")) == ["new"]
                assert sorted(os.listdir(target / "data")) == ["keep.txt"]
            finally:
                unmount_all(target)
        finally:
            rig.ctr("snapshots", "--snapshotter", "lamina", "rm", "union-check")
    # every committed layer is a read-only lamina layer, named in the snapshot records
    snaps = rig.snapshots()
    committed = [s for s in snaps.values() if s.kind == "committed"]
    assert len(committed) >= 3
    with lamina.open(rig.root) as store:
        for s in committed:
            assert not store.layer(s.layer).rw


def _reader(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def test_run_writes_modifies_deletes(rig: Rig) -> None:
    script = ("echo new > /root/new.txt && echo changed >> /etc/motd && rm /data/keep.txt"
              " && cat /etc/motd && ls /data /opq")
    rig.gc()  # what earlier tests removed goes first, so that before and after compare
    layers_before, rows_before = rig.raw()
    out = rig.ctr("run", "--snapshotter", "lamina", "--rm", IMAGE, "t-rm", "sh", "-c", script)
    assert "third\nchanged" in out
    assert "keep.txt" not in out and "gone.txt" not in out and "old1" not in out
    # --rm removes the container's own snapshot with it: at once from containerd's
    # metadata; from lamina when containerd's garbage collector next runs (its Remove
    # only marks it; this daemon collects on request), then no row, no layer, in any state
    assert "t-rm" not in rig.ctr("snapshots", "--snapshotter", "lamina", "ls")
    rig.gc()
    layers_after, rows_after = rig.raw()
    assert not [k for k in rows_after if k.endswith("/t-rm")]
    assert rows_after == rows_before and layers_after == layers_before
    # a kept container: its rw layer seen by lamina's own changes
    rig.ctr("run", "--snapshotter", "lamina", IMAGE, "t-keep", "sh", "-c", script)
    snaps = rig.snapshots()
    key = next(k for k in snaps if k.endswith("/t-keep"))
    assert snaps[key].kind == "active"
    with lamina.open(rig.root) as store:
        layer = snaps[key].layer
        assert store.layer(layer).rw
        changes = {str(c) for c in store.changes(layer)}
    assert {"A /root/new.txt", "C /etc/motd", "D /data/keep.txt"} <= changes
    rig.ctr("containers", "rm", "t-keep")
    rig.gc()
    assert layer not in rig.layer_ids()


def test_ctr_snapshots_commands(rig: Rig) -> None:
    top = chain_id(rig.layers)
    s = ("snapshots", "--snapshotter", "lamina")
    rig.ctr(*s, "prepare", "s-active", top)
    rig.ctr(*s, "commit", "s-committed", "s-active")
    rig.ctr(*s, "view", "s-view", "s-committed")
    listing = rig.ctr(*s, "ls")
    rows = {ln.split()[0]: ln.split() for ln in listing.splitlines()[1:]}
    assert rows["s-committed"][1:] == [top, "Committed"]
    assert rows["s-view"][1:] == ["s-committed", "View"]
    assert "s-active" not in rows
    parents = tree_parents(rig.ctr(*s, "tree"))
    # the image's chain from its base, then the committed snapshot, then the view on it
    assert parents["s-view"] == "s-committed"
    assert parents["s-committed"] == top
    assert parents[top] == chain_id(rig.layers[:2])
    assert parents[chain_id(rig.layers[:2])] == chain_id(rig.layers[:1])
    assert parents[chain_id(rig.layers[:1])] is None
    assert "s-active" not in parents
    usage = rig.ctr(*s, "usage", "s-committed")
    assert "s-committed" in usage
    rig.ctr(*s, "label", "s-committed", "lamina.test=yes")
    assert '"lamina.test": "yes"' in rig.ctr(*s, "info", "s-committed")
    refused = rig.containerd.ctr(*s, "rm", "s-committed", check=False)
    assert refused.returncode != 0 and "child" in refused.stderr
    rig.ctr(*s, "rm", "s-view")
    rig.ctr(*s, "rm", "s-committed")
    assert "s-committed" not in rig.ctr(*s, "ls")


def tree_parents(text: str) -> dict[str, str | None]:
    """``ctr snapshots tree`` as name -> parent: a root is printed as `` NAME``, a child
    two spaces deeper per level as ``\\_ NAME``."""
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        body = line.lstrip(" ")
        if body.startswith("\\_"):
            depth = (len(line) - len(body)) // 2
            name = body[2:].strip()
        else:
            depth, name = 0, body.strip()
        assert depth <= len(stack), f"a child deeper than its parent: {line!r}"
        del stack[depth:]
        parents[name] = stack[-1] if stack else None
        stack.append(name)
    return parents


def test_image_rm_and_gc_remove_layers(rig: Rig, tmp_path: Path) -> None:
    extra = layer_tar({"only-here.txt": b"%d\n" % random.randrange(1 << 60)})
    layers = [*rig.layers, extra]
    tar = docker_save(tmp_path / "gc.tar", [Image(layers, names=["lamina-test/gc:1"])])
    rig.ctr("images", "import", "--snapshotter", "lamina", str(tar))
    top = chain_id(layers)
    snaps = rig.snapshots()
    key = next(k for k, v in snaps.items() if k.endswith("/" + top))
    layer = snaps[key].layer
    assert layer in rig.layer_ids()
    rig.ctr("images", "rm", "--sync", "docker.io/lamina-test/gc:1")
    deadline = time.monotonic() + 30
    while layer in rig.layer_ids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert layer not in rig.layer_ids()
    # the shared layers of the first image stay
    assert chain_id(rig.layers) in rig.ctr("snapshots", "--snapshotter", "lamina", "ls")


def test_restarts_keep_images_snapshots_and_running_containers(rig: Rig) -> None:
    rig.ctr("run", "-d", "--snapshotter", "lamina", IMAGE, "t-long", "sleep", "300")
    try:
        before = rig.ctr("snapshots", "--snapshotter", "lamina", "ls")
        rig.lamina.kill()  # lamina dies under a running container
        rig.lamina.start()
        assert "RUNNING" in rig.ctr("tasks", "ls")
        out = rig.ctr("tasks", "exec", "--exec-id", "probe", "t-long", "cat", "/etc/motd")
        assert out == "third\n"
        rig.containerd.stop()
        rig.lamina.stop()
        rig.lamina.start()
        rig.containerd.start()
        assert IMAGE in rig.ctr("images", "ls", "-q")
        assert rig.ctr("snapshots", "--snapshotter", "lamina", "ls") == before
        out = rig.ctr("run", "--snapshotter", "lamina", "--rm", IMAGE, "t-after", "cat", "/etc/motd")
        assert out == "third\n"
    finally:
        rig.ctr("tasks", "kill", "-s", "SIGKILL", "t-long", check=False)
        time.sleep(0.5)
        rig.ctr("tasks", "delete", "-f", "t-long", check=False)
        rig.ctr("containers", "rm", "t-long", check=False)


def test_lamina_killed_during_import_leaves_no_half_layer(rig: Rig, tmp_path: Path) -> None:
    big = [layer_tar({f"blob{j}.bin": os.urandom(1 << 20) for j in range(24)}) for _ in range(4)]
    layers = [rig.layers[0], *big]
    tar = docker_save(tmp_path / "big.tar", [Image(layers, names=["lamina-test/big:1"])])
    before = set(rig.snapshots())
    # the import runs in the background; lamina is killed once two of its layers exist
    imp = subprocess.Popen(["ctr", "--address", str(rig.containerd.socket), "--namespace", "lamina-test",
                            "images", "import", "--snapshotter", "lamina", str(tar)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(set(rig.snapshots()) - before) < 2 and imp.poll() is None:
        time.sleep(0.02)
    rig.lamina.kill()
    imp.wait(120)
    assert imp.returncode != 0, "the import finished before lamina was killed: make it bigger"
    # before lamina is back: whatever was half-made (any record not ready) is named by
    # no snapshot a call can see, and every snapshot a call sees has a whole layer
    with lamina.open(rig.root) as store, store.records.read() as db:
        raw = {r.id: r.state.value for r in db.layers()}
        seen = {s.key: s.layer for s in db.snapshots()}
    assert all(raw.get(layer) == "ready" for layer in seen.values()), (raw, seen)
    assert not {lid for lid, state in raw.items() if state != "ready"} & set(seen.values())
    rig.lamina.start()
    check = run_cli("--root", str(rig.root), "check")
    assert check.returncode == 0, check.stdout + check.stderr
    # and after: every record whole, every row (seen or not) naming one
    raw, rows = rig.raw()
    assert set(raw.values()) <= {"ready"}, raw
    assert all(raw.get(layer) == "ready" for layer in rows.values()), (raw, rows)
    # the same import, again, works
    rig.ctr("images", "import", "--snapshotter", "lamina", str(tar))
    out = rig.ctr("run", "--snapshotter", "lamina", "--rm", "docker.io/lamina-test/big:1", "t-big",
                  "ls", "/blob0.bin")
    assert "blob0.bin" in out
    rig.ctr("images", "rm", "--sync", "docker.io/lamina-test/big:1")


def test_garbage_collection_calls_cleanup(rig: Rig) -> None:
    """containerd calls the snapshotter's Cleanup after a garbage collection: what a
    killed Prepare and a killed Remove left in lamina is gone after ``images rm --sync``,
    without lamina restarting."""
    with lamina.open(rig.root) as store:
        svc = SnapshotService(store)
        svc.prepare("gc-probe/going")
        half = half_made_snapshot(store, "gc-probe/half")
        going = interrupted_removal(store, "gc-probe/going")
    raw, rows = rig.raw()
    assert raw[half] == "creating" and raw[going] == "removing"
    # containerd collects (and then cleans up) a snapshotter only when one of its
    # snapshots went from its metadata since the last collection: remove one
    s = ("snapshots", "--snapshotter", "lamina")
    rig.ctr(*s, "prepare", "gc-probe-trigger")
    rig.ctr(*s, "rm", "gc-probe-trigger")
    rig.gc()
    raw, rows = rig.raw()
    assert half not in raw and going not in raw
    assert not [k for k in rows if k.startswith("gc-probe/")]
    assert "dropped half-made layer" in rig.lamina.log_path.read_text()


def test_errors_reach_ctr_as_containerd_errors(rig: Rig) -> None:
    s = ("snapshots", "--snapshotter", "lamina")
    with pytest.raises(ContainerdError, match="not found"):
        rig.ctr(*s, "info", "no-such-snapshot")


#: layers of the deep image: past the 128 of containerd's own suite, and past overlay2's
#: 128 lowers (the container's snapshot has one more layer than the image)
DEEP = 130


def test_a_container_runs_on_a_chain_of_130_layers(rig: Rig, tmp_path: Path) -> None:
    """containerd unpacks 130 layers into lamina (each Prepare mounted over all before
    it) and runs a container over them: its mounts are performed by containerd's own
    mount code and the shim, and runc reads the result."""
    base = busybox_rootfs_tar(tmp_path / "deep-root.tar", extra={"bottom.txt": b"from the bottom layer\n"})
    layers = [base.read_bytes()] + [
        layer_tar({f"layers/{i:03d}": b"%d\n" % i, "top.txt": b"from layer %d\n" % i}, dirs=["layers"])
        for i in range(1, DEEP)]
    tar = docker_save(tmp_path / "deep.tar", [Image(layers, names=["lamina-test/deep:1"])])
    rig.ctr("images", "import", "--snapshotter", "lamina", str(tar))
    try:
        top = chain_id(layers)
        snaps = rig.snapshots()
        key = next(k for k in snaps if k.endswith("/" + top))
        with lamina.open(rig.root) as store:
            assert len(store.chain(snaps[key].layer)) == DEEP
        out = rig.ctr("run", "--rm", "--snapshotter", "lamina", "docker.io/lamina-test/deep:1", "t-deep",
                      "sh", "-c", "cat /bottom.txt /top.txt; ls /layers | wc -l")
        assert out.split("\n") == ["from the bottom layer", f"from layer {DEEP - 1}", str(DEEP - 1), ""]
    finally:
        rig.ctr("images", "rm", "--sync", "docker.io/lamina-test/deep:1", check=False)


def _loop_devices(image: Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True).stdout
    return [line.split(":", 1)[0] for line in out.splitlines()]


def test_cleanup_of_the_store_keeps_a_running_containers_sized_snapshot(tmp_path: Path) -> None:
    """Every active snapshot has a size limit (``overlay.size``, on loop images): a
    container runs on one, mounted by containerd's shim where the store does not see it.
    ``lamina cleanup --unmount-all`` (what the Docker plugin's Cleanup does too, on a
    shared store) must leave its image mounted and say so, and containerd's next Mounts
    must not put the image on a second loop device under the running container."""
    from conftest import require_loop

    require_loop()
    opts = {"overlay.size": "64M", "overlay.quota": "loop"}
    with running_rig(tmp_path / "rig", opts) as r:
        r.ctr("run", "-d", "--snapshotter", "lamina", IMAGE, "t-sized", "sleep", "300")
        try:
            key = next(k for k in r.snapshots() if k.endswith("/t-sized"))
            layer = r.snapshots()[key].layer
            image = r.root / "layers" / layer / "size.img"
            assert len(_loop_devices(image)) == 1
            r.ctr("tasks", "exec", "--exec-id", "w1", "t-sized", "sh", "-c", "echo before > /kept")
            cli_opts = [a for k, v in opts.items() for a in ("--opt", f"{k}={v}")]
            out = run_cli("--root", str(r.root), *cli_opts, "cleanup", "--unmount-all")
            assert out.returncode == 1, out
            assert f"not released: layer {layer}" in out.stderr.decode()
            assert len(_loop_devices(image)) == 1
            r.ctr("snapshots", "--snapshotter", "lamina", "mounts", str(tmp_path / "m"), "t-sized")  # Mounts
            r.ctr("snapshots", "--snapshotter", "lamina", "usage", "t-sized")  # Usage
            assert len(_loop_devices(image)) == 1, "one image on two loop devices: two filesystems on one file"
            out = r.ctr("tasks", "exec", "--exec-id", "w2", "t-sized", "sh", "-c",
                        "echo after >> /kept && cat /kept")
            assert out == "before\nafter\n"
        finally:
            r.ctr("tasks", "kill", "-s", "SIGKILL", "t-sized", check=False)
            time.sleep(0.5)
            r.ctr("tasks", "delete", "-f", "t-sized", check=False)
            r.ctr("containers", "rm", "t-sized", check=False)
        r.gc()
        assert layer not in r.layer_ids()
        assert _loop_devices(image) == []
