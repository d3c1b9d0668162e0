"""Tars between the async HTTP server and the store's blocking file objects, streamed.

The store reads and writes layer tars through ordinary blocking file objects, in worker
threads; the HTTP server is asyncio. Two bridges join them without ever holding a layer
in memory:

* :class:`BodyPipe` (ApplyDiff, request body → store): a coroutine copies the body
  (chunked or not) into an OS pipe and the worker reads the other end as a file. The
  pipe's fixed buffer is the back-pressure: the body is read from the socket only as
  fast as the store unpacks it. A body that stops early (dockerd died, the connection
  broke) must not look like a short but complete tar, so the reader raises at EOF unless
  the copier saw the body's proper end.
* :func:`send_stream` (Diff, store → response body): chunks are read from the store's
  stream in the worker pool and written to a chunked response one at a time. If the
  store fails mid-way the connection is dropped without the final chunk, so the client
  sees a broken transfer rather than a tar that merely ends early.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import logging
import os
from concurrent.futures import Executor
from typing import IO

from aiohttp import StreamReader, web

from lamina.errors import InvalidArchive

log = logging.getLogger(__name__)

#: bytes per read from the store's diff stream and per pipe buffer
CHUNK = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class BodyPipe:
    """A request body, readable from a worker thread as a blocking binary file."""

    def __init__(self, content: StreamReader, what: str) -> None:
        self._content = content
        self.what = what
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a bigger pipe means fewer wake-ups; optional
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, CHUNK)
        os.set_blocking(write_fd, False)
        self._wfd = write_fd
        #: True once the whole body went into the pipe; read by the worker at EOF
        self.complete = False
        self.reader: IO[bytes] = io.BufferedReader(_PipeReader(read_fd, self), buffer_size=CHUNK)

    async def pump(self) -> None:
        """Copy the body into the pipe, then close it. Stops early (quietly) if the
        reader closed its end; any other failure leaves ``complete`` False."""
        loop = asyncio.get_running_loop()
        try:
            async for chunk in self._content.iter_any():
                await _write_all(loop, self._wfd, chunk)
            self.complete = True
        except BrokenPipeError:
            log.debug("%s: the reader stopped before the end of the body", self.what)
        finally:
            os.close(self._wfd)


class _PipeReader(io.RawIOBase):
    """The read end of a :class:`BodyPipe`; EOF before the body's end is an error.

    No ``fileno()`` on purpose: a reader going around this class to the fd would not
    see the difference between a whole body and a broken one.
    """

    def __init__(self, fd: int, pipe: BodyPipe) -> None:
        super().__init__()
        self._fd = fd
        self._pipe = pipe

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = os.readv(self._fd, [b])
        if n == 0 and len(b) and not self._pipe.complete:
            raise InvalidArchive(
                f"{self._pipe.what}: the request body ended before the tar did "
                "(the client closed the connection)")
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


async def _write_all(loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
    """Write all of ``data`` to the non-blocking ``fd``, waiting while the pipe is full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
            continue
        view = view[n:]


class StalledClient(Exception):
    """The client of a streamed response took no byte for longer than the idle limit."""


async def send_stream(request: web.Request, stream: IO[bytes], pool: Executor,
                      content_type: str = "application/x-tar", *,
                      idle_timeout: float | None = None) -> web.StreamResponse:
    """Send ``stream`` as a chunked 200 response, reading it in ``pool``; closes it.

    An error while reading after the headers went out is re-raised: aiohttp then closes
    the connection without the terminating chunk, which the client reports as an
    unexpected EOF, never as a complete tar.

    ``idle_timeout``: a client that takes no byte for that many seconds (it read a few
    and stalled) has its connection aborted and :class:`StalledClient` raised, so the
    stream is closed and whatever the caller holds for it (the layer's lock, the store's
    pins) is let go. Without it such a client held them for ever. Idle, not total: a
    slow reader that keeps reading (dockerd pushing to a slow registry) is never cut.
    """
    loop = asyncio.get_running_loop()
    try:
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        while True:
            chunk = await loop.run_in_executor(pool, stream.read, CHUNK)
            if not chunk:
                break
            if idle_timeout is None:
                await response.write(chunk)
            else:
                await _write_watched(request, response, chunk, idle_timeout)
        await response.write_eof()
        return response
    finally:
        await loop.run_in_executor(pool, stream.close)


async def _write_watched(request: web.Request, response: web.StreamResponse, chunk: bytes,
                         idle_timeout: float) -> None:
    """``response.write(chunk)``, watching the transport's send buffer: it shrinks as
    the client reads; if it has not for ``idle_timeout`` seconds the connection is
    aborted (the write then cannot finish) and :class:`StalledClient` raised."""
    loop = asyncio.get_running_loop()
    write = asyncio.ensure_future(response.write(chunk))
    transport = request.transport
    buffered = transport.get_write_buffer_size() if transport is not None else 0
    progress = loop.time()
    while True:
        done, _ = await asyncio.wait({write}, timeout=min(idle_timeout, 1.0))
        if done:
            write.result()
            return
        now = loop.time()
        size = transport.get_write_buffer_size() if transport is not None else 0
        if size < buffered:
            buffered, progress = size, now
        elif now - progress >= idle_timeout:
            write.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await write
            if transport is not None:
                transport.abort()
            raise StalledClient(f"the client took no byte for {idle_timeout:g} s")
        else:
            buffered = size
