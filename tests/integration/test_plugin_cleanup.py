"""dockerd's Cleanup through the plugin releases every mount the store made, a sized
layer's image and loop device included (moby graphtest's DriverTestSetQuota leaves such
a layer behind and then deletes the root), and the layer works again afterwards.

On a store shared with the containerd snapshotter, a sized snapshot may be mounted by
containerd (under a running container) where the store cannot see it: Cleanup, through
the plugin or ``lamina cleanup --unmount-all``, must then keep its image mounted and say
so, and the next Mounts must not attach the image to a second loop device."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
from conftest import require_loop, require_overlay, run_cli
from lamina.fs.locks import FileLock
from lamina.fs.mount import mounts_under
from lamina.plugin.docker import DockerPlugin
from lamina.snapshotter.service import SnapshotService
from plugin_client import Dockerd, ThreadServer
from snapshotter_support import mount_all, unmount_all

BASE = "d" * 64
SIZED = "e" * 64


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[tuple[Dockerd, Path]]:
    require_overlay()
    require_loop()
    sockdir = Path(tempfile.mkdtemp(prefix="lpc-", dir="/tmp"))
    plugin = DockerPlugin(driver="overlay", options={"overlay.quota": "loop"},
                          state_path=tmp_path / "state.json")
    srv = ThreadServer(plugin, sockdir / "lamina.sock").start()
    home = tmp_path / "home"
    try:
        client = Dockerd(srv.sock)
        client.ok("Init", Home=str(home))
        yield client, home
    finally:
        srv.stop()
        plugin.close()
        for point in mounts_under(tmp_path):
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(sockdir, ignore_errors=True)


def _left(home: Path, *, settle: bool = True) -> tuple[list[str], str]:
    """Mount points under the store root, and what ``losetup -j`` says is attached to the
    sized layer's image; with ``settle``, after giving the kernel a moment to let a loop
    device go (it does so from a work queue after the last unmount)."""
    image = home / "layers" / SIZED / "size.img"
    for _ in range(100 if settle else 1):
        points = [p for p in mounts_under(home) if p != os.path.realpath(home)]
        attached = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True,
                                  check=True).stdout.strip()
        if not points and not attached:
            break
        time.sleep(0.05)
    return points, attached


def test_cleanup_releases_a_sized_layer_and_its_loop_device(plugin: tuple[Dockerd, Path]) -> None:
    docker, home = plugin
    docker.ok("Create", ID=BASE)
    docker.ok("CreateReadWrite", ID=SIZED, Parent=BASE, StorageOpt={"size": "50M"})
    view = Path(docker.ok("Get", ID=SIZED)["Dir"])
    (view / "kept").write_bytes(b"written before Cleanup")
    points, attached = _left(home, settle=False)
    assert points and attached, "the sized layer is mounted on a loop device while in use"

    docker.ok("Cleanup")  # dockerd's shutdown: DriverTestSetQuota never Puts nor Removes
    assert _left(home) == ([], ""), "Cleanup left a mount or a loop device"

    view = Path(docker.ok("Get", ID=SIZED)["Dir"])  # the next use mounts it again
    assert (view / "kept").read_bytes() == b"written before Cleanup"
    with pytest.raises(OSError):  # still limited: 50M is the most it holds
        with open(view / "big", "wb") as f:
            f.write(b"\0" * (64 << 20))
            f.flush()
            os.fsync(f.fileno())
    docker.ok("Put", ID=SIZED)
    docker.ok("Cleanup")
    assert _left(home) == ([], "")
    docker.ok("Remove", ID=SIZED)
    docker.ok("Remove", ID=BASE)


def _loop_devices(image: Path) -> list[str]:
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True).stdout
    return [line.split(":", 1)[0] for line in out.splitlines()]


class SizedSnapshot:
    """A containerd snapshot with a size limit on the plugin's store, mounted where
    containerd mounts a container's rootfs: outside the store, unseen by it."""

    def __init__(self, home: Path, target: Path) -> None:
        self.store = lamina.open(home, "overlay", {"overlay.quota": "loop", "overlay.size": "50M"})
        self.service = SnapshotService(self.store)
        self.target = target
        target.mkdir()
        mount_all(self.service.prepare("default/1/ctr"), target)
        (target / "inside").write_bytes(b"written by the container")
        (self.layer,) = [s.layer for s in self.service.list()]
        self.image = home / "layers" / self.layer / "size.img"

    def close(self) -> None:
        unmount_all(self.target)
        self.store.close()


