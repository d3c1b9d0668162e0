"""The graph-driver plugin server at the HTTP level, spoken to as dockerd speaks.

Every request here is what ``daemon/graphdriver/proxy.go`` sends: POST, JSON with a
trailing newline and no Content-Type, ``Accept: application/vnd.docker.plugins.v1.2+json``,
omitted keys for empty values, and ApplyDiff's tar as a *chunked* body. The answers are
checked key by key against ``shared/reference/graphdriver-protocol.md`` §1.4.
The store behind the server is a real one (vfs driver) in a temporary directory.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiohttp import web

from conftest import require_tool
from lamina.plugin import wire
from lamina.plugin.bridge import send_stream
from lamina.plugin.docker import DockerPlugin
from plugin_client import ACCEPT, Dockerd, ThreadServer
from procs import UnixHTTPConnection

REPO = Path(__file__).resolve().parents[2]
ID_BASE = "a" * 64
ID_CHILD = "b" * 64
ID_RW = "c" * 64


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lpt-", dir="/tmp"))  # sun_path is short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(tmp_path: Path, sockdir: Path) -> Iterator[tuple[Dockerd, Path, DockerPlugin]]:
    plugin = DockerPlugin(driver="vfs", state_path=tmp_path / "state.json")
    srv = ThreadServer(plugin, sockdir / "lamina.sock").start()
    try:
        yield Dockerd(srv.sock), tmp_path / "home", plugin
    finally:
        srv.stop()
        plugin.close()


@pytest.fixture
def docker(server: tuple[Dockerd, Path, DockerPlugin]) -> Dockerd:
    """A client whose plugin has had Init."""
    client, home, _ = server
    client.ok("Init", Home=str(home), Opts=None, UIDMaps=None, GIDMaps=None)
    return client


# -- layer tars -----------------------------------------------------------------------------


def make_tar(files: dict[str, bytes], dirs: Iterable[str] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
            tar.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_600_000_000
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def chunked(data: bytes, size: int = 7000) -> Iterator[bytes]:
    """Odd-sized chunks, so chunk and tar-block boundaries never line up."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


BASE_TAR = make_tar({"a/file1": b"one\n", "a/file2": b"two\n", "b/keep": b"keep\n"}, dirs=["a", "b"])


