"""dockerd's graph-driver plugin: a lamina store served over HTTP on a unix socket.

With this server listening on ``/run/docker/plugins/lamina.sock``, ``dockerd
--experimental -s lamina`` keeps its images and containers in a lamina store whose root
is the ``Home`` dockerd sends to ``/GraphDriver.Init`` (``<data-root>/lamina``).

How a request is served
-----------------------
aiohttp parses HTTP (chunked bodies included) on one asyncio loop; every store call runs
in a thread pool, because the store is blocking (SQLite, file locks, mounts, tar
unpacking) and safe to share between threads. Requests are therefore served
concurrently. A request for a layer that another request is making, filling or
removing waits for it (:mod:`lamina.plugin.layerlocks`); underneath, the store's own
locks keep other processes out, and a layer still being made is never visible.
Diff and ApplyDiff stream through :mod:`lamina.plugin.bridge` in bounded memory.

Decisions that follow dockerd's behaviour (``reference/graphdriver-protocol.md`` §1)
-----------------------------------------------------------------------------------
* Mount references are taken *persistent*: dockerd pairs Get and Put across restarts
  of this process, so a reference must not die with it.
* ``ApplyDiff`` is accepted once per layer, and only for a layer that ``Create`` made in
  *this* process. dockerd retries a call whose connection failed with the *rest* of the
  same body (``pkg/plugins/client.go`` reuses the half-read reader), so after a plugin
  crash during an import the retry carries a tail of the tar, which may well parse as a
  shorter tar, and dockerd's DiffID check cannot notice (it hashed every byte it sent,
  across both attempts). Bytes can be lost before this process has run a line of the
  handler, so no mark written by the first attempt closes the gap; forgetting, with the
  process, which layers still await their diff does. The cost is a clean error when the
  plugin restarts between dockerd's Create and ApplyDiff: the pull or load fails and
  can be run again.
* ``Remove`` is idempotent and authoritative, as Docker's own drivers are: a missing
  layer is fine, and mount references left by a dockerd that crashed are released first.
* ``Cleanup`` (dockerd's shutdown) releases every mount, as overlay2 does.
* dockerd calls Init once per start and never again if only this plugin restarts, so
  the last Init is saved (``--state``) and the store reopened from it at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from lamina.errors import LaminaError, LayerBusy, LayerNotFound, MountKept
from lamina.fs.durable import atomic_write
from lamina.plugin import wire
from lamina.plugin.bridge import BodyPipe, StalledClient, send_stream
from lamina.plugin.layerlocks import LayerLocks
from lamina.serving import notify_systemd, prepare_socket

if TYPE_CHECKING:
    from lamina.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PluginNotInitialised(LaminaError):
    """A GraphDriver call came before dockerd's Init told the plugin where the store is."""


class DiffRefused(LaminaError):
    """An ApplyDiff this process cannot trust to carry a whole tar (see the module doc)."""


#: the largest JSON request body read (aiohttp's client_max_size): dockerd's requests are
#: a few hundred bytes; ApplyDiff's tar is streamed and not bound by it
MAX_JSON_BODY = 1 << 20
#: seconds a Diff client may take no byte before its stream is aborted and the layer let go
DIFF_IDLE_TIMEOUT = 120.0


