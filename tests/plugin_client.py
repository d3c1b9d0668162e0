"""The two ends of the graph-driver plugin protocol for tests: :class:`Dockerd`, a
client that speaks as dockerd's ``pkg/plugins`` client does, and :class:`ThreadServer`,
the plugin server on its own event loop in a thread of the test process (so a test can
reach into the store behind it)."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from lamina.plugin.docker import DockerPlugin, PluginServer
from procs import UnixHTTPConnection

ACCEPT = "application/vnd.docker.plugins.v1.2+json"


# -- a client that talks like dockerd ---------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Dockerd:
    """The client side of the protocol, as pkg/plugins/client.go does it."""

    def __init__(self, sock: Path) -> None:
        self.sock = str(sock)

    def post(self, path: str, body: bytes | Iterable[bytes] | None = b"") -> Reply:
        conn = UnixHTTPConnection(self.sock)
        try:
            headers = {"Accept": ACCEPT}
            if body is not None and not isinstance(body, bytes):
                headers["Transfer-Encoding"] = "chunked"
                conn.request("POST", path, body=body, headers=headers, encode_chunked=True)
            else:
                conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def call(self, method: str, **fields: Any) -> Reply:
        """A JSON call; fields with empty values are left out (Go's omitempty)."""
        body = {k: v for k, v in fields.items() if v not in ("", None, {})}
        return self.post(f"/GraphDriver.{method}", json.dumps(body).encode() + b"\n")

    def ok(self, method: str, **fields: Any) -> dict[str, Any]:
        reply = self.call(method, **fields)
        assert reply.status == 200, (method, reply.status, reply.body)
        data = reply.json
        assert not data.get("Err"), (method, data)
        return data

    def apply_diff(self, layer_id: str, parent: str, chunks: Iterable[bytes]) -> Reply:
        return self.post(f"/GraphDriver.ApplyDiff?id={layer_id}&parent={parent}", chunks)

    def diff_stream(self, layer_id: str, parent: str = "") -> Iterator[bytes]:
        conn = UnixHTTPConnection(self.sock)
        body = {"ID": layer_id, **({"Parent": parent} if parent else {})}
        conn.request("POST", "/GraphDriver.Diff", body=json.dumps(body).encode() + b"\n",
                     headers={"Accept": ACCEPT})
        resp = conn.getresponse()
        try:
            assert resp.status == 200, resp.read()
            while chunk := resp.read(1 << 16):
                yield chunk
        finally:
            conn.close()


# -- a server in a thread -----------------------------------------------------------------


class ThreadServer:
    """A :class:`PluginServer` on its own event loop in a background thread."""

    def __init__(self, plugin: DockerPlugin, sock: Path, app: web.Application | None = None) -> None:
        self.plugin, self.sock, self.app = plugin, sock, app
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            if self.app is None:
                server = PluginServer(self.plugin, self.sock, shutdown_timeout=2)
                await server.start()
                stop = server.stop
            else:  # a bare application, for testing the bridge alone
                runner = web.AppRunner(self.app)
                await runner.setup()
                await web.UnixSite(runner, str(self.sock)).start()
                stop = runner.cleanup
            self._ready.set()
            await self._stop.wait()
            await stop()

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self._failed = e
            self._ready.set()

    def start(self) -> ThreadServer:
        self._thread.start()
        self._ready.wait(30)
        if self._failed:
            raise self._failed
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