@pytest.fixture
def sized_snapshot(plugin: tuple[Dockerd, Path], tmp_path: Path) -> Iterator[tuple[Dockerd, SizedSnapshot]]:
    docker, home = plugin
    snap = SizedSnapshot(home, tmp_path / "container-rootfs")
    try:
        yield docker, snap
    finally:
        snap.close()


def test_cleanup_keeps_a_sized_snapshot_containerd_still_mounts(
        sized_snapshot: tuple[Dockerd, SizedSnapshot]) -> None:
    docker, snap = sized_snapshot
    assert len(_loop_devices(snap.image)) == 1
    reply = docker.call("Cleanup")
    err = reply.json.get("Err", "")
    assert snap.layer in err and "still in use" in err, "Cleanup must say what it could not release"
    assert len(_loop_devices(snap.image)) == 1
    # containerd asks for the mounts again (a task restart, a second container): the
    # same filesystem, never the image on a second loop device
    snap.service.mounts("default/1/ctr")
    snap.service.usage("default/1/ctr")
    assert len(_loop_devices(snap.image)) == 1, "one file on two loop devices: two filesystems on one image"
    assert (snap.target / "inside").read_bytes() == b"written by the container"
    # the container is gone: now it is released, and comes back on one device
    unmount_all(snap.target)
    docker.ok("Cleanup")
    assert _loop_devices(snap.image) == []
    mounts = snap.service.mounts("default/1/ctr")
    assert len(_loop_devices(snap.image)) == 1
    mount_all(mounts, snap.target)
    assert (snap.target / "inside").read_bytes() == b"written by the container"


def test_cli_cleanup_unmount_all_keeps_what_containerd_mounts(
        sized_snapshot: tuple[Dockerd, SizedSnapshot]) -> None:
    _, snap = sized_snapshot
    out = run_cli("--root", str(snap.store.root), "--opt", "overlay.quota=loop", "cleanup", "--unmount-all")
    assert out.returncode == 1, out
    assert f"not released: layer {snap.layer}" in out.stderr.decode()
    assert len(_loop_devices(snap.image)) == 1
    snap.service.mounts("default/1/ctr")
    assert len(_loop_devices(snap.image)) == 1
    unmount_all(snap.target)
    out = run_cli("--root", str(snap.store.root), "--opt", "overlay.quota=loop", "--json", "cleanup",
                  "--unmount-all")
    assert out.returncode == 0, out
    assert f"released the size-limit image of layer {snap.layer}" in out.stdout.decode()
    assert _loop_devices(snap.image) == []


def test_cleanup_that_cannot_judge_the_mounts_says_so(plugin: tuple[Dockerd, Path]) -> None:
    """When the store's mounts keep being made (here: one held in flight for the whole
    call) Cleanup cannot tell what is safe to release: it answers an error saying so,
    not OK, and leaves the sized image mounted."""
    docker, home = plugin
    docker.ok("Create", ID=BASE)
    docker.ok("CreateReadWrite", ID=SIZED, Parent=BASE, StorageOpt={"size": "50M"})
    docker.ok("Get", ID=SIZED)
    docker.ok("Put", ID=SIZED)
    in_flight = FileLock(home / "locks" / "mounting.lock")
    in_flight.acquire(shared=True)  # what every kernel mount of the store holds
    try:
        err = docker.call("Cleanup").json.get("Err", "")
    finally:
        in_flight.release()
    assert "mounts kept being made" in err, err
    assert _left(home, settle=False)[1], "the sized image stays attached"
    docker.ok("Cleanup")
    assert _left(home) == ([], "")