def _reply(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(data, status=status, content_type=wire.MEDIA_TYPE)


class DockerPlugin:
    """The graph-driver endpoints over one lamina store (opened by Init)."""

    def __init__(self, *, driver: str | None = None, options: dict[str, str] | None = None,
                 state_path: Path | None = None, exact_diffs: bool = True, workers: int = 16,
                 diff_idle_timeout: float = DIFF_IDLE_TIMEOUT) -> None:
        #: the lamina driver for a new store (None: the store's recorded one, or the default)
        self.driver = driver
        self.options = dict(options or {})
        self.state_path = state_path
        #: what Capabilities says; True because the store rebuilds imported tars exactly
        self.exact_diffs = exact_diffs
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="lamina-plugin")
        self._store: Store | None = None
        self._init: wire.InitRequest | None = None
        self._open_lock = threading.Lock()
        #: read-only layers made by Create in this process whose ApplyDiff has not begun;
        #: touched only on the event loop thread
        self._awaiting_diff: set[str] = set()
        #: requests on one layer wait for the one changing it (see layerlocks)
        self._locks = LayerLocks()
        #: a Diff client idle this long loses its stream (it holds the layer meanwhile)
        self.diff_idle_timeout = diff_idle_timeout

    # -- the store ----------------------------------------------------------------------

    @property
    def store(self) -> Store:
        store = self._store
        if store is None:
            raise PluginNotInitialised("dockerd has not called GraphDriver.Init on this plugin yet")
        return store

    def initialise(self, req: wire.InitRequest) -> list[str]:
        """Open the store at ``req.home`` (reusing it if already open there), mend what a
        crash left, and save the request for a restart. Returns what cleanup mended."""
        import lamina  # late: the store pulls in the drivers and the archive engine

        options = {**self.options, **req.options()}
        with self._open_lock:
            home = Path(req.home)
            if self._store is not None and self._init is not None and self._init == req:
                store = self._store
            else:
                old, self._store = self._store, None
                if old is not None:
                    old.close()
                store = lamina.open(home, driver=self.driver, options=options or None,
                                    uid_map=req.uid_maps, gid_map=req.gid_maps)
                self._store = store
            self._init = req
            if self.state_path is not None:
                self.state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                atomic_write(self.state_path, json.dumps(req.to_json()).encode() + b"\n", mode=0o600)
        mended = store.cleanup()
        for line in mended:
            log.info("store %s: %s", store.root, line)
        log.info("store %s open with driver %s", store.root, store.driver.name)
        return mended

    def restore(self) -> bool:
        """Reopen the store of the last Init, if one was saved and its home still exists.

        Why: dockerd calls Init only when it starts, so a plugin restarted under a running
        dockerd must find its store by itself.
        """
        if self.state_path is None or not self.state_path.exists():
            return False
        try:
            req = wire.InitRequest.parse(json.loads(self.state_path.read_text()))
        except (OSError, ValueError, LaminaError) as e:
            log.warning("ignoring unreadable plugin state %s: %s", self.state_path, e)
            return False
        if not Path(req.home).is_dir():
            log.info("saved store %s is gone; waiting for dockerd's Init", req.home)
            return False
        self.initialise(req)
        return True

    def close(self) -> None:
        """Finish running work and close the store (its mounts stay for dockerd)."""
        self._pool.shutdown(wait=True)
        with self._open_lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    # -- the application ----------------------------------------------------------------

    def application(self) -> web.Application:
        """The aiohttp application: one POST route per endpoint, JSON 404 elsewhere."""
        app = web.Application(client_max_size=MAX_JSON_BODY)
        routes: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "/Plugin.Activate": self.activate,
            "/GraphDriver.Init": self.init,
            "/GraphDriver.Capabilities": self.capabilities,
            "/GraphDriver.Create": self.create,
            "/GraphDriver.CreateReadWrite": self.create_rw,
            "/GraphDriver.Remove": self.remove,
            "/GraphDriver.Get": self.get,
            "/GraphDriver.Put": self.put,
            "/GraphDriver.Exists": self.exists,
            "/GraphDriver.Status": self.status,
            "/GraphDriver.GetMetadata": self.get_metadata,
            "/GraphDriver.Cleanup": self.cleanup,
            "/GraphDriver.Changes": self.changes,
            "/GraphDriver.DiffSize": self.diff_size,
        }
        for path, fn in routes.items():
            app.router.add_post(path, self._json_endpoint(path, fn))
        app.router.add_post("/GraphDriver.Diff", self._guarded("/GraphDriver.Diff", self.diff))
        app.router.add_post("/GraphDriver.ApplyDiff", self._guarded("/GraphDriver.ApplyDiff", self.apply_diff))
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        assert set(routes) | {"/GraphDriver.Diff", "/GraphDriver.ApplyDiff"} == set(wire.ENDPOINTS)
        return app

    def _guarded(self, endpoint: str, handler: Handler) -> Handler:
        """Turn every error raised before a response is under way into ``{"Err": ...}``."""
        name = endpoint.rsplit(".", 1)[-1]

        async def guarded(request: web.Request) -> web.StreamResponse:
            started = time.monotonic()
            try:
                response = await handler(request)
            except wire.BadRequest as e:
                log.warning("%s: %s", name, e)
                return _reply(wire.error(str(e)), 400)
            except web.HTTPRequestEntityTooLarge:
                msg = f"{name}: request body larger than {MAX_JSON_BODY} bytes refused"
                log.warning("%s", msg)
                return _reply(wire.error(msg), 413)
            except LaminaError as e:
                log.info("%s: %s", name, e)
                return _reply(wire.error(str(e)), 500)
            except OSError as e:
                log.warning("%s: %s", name, e)
                return _reply(wire.error(f"{name}: {e}"), 500)
            except Exception as e:
                log.exception("%s failed", name)
                return _reply(wire.error(f"{name}: internal error ({type(e).__name__}): {e}"), 500)
            log.debug("%s %s in %.1f ms", name, request.query_string, (time.monotonic() - started) * 1000)
            return response

        return guarded

    def _json_endpoint(self, endpoint: str,
                       fn: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            body = wire.parse_body(await request.read())
            return _reply(await fn(body))

        return self._guarded(endpoint, handler)

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        return _reply(wire.error(f"{request.method} {request.path}: no such plugin endpoint"), 404)

    # -- endpoints ----------------------------------------------------------------------

    async def activate(self, body: dict[str, Any]) -> dict[str, Any]:
        return wire.ACTIVATE_RESPONSE

    async def init(self, body: dict[str, Any]) -> dict[str, Any]:
        req = wire.InitRequest.parse(body)
        log.info("Init: home %s, options %s", req.home, req.opts or "none")
        before = self._store
        await self._run(self.initialise, req)
        if self._store is not before:  # another store: its layers await nothing from us
            self._awaiting_diff.clear()
        return wire.ok()

    async def capabilities(self, body: dict[str, Any]) -> dict[str, Any]:
        return wire.capabilities(self.exact_diffs)

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        req = wire.LayerRequest.parse(body, "Create")
        async with self._locks.changing(req.id):
            await self._run(self.store.create, req.id, req.parent or None,
                            storage_opt=req.storage_opt, mount_label=req.mount_label)
        self._awaiting_diff.add(req.id)
        return wire.ok()

    async def create_rw(self, body: dict[str, Any]) -> dict[str, Any]:
        req = wire.LayerRequest.parse(body, "CreateReadWrite")
        async with self._locks.changing(req.id):
            await self._run(self.store.create_rw, req.id, req.parent or None,
                            storage_opt=req.storage_opt, mount_label=req.mount_label)
        return wire.ok()

    async def remove(self, body: dict[str, Any]) -> dict[str, Any]:
        req = wire.LayerRequest.parse(body, "Remove")
        self._awaiting_diff.discard(req.id)
        async with self._locks.changing(req.id):
            await self._run(self._remove, req.id)
        return wire.ok()

    def _remove(self, layer_id: str) -> None:
        store = self.store
        try:
            store.remove(layer_id)
        except LayerNotFound:
            log.debug("Remove %s: no such layer (already removed)", layer_id)
        except LayerBusy:
            # only references left mounted are ours to release; work in progress is not
            if not store.exists(layer_id) or not store.layer(layer_id).mount_count:
                raise
            released = 0
            while store.put(layer_id, persistent=True):
                released += 1
            log.warning("Remove %s: released %d mount reference(s) dockerd never put", layer_id, released)
            store.remove(layer_id)

    async def get(self, body: dict[str, Any]) -> dict[str, Any]:
        req = wire.LayerRequest.parse(body, "Get")
        async with self._locks.using(req.id):
            # a view mounted already is counted on the loop (no hop to a worker); a first
            # mount, or a wait for another process, goes to the pool
            path = self.store.try_get(req.id, persistent=True)
            if path is None:
                path = await self._run(self.store.get, req.id, req.mount_label, persistent=True)
        return wire.directory(str(path))

    async def put(self, body: dict[str, Any]) -> dict[str, Any]:
        req = wire.LayerRequest.parse(body, "Put")
        async with self._locks.using(req.id):
            done = self.store.try_put(req.id, persistent=True)  # as for Get: unmounts go to the pool
            if done is None:
                done = await self._run(self.store.put, req.id, persistent=True)
            if not done:
                log.debug("Put %s: no reference was held", req.id)
        return wire.ok()

    async def exists(self, body: dict[str, Any]) -> dict[str, Any]:
        req = wire.LayerRequest.parse(body, "Exists")
        try:
            # on the loop, not in the pool: one indexed read of the loop thread's own
            # records connection, which never waits for a writer (WAL), costs less than
            # the hop to a worker and back
            found = self.store.exists(req.id)
        except LaminaError:
            found = False
        return wire.exists(found)

    async def status(self, body: dict[str, Any]) -> dict[str, Any]:
        return wire.status(await self._run(self.store.status))

    async def get_metadata(self, body: dict[str, Any]) -> dict[str, Any]:
        req = wire.LayerRequest.parse(body, "GetMetadata")
        async with self._locks.using(req.id):
            return wire.metadata(await self._run(self.store.metadata, req.id))

    async def cleanup(self, body: dict[str, Any]) -> dict[str, Any]:
        """Release every mount; what is still in use (a sized layer's image under a
        container that containerd runs from the same store) stays mounted, and dockerd
        is told so: the answer is an error naming it, not OK."""
        store = self._store
        if store is not None:
            try:
                done = await self._run(store.cleanup, unmount_all=True)
            except MountKept as e:
                for line in e.done:
                    log.info("Cleanup: %s", line)
                raise
            for line in done:
                log.info("Cleanup: %s", line)
        return wire.ok()

    async def changes(self, body: dict[str, Any]) -> dict[str, Any]:
        req = wire.LayerRequest.parse(body, "Changes")
        # an absent Parent is "" in dockerd's Go: compare against nothing
        async with self._locks.using(req.id):
            return wire.changes(await self._run(self.store.changes, req.id, req.parent))

    async def diff_size(self, body: dict[str, Any]) -> dict[str, Any]:
        req = wire.LayerRequest.parse(body, "DiffSize")
        async with self._locks.using(req.id):
            return wire.size(await self._run(self.store.diff_size, req.id, req.parent))

    async def diff(self, request: web.Request) -> web.StreamResponse:
        req = wire.LayerRequest.parse(wire.parse_body(await request.read()), "Diff")
        async with self._locks.using(req.id):  # until the whole tar is sent, or the client stalls
            stream = await self._run(self.store.diff, req.id, req.parent)
            try:
                return await send_stream(request, stream, self._pool,
                                         idle_timeout=self.diff_idle_timeout)
            except StalledClient as e:
                log.warning("Diff %s: %s; the stream was aborted and the layer let go", req.id, e)
                raise

    async def apply_diff(self, request: web.Request) -> web.StreamResponse:
        # dockerd builds this query with Sprintf and no escaping; IDs are plain hex
        layer_id = request.query.get("id", "")
        parent = request.query.get("parent", "")
        if not layer_id:
            raise wire.BadRequest("ApplyDiff: query has no id")
        store = self.store
        self._check_parent(store, layer_id, parent)
        if layer_id not in self._awaiting_diff:
            raise DiffRefused(
                f"ApplyDiff {layer_id}: refused: the layer was not made by Create since this plugin "
                "started, or already had its diff (a retry after a broken connection would carry "
                "only the rest of the tar)")
        self._awaiting_diff.discard(layer_id)  # before the first byte is read: one try only
        async with self._locks.changing(layer_id):
            log.info("ApplyDiff %s: receiving", layer_id)
            size = await self._apply(store, layer_id, parent, request)
        log.info("ApplyDiff %s: applied %d bytes", layer_id, size)
        return _reply(wire.size(size))

    @staticmethod
    def _check_parent(store: Store, layer_id: str, parent: str) -> None:
        """The query's ``parent`` must be the one Create recorded: the tar is a diff
        against that parent, and unpacked over another it would mean other files. An
        empty parent is a base layer's."""
        try:
            recorded = store.layer(layer_id).parent or ""
        except LayerNotFound:
            return  # said by the refusal that follows, in its own words
        if parent == recorded:
            return
        if not recorded:
            why = "was created without a parent"
        else:
            why = f"was created on parent {recorded}"
        asked = f"parent {parent}" if parent else "no parent"
        raise wire.BadRequest(f"ApplyDiff {layer_id}: the query names {asked}, but the layer {why}")

    async def _apply(self, store: Store, layer_id: str, parent: str, request: web.Request) -> int:
        """Unpack the request body into the layer in a worker while the loop feeds it."""
        body = BodyPipe(request.content, f"ApplyDiff {layer_id}")
        pump = asyncio.ensure_future(body.pump())

        def apply() -> int:
            with body.reader as stream:
                return store.apply_diff(layer_id, parent or None, stream)

        try:
            return await self._run(apply)
        finally:
            if not pump.done():  # the store stopped reading: stop feeding it
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump


# -- serving on a unix socket -------------------------------------------------------------


class PluginServer:
    """The HTTP server for one :class:`DockerPlugin` on one unix socket."""

    def __init__(self, plugin: DockerPlugin, socket_path: Path, *, shutdown_timeout: float = 10.0) -> None:
        self.plugin = plugin
        self.socket_path = Path(socket_path)
        self.shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        prepare_socket(self.socket_path)
        runner = web.AppRunner(self.plugin.application(), access_log=None, handle_signals=False,
                               shutdown_timeout=self.shutdown_timeout)
        await runner.setup()
        site = web.UnixSite(runner, str(self.socket_path))
        await site.start()
        os.chmod(self.socket_path, 0o660)
        self._runner = runner
        log.info("serving dockerd's graph-driver protocol on %s", self.socket_path)

    async def stop(self) -> None:
        """Stop listening, let running requests finish (up to the timeout)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


def serve(plugin: DockerPlugin, socket_path: Path) -> None:
    """Serve until SIGTERM or SIGINT, then close the plugin. Blocks."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = PluginServer(plugin, socket_path)
        await server.start()
        notify_systemd("READY=1")
        try:
            await stop.wait()
            log.info("stopping")
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    finally:
        plugin.close()
