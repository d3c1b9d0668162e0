"""The graph-driver plugin against requests dockerd would never send (issue 16).

Oversized bodies answer 413, badly formed JSON of any kind a plain 400, ApplyDiff's
``parent`` must be the layer's own, unknown storage options are refused, and a Diff client
that stops reading loses its stream after the idle limit instead of holding the layer
for ever.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.plugin.docker import MAX_JSON_BODY, DockerPlugin
from plugin_client import ACCEPT, Dockerd, ThreadServer

BASE = "a" * 64
CHILD = "b" * 64
RW = "c" * 64
IDLE = 1.0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Dockerd, DockerPlugin]]:
    sockdir = Path(tempfile.mkdtemp(prefix="lph-", dir="/tmp"))  # sun_path is short
    plugin = DockerPlugin(driver="vfs", diff_idle_timeout=IDLE)
    srv = ThreadServer(plugin, sockdir / "lamina.sock").start()
    client = Dockerd(srv.sock)
    client.ok("Init", Home=str(tmp_path / "home"))
    try:
        yield client, plugin
    finally:
        srv.stop()
        plugin.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- bodies -----------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_with_a_plain_message(served: tuple[Dockerd, DockerPlugin]) -> None:
    docker, _ = served
    body = json.dumps({"ID": BASE, "Pad": "x" * (MAX_JSON_BODY + 1)}).encode()
    reply = docker.post("/GraphDriver.Create", body)
    assert reply.status == 413
    assert reply.json == {"Err": f"Create: request body larger than {MAX_JSON_BODY} bytes refused"}
    # just under the limit is read (and refused for what it says, not for its size)
    reply = docker.post("/GraphDriver.Exists", json.dumps({"ID": BASE, "P": "x" * 1000}).encode())
    assert reply.status == 200 and reply.json == {"Exists": False}


@pytest.mark.parametrize(("body", "why"), [
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b"{" + b'"a":{' * 100_000 + b"}" * 100_001, "nested too deeply"),
    (b'{"ID": ' + b"7" * 100_000 + b"}", "a number has more than 4300 digits"),
    (b'{"ID": "' + BASE.encode() + b'", "Size": -' + b"9" * 5000 + b"}", "a number has more than 4300 digits"),
    (b"\xff\xfe{", "not UTF-8 text"),
    (b'{"ID": ', "Expecting value at line 1 column 8"),
])
def test_bad_json_is_a_plain_400(served: tuple[Dockerd, DockerPlugin], body: bytes, why: str) -> None:
    docker, _ = served
    reply = docker.post("/GraphDriver.Create", body)
    assert reply.status == 400, reply.body[:200]
    err = reply.json["Err"]
    assert err.startswith("request body is not JSON: ") and why in err
    assert "internal error" not in err and "set_int_max_str_digits" not in err


def test_unknown_storage_option_is_refused(served: tuple[Dockerd, DockerPlugin]) -> None:
    docker, plugin = served
    docker.ok("Create", ID=BASE)
    reply = docker.call("CreateReadWrite", ID=RW, Parent=BASE, StorageOpt={"siz": "10G"})
    assert reply.status == 500
    assert reply.json == {"Err": "unknown storage option 'siz' for driver vfs (known: size)"}
    assert docker.ok("Exists", ID=RW) == {"Exists": False}


# -- ApplyDiff's parent -------------------------------------------------------------------------


@pytest.mark.parametrize(("created_on", "asked", "message"), [
    (BASE, "", "the query names no parent, but the layer was created on parent " + BASE),
    (BASE, RW, f"the query names parent {RW}, but the layer was created on parent {BASE}"),
    (None, BASE, f"the query names parent {BASE}, but the layer was created without a parent"),
])
def test_apply_diff_parent_must_be_the_layers_own(served: tuple[Dockerd, DockerPlugin], created_on: str | None,
                                                  asked: str, message: str) -> None:
    docker, plugin = served
    docker.ok("Create", ID=BASE)
    assert docker.apply_diff(BASE, "", [layer_tar({"base": b"1"})]).status == 200
    docker.ok("Create", ID=RW)
    docker.ok("Create", ID=CHILD, Parent=created_on)
    tar = layer_tar({"child": b"2"})
    reply = docker.apply_diff(CHILD, asked, [tar])
    assert reply.status == 400
    assert reply.json == {"Err": f"ApplyDiff {CHILD}: {message}"}
    assert not plugin.store.layer(CHILD).has_tarsplit  # nothing applied
    # the right parent still goes through: the refusal read nothing of the body
    reply = docker.apply_diff(CHILD, created_on or "", [tar])
    assert reply.status == 200, reply.body
    assert reply.json == {"Size": 1, "Err": ""}


# -- a Diff reader that stalls -------------------------------------------------------------------


def test_a_stalled_diff_reader_lets_go_of_the_layer(served: tuple[Dockerd, DockerPlugin],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    docker, plugin = served
    docker.ok("Create", ID=BASE)
    big = layer_tar({"random": os.urandom(16 << 20)})
    assert docker.apply_diff(BASE, "", [big]).status == 200

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(docker.sock)
    body = json.dumps({"ID": BASE}).encode() + b"\n"
    s.sendall(b"POST /GraphDriver.Diff HTTP/1.1\r\nHost: plugin\r\nAccept: " + ACCEPT.encode() +
              b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert s.recv(100).startswith(b"HTTP/1.1 200")  # a few bytes, then nothing more
    started = time.monotonic()
    docker.ok("Remove", ID=BASE)  # waits for the Diff, which the idle limit ends
    waited = time.monotonic() - started
    assert waited < IDLE + 10, f"Remove waited {waited:.1f} s"
    assert docker.ok("Exists", ID=BASE) == {"Exists": False}
    assert any("Diff" in r.message and "took no byte" in r.getMessage() for r in caplog.records)
    # the stalled connection was aborted: reading on finds its end, not a whole tar
    s.settimeout(10)
    received = 100
    while chunk := s.recv(1 << 20):
        received += len(chunk)
    assert received < len(big)
    s.close()


def test_a_slow_diff_reader_that_keeps_reading_is_not_cut(served: tuple[Dockerd, DockerPlugin]) -> None:
    docker, _ = served
    docker.ok("Create", ID=BASE)
    data = layer_tar({"random": os.urandom(4 << 20)})
    assert docker.apply_diff(BASE, "", [data]).status == 200
    got = []
    for chunk in docker.diff_stream(BASE):
        got.append(chunk)
        time.sleep(IDLE / 20)  # 64 KiB per 50 ms: slow, never idle for the limit
    assert b"".join(got) == data
