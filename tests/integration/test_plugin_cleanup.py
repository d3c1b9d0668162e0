"""dockerd's Cleanup through the plugin releases every mount the store made, a sized
layer's image and loop device included (moby graphtest's DriverTestSetQuota leaves such
a layer behind and then deletes the root), and the layer works again afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_loop, require_overlay
from lamina.fs.mount import mounts_under
from lamina.plugin.docker import DockerPlugin
from plugin_client import Dockerd, ThreadServer

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