def big_tar_chunks(name: str, size: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """A one-file tar of ``size`` bytes, generated chunk by chunk (never whole in memory)."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = size, 0o644, 1_600_000_000
    yield ti.tobuf(tarfile.PAX_FORMAT)
    block = bytes(range(256)) * (chunk // 256)
    left = size
    while left:
        n = min(left, len(block))
        yield block[:n]
        left -= n
    yield b"\0" * ((512 - size % 512) % 512) + b"\0" * 1024


def tar_names(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


# -- the handshake and the documented-wrong points ----------------------------------------


def test_activate_takes_an_empty_body_and_names_graphdriver(server: tuple[Dockerd, Path, DockerPlugin]) -> None:
    client, _, _ = server
    reply = client.post("/Plugin.Activate", b"")
    assert reply.status == 200
    assert reply.json == {"Implements": ["GraphDriver"]}
    assert reply.headers["Content-Type"].startswith(wire.MEDIA_TYPE)


def test_capabilities_are_nested_not_top_level(server: tuple[Dockerd, Path, DockerPlugin]) -> None:
    client, _, _ = server
    data = client.ok("Capabilities")
    assert data == {"Capabilities": {"ReproducesExactDiffs": True}}
    assert "ReproducesExactDiffs" not in data  # where Docker's documentation puts it


def test_v12_accept_header_is_served(server: tuple[Dockerd, Path, DockerPlugin]) -> None:
    client, _, _ = server
    conn = UnixHTTPConnection(client.sock)
    conn.request("POST", "/GraphDriver.Capabilities", body=b"{}\n",
                 headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["Capabilities"]
    conn.close()


def test_init_reads_snake_case_id_maps() -> None:
    body = {"Home": "/x", "Opts": ["a=b"],
            "UIDMaps": [{"container_id": 0, "host_id": 100000, "size": 65536}],
            "GIDMaps": [{"container_id": 0, "host_id": 200000, "size": 1}]}
    req = wire.InitRequest.parse(body)
    assert req.uid_maps == [(0, 100000, 65536)]
    assert req.gid_maps == [(0, 200000, 1)]
    assert req.options() == {"a": "b"}
    assert wire.InitRequest.parse(req.to_json()) == req


def test_init_refuses_the_documented_camelcase_id_maps(server: tuple[Dockerd, Path, DockerPlugin]) -> None:
    client, home, _ = server
    reply = client.call("Init", Home=str(home), UIDMaps=[{"ContainerID": 0, "HostID": 0, "Size": 1}])
    assert reply.status == 400
    assert "container_id" in reply.json["Err"]
    assert not (home / "lamina.json").exists()


def test_init_home_becomes_the_store_root(docker: Dockerd, server: tuple[Dockerd, Path, DockerPlugin]) -> None:
    _, home, _ = server
    assert (home / "lamina.json").is_file()
    status = dict(tuple(p) for p in docker.ok("Status")["Status"])
    assert status["Root"] == str(home)
    assert status["Driver"] == "vfs"


def test_calls_before_init_fail_with_a_clear_error(server: tuple[Dockerd, Path, DockerPlugin]) -> None:
    client, _, _ = server
    reply = client.call("Create", ID=ID_BASE)
    assert reply.status == 500
    assert "Init" in reply.json["Err"]
    assert client.ok("Exists", ID=ID_BASE) == {"Exists": False}


def test_unknown_endpoint_is_a_json_404(server: tuple[Dockerd, Path, DockerPlugin]) -> None:
    client, _, _ = server
    reply = client.post("/GraphDriver.Frobnicate", b"{}\n")
    assert reply.status == 404
    assert "Frobnicate" in reply.json["Err"]


def test_keys_match_case_insensitively_as_in_go(docker: Dockerd) -> None:
    reply = docker.post("/GraphDriver.Create", json.dumps({"id": ID_BASE}).encode())
    assert reply.status == 200, reply.body
    assert docker.ok("Exists", ID=ID_BASE) == {"Exists": True}


def test_malformed_body_is_a_400_naming_the_problem(docker: Dockerd) -> None:
    reply = docker.post("/GraphDriver.Create", b"{not json")
    assert reply.status == 400 and "JSON" in reply.json["Err"]
    reply = docker.post("/GraphDriver.Create", b'{"ID": 7}')
    assert reply.status == 400 and "ID" in reply.json["Err"]
    reply = docker.post("/GraphDriver.Get", b"{}")
    assert reply.status == 400 and "no ID" in reply.json["Err"]


# -- the layer lifecycle, field by field ----------------------------------------------------


def test_lifecycle_with_exact_fields(docker: Dockerd, server: tuple[Dockerd, Path, DockerPlugin]) -> None:
    # a base layer: Create (no Parent key at all), then a chunked ApplyDiff with parent=
    assert docker.ok("Create", ID=ID_BASE) == {"Err": ""}
    reply = docker.apply_diff(ID_BASE, "", chunked(BASE_TAR))
    assert reply.status == 200, reply.body
    assert reply.json == {"Size": len(b"one\ntwo\nkeep\n"), "Err": ""}
    assert docker.ok("Exists", ID=ID_BASE) == {"Exists": True}

    # Diff of an imported layer gives back its exact bytes (ReproducesExactDiffs: true)
    assert b"".join(docker.diff_stream(ID_BASE)) == BASE_TAR

    # a container layer over it
    docker.ok("CreateReadWrite", ID=ID_RW, Parent=ID_BASE, MountLabel="", StorageOpt={})
    got = docker.ok("Get", ID=ID_RW)
    assert set(got) == {"Dir", "Err"}
    root = Path(got["Dir"])
    assert root.is_absolute() and (root / "a" / "file1").read_bytes() == b"one\n"
    assert docker.ok("Get", ID=ID_RW)["Dir"] == got["Dir"]  # counted, same path
    (root / "a" / "new").write_bytes(b"new file\n")
    (root / "a" / "file1").write_bytes(b"changed\n")
    (root / "a" / "file2").unlink()
    docker.ok("Put", ID=ID_RW)

    changes = docker.ok("Changes", ID=ID_RW, Parent=ID_BASE)
    assert set(changes) == {"Changes", "Err"}
    assert changes["Changes"] == [
        {"Path": "/a", "Kind": 0},
        {"Path": "/a/file1", "Kind": 0},
        {"Path": "/a/file2", "Kind": 2},
        {"Path": "/a/new", "Kind": 1},
    ]
    assert docker.ok("DiffSize", ID=ID_RW, Parent=ID_BASE) == {"Size": len(b"changed\nnew file\n"), "Err": ""}
    names = tar_names(b"".join(docker.diff_stream(ID_RW, ID_BASE)))
    assert set(names) == {"a", "a/file1", "a/.wh.file2", "a/new"}
    docker.ok("Put", ID=ID_RW)

    meta = docker.ok("GetMetadata", ID=ID_RW)
    assert set(meta) == {"Metadata", "Err"} and isinstance(meta["Metadata"], dict)

    # a parent with children cannot go; a child can, and removing twice is fine
    reply = docker.call("Remove", ID=ID_BASE)
    assert reply.status == 500 and ID_BASE in reply.json["Err"]
    docker.ok("Remove", ID=ID_RW)
    docker.ok("Remove", ID=ID_RW)
    assert docker.ok("Exists", ID=ID_RW) == {"Exists": False}
    docker.ok("Remove", ID=ID_BASE)
    assert docker.ok("Status")["Status"][:3] == [["Driver", "vfs"], ["Root", str(server[1])], ["Layers", "0"]]


def test_create_with_empty_parent_is_a_base_layer(docker: Dockerd) -> None:
    reply = docker.post("/GraphDriver.Create", json.dumps({"ID": ID_BASE, "Parent": ""}).encode())
    assert reply.status == 200, reply.body
    reply = docker.call("Create", ID=ID_CHILD, Parent="d" * 64)
    assert reply.status == 500 and "d" * 64 in reply.json["Err"]


def test_apply_diff_needs_a_layer_made_by_create(docker: Dockerd) -> None:
    reply = docker.apply_diff(ID_BASE, "", chunked(BASE_TAR))
    assert reply.status == 500 and ID_BASE in reply.json["Err"]
    assert docker.ok("Exists", ID=ID_BASE) == {"Exists": False}


def test_a_retried_apply_diff_is_refused(docker: Dockerd) -> None:
    """dockerd resends the *rest* of a body after a broken connection; that rest can
    parse as a shorter tar. A second ApplyDiff for a layer is refused, whatever it holds."""
    docker.ok("Create", ID=ID_BASE)
    tar = make_tar({"one": b"1" * 1000, "two": b"2" * 1000})
    assert docker.apply_diff(ID_BASE, "", chunked(tar)).status == 200
    tail = tar[512 * 4:]  # starts with the header of "two": a valid tar by itself
    reply = docker.apply_diff(ID_BASE, "", chunked(tail))
    assert reply.status == 500 and "refused" in reply.json["Err"]
    assert b"".join(docker.diff_stream(ID_BASE)) == tar


def test_apply_diff_after_a_plugin_restart_is_refused(tmp_path: Path, sockdir: Path) -> None:
    """A layer created before the plugin restarted may have lost part of its diff with
    the old process: its ApplyDiff fails cleanly, and dockerd removes the layer."""
    state = tmp_path / "state.json"
    plugin = DockerPlugin(driver="vfs", state_path=state)
    srv = ThreadServer(plugin, sockdir / "r.sock").start()
    client = Dockerd(srv.sock)
    client.ok("Init", Home=str(tmp_path / "home"))
    client.ok("Create", ID=ID_BASE)
    srv.stop()
    plugin.close()

    plugin = DockerPlugin(state_path=state)
    plugin.restore()
    srv = ThreadServer(plugin, sockdir / "r.sock").start()
    try:
        client = Dockerd(srv.sock)
        reply = client.apply_diff(ID_BASE, "", chunked(BASE_TAR))
        assert reply.status == 500 and "refused" in reply.json["Err"]
        client.ok("Remove", ID=ID_BASE)
        assert client.ok("Exists", ID=ID_BASE) == {"Exists": False}
    finally:
        srv.stop()
        plugin.close()


def test_apply_diff_of_a_hostile_tar_leaves_no_layer(docker: Dockerd, tmp_path: Path) -> None:
    docker.ok("Create", ID=ID_BASE)
    reply = docker.apply_diff(ID_BASE, "", chunked(make_tar({"../escape": b"x"})))
    assert reply.status == 500 and "escape" in reply.json["Err"]
    assert not (tmp_path / "escape").exists()
    assert docker.ok("Exists", ID=ID_BASE) == {"Exists": False}


def test_truncated_chunked_body_never_makes_a_layer(docker: Dockerd) -> None:
    """The body stops after a whole tar entry, as if dockerd died: a lenient tar reader
    would call that a complete (short) tar. No layer may come of it."""
    docker.ok("Create", ID=ID_BASE)
    data = make_tar({"one": b"1" * 1000, "two": b"2" * 1000})
    cut = 512 * 4  # pax header + header + data of "one": a clean entry boundary
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(docker.sock)
    s.sendall(f"POST /GraphDriver.ApplyDiff?id={ID_BASE}&parent= HTTP/1.1\r\n"
              "Host: plugin.moby.localhost\r\nTransfer-Encoding: chunked\r\n"
              f"Accept: {ACCEPT}\r\n\r\n".encode())
    s.sendall(b"%x\r\n" % cut + data[:cut] + b"\r\n")
    time.sleep(0.3)
    s.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not docker.ok("Exists", ID=ID_BASE)["Exists"]:
            break
        time.sleep(0.1)
    assert docker.ok("Exists", ID=ID_BASE) == {"Exists": False}
    # and dockerd's retry with the rest of the body is refused
    reply = docker.apply_diff(ID_BASE, "", chunked(data[cut:]))
    assert reply.status == 500 and "refused" in reply.json["Err"]
    assert docker.ok("Exists", ID=ID_BASE) == {"Exists": False}


# -- streaming in bounded memory --------------------------------------------------------------


def test_apply_diff_and_diff_stream_without_holding_the_layer(docker: Dockerd) -> None:
    size = 48 << 20
    expected = sum(len(c) for c in big_tar_chunks("big", size))
    docker.ok("Create", ID=ID_BASE)
    tracemalloc.start()
    try:
        reply = docker.apply_diff(ID_BASE, "", big_tar_chunks("big", size))
        assert reply.status == 200, reply.body
        assert reply.json["Size"] == size
        total = 0
        for chunk in docker.diff_stream(ID_BASE):
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == expected
    assert peak < 16 << 20, f"peak Python memory {peak >> 20} MiB while moving a {size >> 20} MiB layer"


def test_apply_diff_reads_the_body_while_it_arrives(docker: Dockerd, server: tuple[Dockerd, Path, DockerPlugin]) -> None:
    """The first megabytes are on disk before the client has sent the rest."""
    _, home, _ = server
    docker.ok("Create", ID=ID_BASE)
    seen: list[int] = []

    def body() -> Iterator[bytes]:
        for i, chunk in enumerate(big_tar_chunks("slow", 24 << 20)):
            if i == 20:  # ~19 MiB sent: wait until the store holds a good part of it
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    written = max((p.stat().st_size for p in home.rglob("slow") if p.is_file()), default=0)
                    if written >= 8 << 20:
                        seen.append(written)
                        break
                    time.sleep(0.05)
            yield chunk

    reply = docker.apply_diff(ID_BASE, "", body())
    assert reply.status == 200, reply.body
    assert seen, "nothing reached the store before the body was complete"


def test_diff_error_mid_stream_breaks_the_transfer(sockdir: Path, tmp_path: Path) -> None:
    """A stream that fails after the headers went out must not end like a whole tar."""

    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            if self.sent >= 3:
                raise OSError(5, "disk on fire")
            self.sent += 1
            return b"x" * 512

    pool = ThreadPoolExecutor(2)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await send_stream(request, Failing(), pool)  # type: ignore[arg-type]

    app = web.Application()
    app.router.add_post("/GraphDriver.Diff", handler)
    plugin = DockerPlugin(state_path=None)
    srv = ThreadServer(plugin, sockdir / "fail.sock", app=app).start()
    try:
        conn = UnixHTTPConnection(str(sockdir / "fail.sock"))
        conn.request("POST", "/GraphDriver.Diff", body=b"{}")
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        conn.close()
    finally:
        srv.stop()
        plugin.close()
        pool.shutdown()


# -- concurrency ---------------------------------------------------------------------------


def test_many_layers_at_once(docker: Dockerd) -> None:
    def one(i: int) -> str:
        lid = f"{i:02d}" * 32
        docker.ok("Create", ID=lid)
        reply = docker.apply_diff(lid, "", chunked(make_tar({f"f{i}": bytes([i]) * 5000})))
        assert reply.status == 200, reply.body
        path = Path(docker.ok("Get", ID=lid)["Dir"])
        content = (path / f"f{i}").read_bytes()
        docker.ok("Put", ID=lid)
        docker.ok("Remove", ID=lid)
        return content.hex()[:2]

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    assert results == [f"{i:02x}" for i in range(24)]


def test_requests_for_a_layer_being_applied_wait_for_it(docker: Dockerd) -> None:
    docker.ok("Create", ID=ID_BASE)
    gate = threading.Event()
    tar = make_tar({"x/one": b"1" * 300_000, "x/two": b"2" * 300_000})

    def body() -> Iterator[bytes]:
        yield tar[:200_000]
        gate.wait(30)
        yield tar[200_000:]

    with ThreadPoolExecutor(4) as pool:
        applying = pool.submit(docker.apply_diff, ID_BASE, "", body())
        time.sleep(0.5)
        # other layers are served meanwhile; this one is not visible yet
        t0 = time.monotonic()
        docker.ok("Create", ID=ID_CHILD)
        assert docker.ok("Exists", ID=ID_BASE) == {"Exists": False}
        assert time.monotonic() - t0 < 5
        # requests for the layer under import wait for it, then see all of it
        getting = pool.submit(docker.call, "Get", ID=ID_BASE)
        diffing = pool.submit(lambda: b"".join(docker.diff_stream(ID_BASE)))
        time.sleep(0.5)
        assert not getting.done() and not diffing.done()
        gate.set()
        assert applying.result(60).status == 200
        got = getting.result(60)
        assert got.status == 200, got.body
        assert (Path(got.json["Dir"]) / "x" / "two").read_bytes() == b"2" * 300_000
        assert diffing.result(60) == tar


def test_remove_waits_for_a_diff_still_streaming(docker: Dockerd) -> None:
    size = 8 << 20
    docker.ok("Create", ID=ID_BASE)
    assert docker.apply_diff(ID_BASE, "", big_tar_chunks("f", size)).status == 200
    stream = docker.diff_stream(ID_BASE)
    first = next(stream)
    with ThreadPoolExecutor(1) as pool:
        removing = pool.submit(docker.call, "Remove", ID=ID_BASE)
        time.sleep(0.5)
        assert not removing.done(), "Remove did not wait for the Diff being sent"
        total = len(first) + sum(len(c) for c in stream)
        assert removing.result(60).status == 200
    assert total == sum(len(c) for c in big_tar_chunks("f", size))
    assert docker.ok("Exists", ID=ID_BASE) == {"Exists": False}


def test_layer_locks_let_a_waiting_writer_go_before_new_readers() -> None:
    from lamina.plugin.layerlocks import LayerLocks

    async def scenario() -> list[str]:
        locks, order = LayerLocks(), []

        async def reader(name: str, hold: float) -> None:
            async with locks.using("L"):
                order.append(f"{name}+")
                await asyncio.sleep(hold)
                order.append(f"{name}-")

        async def writer() -> None:
            async with locks.changing("L"):
                order.append("w+")
                await asyncio.sleep(0.05)
                order.append("w-")

        first = asyncio.create_task(reader("r1", 0.1))
        await asyncio.sleep(0.01)
        w = asyncio.create_task(writer())
        await asyncio.sleep(0.01)
        late = asyncio.create_task(reader("r2", 0))
        await asyncio.gather(first, w, late)
        assert locks.busy() == []
        return order

    assert asyncio.run(scenario()) == ["r1+", "r1-", "w+", "w-", "r2+", "r2-"]


# -- state across restarts, Cleanup, leaked mounts ------------------------------------------


def test_restarted_plugin_reopens_the_store_without_init(tmp_path: Path, sockdir: Path) -> None:
    state = tmp_path / "state.json"
    home = tmp_path / "home"
    plugin = DockerPlugin(driver="vfs", state_path=state)
    srv = ThreadServer(plugin, sockdir / "a.sock").start()
    client = Dockerd(srv.sock)
    client.ok("Init", Home=str(home))
    client.ok("Create", ID=ID_BASE)
    srv.stop()
    plugin.close()
    assert not (sockdir / "a.sock").exists()

    plugin = DockerPlugin(state_path=state)
    assert plugin.restore()
    srv = ThreadServer(plugin, sockdir / "a.sock").start()
    try:
        assert Dockerd(srv.sock).ok("Exists", ID=ID_BASE) == {"Exists": True}
    finally:
        srv.stop()
        plugin.close()


def test_cleanup_releases_every_mount(docker: Dockerd, server: tuple[Dockerd, Path, DockerPlugin]) -> None:
    plugin = server[2]
    docker.ok("Create", ID=ID_BASE)
    docker.ok("Get", ID=ID_BASE)
    docker.ok("Get", ID=ID_BASE)
    assert plugin.store.layer(ID_BASE).mount_count == 2
    docker.ok("Cleanup")
    assert plugin.store.layer(ID_BASE).mount_count == 0
    docker.ok("Put", ID=ID_BASE)  # a Put with nothing held is not an error


def test_remove_releases_mounts_dockerd_left(docker: Dockerd) -> None:
    docker.ok("CreateReadWrite", ID=ID_RW)
    docker.ok("Get", ID=ID_RW)
    docker.ok("Remove", ID=ID_RW)
    assert docker.ok("Exists", ID=ID_RW) == {"Exists": False}


# -- the command -------------------------------------------------------------------------------


def test_serve_command_answers_and_stops_on_sigterm(tmp_path: Path, sockdir: Path) -> None:
    sock = sockdir / "cmd.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamina", "serve", "docker-plugin", "--socket", str(sock),
         "--state", str(tmp_path / "state.json"), "--driver", "vfs"],
        env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        client = Dockerd(sock)
        assert client.post("/Plugin.Activate", b"").json == {"Implements": ["GraphDriver"]}
        client.ok("Init", Home=str(tmp_path / "home"))
        client.ok("Create", ID=ID_BASE)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert not sock.exists()
    assert b"serving" in err


# -- the files an operator installs ---------------------------------------------------------


def test_contrib_spec_and_unit_name_the_default_socket() -> None:
    from lamina.plugin.cli import DEFAULT_SOCKET

    spec = (REPO / "contrib" / "lamina.spec").read_text()
    assert spec.strip() == f"unix://{DEFAULT_SOCKET}" and spec.endswith("\n")
    unit = (REPO / "contrib" / "lamina-docker-plugin.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split()[1:4] == ["serve", "docker-plugin", "--socket"]
    assert exec_start.split()[4] == str(DEFAULT_SOCKET)
    assert "Type=notify" in unit


@pytest.mark.parametrize("name", ["lamina-docker-plugin.service", "lamina-containerd-snapshotter.service"])
def test_contrib_unit_passes_systemd_analyze(tmp_path: Path, name: str) -> None:
    require_tool("systemd-analyze")
    unit = (REPO / "contrib" / name).read_text()
    # verify checks that ExecStart's program exists: point it at one that does
    copy = tmp_path / name
    copy.write_text(unit.replace("/usr/local/bin/lamina", "/bin/true"))
    res = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_serve_notifies_systemd_when_ready(tmp_path: Path, sockdir: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sockdir / "notify"))
    notify.settimeout(30)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), NOTIFY_SOCKET=str(sockdir / "notify"))
    sock = sockdir / "n.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamina", "serve", "docker-plugin", "--socket", str(sock),
         "--state", str(tmp_path / "state.json")], env=env, stderr=subprocess.DEVNULL)
    try:
        assert notify.recv(100) == b"READY=1"
        assert Dockerd(sock).post("/Plugin.Activate", b"").status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        notify.close()
