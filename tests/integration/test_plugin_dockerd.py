"""A real dockerd (Debian's docker.io) keeping its images and containers in lamina.

One plugin process and one private dockerd (own data-root, exec-root and socket,
``--experimental -s <plugin> --iptables=false --bridge=none``) serve the whole module;
the tests run in file order and the later ones restart or crash the pair on purpose.
Images come from ``docker import`` of a busybox root built here: there is no network.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import missing_tool, require_dockerd, run_cli, skip_or_fail
from dockerd import DockerDaemon, busybox_rootfs_tar
from plugin_process import PluginProcess

IMAGE = "lamina-busybox:1"
COMMITTED = "lamina-busybox:committed"
WRITE_CHANGE_DELETE = "echo new > /new.txt; echo changed >> /etc/passwd; rm /etc/group; mkdir /d; echo x > /d/f"


@dataclass
class Env:
    plugin: PluginProcess
    daemon: DockerDaemon
    work: Path

    @property
    def store(self) -> Path:
        return self.plugin.store_root(self.daemon.data_root)

    def docker(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        try:
            return self.daemon.docker(*args, **kwargs)  # type: ignore[arg-type]
        except Exception as e:
            raise AssertionError(f"{e}\n{self.plugin.log_tail()}") from None

    def layers(self) -> set[str]:
        """IDs of the complete layers in the store, read by the lamina CLI."""
        res = run_cli("--json", "ls", root=self.store)
        assert res.returncode == 0, res.stderr.decode()
        data = json.loads(res.stdout)
        rows = data["layers"] if isinstance(data, dict) else data
        return {row["id"] for row in rows}

    def restart_both(self) -> None:
        self.daemon.stop()
        assert self.plugin.stop() == 0, self.plugin.log_tail()
        self.plugin.start()
        self.daemon.start()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_dockerd()
    if not Path("/bin/busybox").exists():
        skip_or_fail(f"/bin/busybox missing: {missing_tool('busybox')}")
    work = tmp_path_factory.mktemp("dockerd-lamina")
    plugin = PluginProcess(work / "plugin")
    plugin.start()
    daemon = DockerDaemon(work / "docker", storage_driver=plugin.name)
    try:
        daemon.start()
        e = Env(plugin, daemon, work)
        e.docker("import", str(busybox_rootfs_tar(work / "rootfs.tar")), IMAGE)
        yield e
    finally:
        daemon.close()
        plugin.close()


def test_dockerd_uses_the_plugin(env: Env) -> None:
    info = env.daemon.info()
    assert info["Driver"] == env.plugin.name
    status = dict(info["DriverStatus"])  # type: ignore[arg-type]
    assert status["Root"] == str(env.store)
    assert (env.store / "lamina.json").is_file()
    image_layer = env.docker("image", "inspect", "--format", "{{json .GraphDriver}}", IMAGE).stdout
    assert json.loads(image_layer)["Name"] == env.plugin.name
    assert len(env.layers()) == 1


def test_run_diff_commit_and_run_the_commit(env: Env) -> None:
    env.docker("run", "--name", "changer", "--network", "none", IMAGE, "sh", "-c", WRITE_CHANGE_DELETE)
    diff = set(env.docker("diff", "changer").stdout.splitlines())
    assert diff == {"A /new.txt", "A /d", "A /d/f", "C /etc", "C /etc/passwd", "D /etc/group"}
    # DiffSize (docker ps -s) and GetMetadata (docker inspect) reach the plugin too
    size = env.docker("ps", "-a", "-s", "--filter", "name=changer", "--format", "{{.Size}}").stdout
    assert size.strip() and not size.startswith("0B"), size
    graph = json.loads(env.docker("inspect", "--format", "{{json .GraphDriver}}", "changer").stdout)
    assert graph["Name"] == env.plugin.name and isinstance(graph["Data"], dict)
    env.docker("commit", "changer", COMMITTED)
    out = env.docker("run", "--rm", "--network", "none", COMMITTED, "sh", "-c",
                     "cat /new.txt; tail -1 /etc/passwd; test -e /etc/group || echo gone; cat /d/f").stdout
    assert out.split() == ["new", "changed", "gone", "x"]


def test_save_rmi_load_gives_the_same_layer_digests(env: Env) -> None:
    def layers(ref: str) -> list[str]:
        return json.loads(env.docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", ref).stdout)

    before = layers(COMMITTED)
    image_id = env.docker("image", "inspect", "--format", "{{.Id}}", COMMITTED).stdout.strip()
    assert len(before) == 2
    saved = env.work / "committed.tar"
    env.docker("save", "-o", str(saved), COMMITTED)
    env.docker("rmi", COMMITTED)
    env.docker("load", "-i", str(saved))
    assert layers(COMMITTED) == before
    assert env.docker("image", "inspect", "--format", "{{.Id}}", COMMITTED).stdout.strip() == image_id
    out = env.docker("run", "--rm", "--network", "none", COMMITTED, "cat", "/d/f").stdout
    assert out == "x\n"


def test_ten_containers_start_in_parallel(env: Env) -> None:
    def run(i: int) -> subprocess.CompletedProcess[str]:
        return env.daemon.docker("run", "--rm", "--network", "none", IMAGE, "sh", "-c",
                                 f"echo {i} > /mine; cat /mine", check=False, timeout=180)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(run, range(10)))
    for i, res in enumerate(results):
        assert res.returncode == 0, f"container {i}: {res.stderr}\n{env.plugin.log_tail()}"
        assert res.stdout == f"{i}\n"


def test_rm_and_rmi_remove_their_layers_from_the_store(env: Env) -> None:
    start = env.layers()
    env.docker("create", "--name", "short-lived", "--network", "none", IMAGE, "true")
    with_container = env.layers()
    assert len(with_container - start) == 2  # the container's layer and its -init layer
    env.docker("rm", "short-lived")
    assert env.layers() == start

    extra = busybox_rootfs_tar(env.work / "other.tar", extra={"etc/other": b"other\n"})
    env.docker("import", str(extra), "lamina-other:1")
    assert len(env.layers() - start) == 1
    env.docker("rmi", "lamina-other:1")
    assert env.layers() == start


def test_restart_keeps_images_and_stopped_containers(env: Env) -> None:
    env.docker("run", "--name", "keeper", "--network", "none", IMAGE, "sh", "-c", "echo kept > /kept")
    images = set(env.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split())
    assert {IMAGE, COMMITTED} <= images
    layers = env.layers()

    env.restart_both()

    assert set(env.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()) == images
    names = set(env.docker("ps", "-a", "--format", "{{.Names}}").stdout.split())
    assert {"keeper", "changer"} <= names
    assert env.layers() == layers
    assert set(env.docker("diff", "changer").stdout.splitlines()) == {
        "A /new.txt", "A /d", "A /d/f", "C /etc", "C /etc/passwd", "D /etc/group"}
    env.docker("start", "keeper")
    env.docker("wait", "keeper")
    out = env.docker("run", "--rm", "--network", "none", COMMITTED, "cat", "/new.txt").stdout
    assert out == "new\n"
    assert "A /kept" in env.docker("diff", "keeper").stdout.splitlines()


def test_killing_the_plugin_during_load_leaves_no_half_layer(env: Env) -> None:
    # an image with one big layer, saved, then removed, to be loaded again
    big = busybox_rootfs_tar(env.work / "big-rootfs.tar", extra={"big/blob": os.urandom(96 << 20)})
    env.docker("import", str(big), "lamina-big:1")
    archive = env.work / "big.tar"
    env.docker("save", "-o", str(archive), "lamina-big:1")
    env.docker("rmi", "lamina-big:1")
    big.unlink()
    before = env.layers()
    marker = len(env.plugin.log_text())

    load = env.daemon.docker_popen("load", "-i", str(archive), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while "ApplyDiff" not in env.plugin.log_text()[marker:] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "ApplyDiff" in env.plugin.log_text()[marker:], env.plugin.log_tail()
    # kill it once the import has begun writing (ROOT/tmp holds work in progress)
    while not any((env.store / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.005)
    env.plugin.kill()

    mended = run_cli("cleanup", root=env.store)
    assert mended.returncode == 0, mended.stderr.decode()
    assert "dropped half-made layer" in mended.stdout.decode(), mended.stdout.decode()
    assert env.layers() == before

    env.plugin.start()
    _, err = load.communicate(timeout=120)
    assert load.returncode != 0, "docker load went on as if nothing had happened"
    assert "lamina-big:1" not in env.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
    assert env.layers() == before

    # and the same archive loads whole afterwards
    env.docker("load", "-i", str(archive))
    out = env.docker("run", "--rm", "--network", "none", "lamina-big:1", "sh", "-c", "wc -c < /big/blob").stdout
    assert out.strip() == str(96 << 20)
