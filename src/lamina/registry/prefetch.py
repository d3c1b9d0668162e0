"""A registry as an image source: layer blobs downloaded ahead, several at once.

The loader (:func:`lamina.images.load.load_specs`) applies layers strictly in chain
order, since a layer's parent must exist first, and reads each blob as one stream. A
registry can send several blobs at once. Between the two sits one :class:`BlobPipe` per
layer that is not in the store yet, filled by a small pool of download threads, and one
:class:`Budget`: the memory every pipe of the pull holds together.

* the pipe of the layer being applied (the *head*) holds at most
  :attr:`Budget.head_limit` bytes (:data:`HEAD_MEMORY`, or the budget if smaller):
  when the apply falls behind, its download stops reading the socket until the apply
  catches up.
* the pipes of later layers keep what arrives ahead of its turn in memory, all of them
  together within :attr:`Budget.limit` (:data:`MEMORY_BUDGET` unless the pull says
  otherwise). A download that finds that budget full stops reading its socket: TCP's
  flow control then holds the rest of the blob in the registry (the kernel's socket
  buffers fill, the window closes, the registry's writes wait). It reads on when the
  apply frees memory or when its blob's turn comes. A download that has not sent its
  request yet waits for memory before it does.

So a compressed blob never touches the disk: no temporary copy is made, ahead of its
turn or otherwise, and the blobs' memory stays within ``limit + head_limit`` (a socket
read's reservation counts before the read). Beyond that the kernel holds what a paused
connection's receive buffer took in (``net.ipv4.tcp_rmem``; the registry keeps the
rest). The downloads run at full speed while memory lasts, and the apply is never
starved: its blob is always downloading (threads take blobs in chain order) and its
allowance is its own. A registry or proxy that drops a connection left idle meanwhile
costs nothing but a new request: :class:`~lamina.registry.blobs.BlobReader` resumes it
with ``Range`` from the first byte it has not handed out. The digests are checked by
the loader as it reads (a wrong blob removes the layer it made, and with it the image).

Why not spill to temporary files past the budget, as earlier versions did: the spill
files lived on the store's filesystem, whose ``syncfs`` after each layer wrote them out
too, for nothing (measured on bench_registry's Debian image, 166 MB of gzip blobs: 36
MB spilled and the pull took 4.3 s; held in memory, 3.2 s), and a paused socket costs
the registry nothing it does not already pay for a slow client.

The loader opens each blob twice, first to sniff its compression from a few bytes, then
to read it: the pipe keeps the first :data:`HEAD_BYTES` of its blob so a second reader
starts from byte 0 again. Any later reread (the loader explains a failed apply by
hashing the blob again) is a new download.
"""

from __future__ import annotations

import collections
import io
import logging
import threading
from collections.abc import Callable
from typing import IO

from lamina.errors import ImageError
from lamina.registry.blobs import BlobReader
from lamina.registry.transport import RegistryClient

log = logging.getLogger(__name__)

#: bytes all pipes of a pull hold in memory together before downloads ahead of their turn pause
MEMORY_BUDGET = 256 << 20
#: bytes the head pipe holds in memory before its download waits for the apply
HEAD_MEMORY = 8 << 20
#: leading bytes every pipe keeps, so the blob can be opened again from its start
HEAD_BYTES = 64 << 10
#: blobs downloaded at once (docker pull's default too)
PARALLEL = 3
#: the most one socket read asks for
_CHUNK = 1 << 20
#: the least a download waits for before it reads again (fewer, larger reads), unless the
#: budget itself is smaller
_MIN_GRANT = 64 << 10


class _Cancelled(Exception):
    pass


class Budget:
    """The memory of one pull's pipes, and the one lock they share.

    Two allowances: ``limit`` for the pipes of blobs ahead of their turn, together, and
    ``head_limit`` for the head alone. Every byte a pipe holds counts, and so does every
    byte a download thread has reserved for its next socket read, so the counts are what
    the pull holds. Kept apart, the two never wait for each other: the apply always has
    bytes coming, however full the later pipes are, and a slow apply does not stop the
    later blobs from coming while their allowance lasts. Together they bound the pull's
    blob memory by ``limit + head_limit``.

    One lock guards every count; waits are on conditions of that lock, each for one
    kind of waiter (the downloads ahead of their turn here, each pipe's reader and its
    head download in the pipe), so a byte arriving for one blob wakes no thread that
    waits for another: on two cores, needless wake-ups take the GIL from the apply.
    """

    def __init__(self, limit: int = MEMORY_BUDGET, head_limit: int | None = None) -> None:
        if limit <= 0:
            raise ValueError(f"a pull's memory budget must be positive, not {limit}")
        self.limit = limit
        self.head_limit = min(HEAD_MEMORY, limit) if head_limit is None else head_limit
        #: bytes held or reserved by the pipes that are not the head
        self.ahead = 0
        #: bytes held or reserved by all pipes
        self.held = 0
        #: the most ``held`` ever was (tests and the bench read it)
        self.peak = 0
        #: how many times a download ahead of its turn stopped reading because the budget
        #: was full (the head waiting for the apply is not counted)
        self.pauses = 0
        self.lock = threading.Lock()
        #: where downloads ahead of their turn wait for ``ahead`` to fall
        self.ahead_room = threading.Condition(self.lock)

    def _charge(self, n: int, head: bool) -> None:  # with lock held
        self.held += n
        if not head:
            self.ahead += n
        self.peak = max(self.peak, self.held)

    def _credit(self, n: int, head: bool) -> None:  # with lock held
        """Give back ``n`` bytes; the head's own waiter is its pipe's to wake."""
        if n:
            self.held -= n
            if not head:
                self.ahead -= n
                self.ahead_room.notify_all()


class BlobPipe:
    """One blob's bytes between its download thread and the loader, held in memory.

    The download thread calls :meth:`reserve` (which waits while memory is full) before
    each socket read and :meth:`put` after it; the loader reads with :meth:`read_live`.
    """

    def __init__(self, digest: str, size: int, budget: Budget,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.digest = digest
        self.size = size
        self._budget = budget
        self._lock = budget.lock
        #: the loader waits here for bytes, the end, or a cancel
        self._data = threading.Condition(budget.lock)
        #: the download waits here while it is the head and its allowance is full
        self._room_cv = threading.Condition(budget.lock)
        self._on_bytes = on_bytes
        self._mem: collections.deque[memoryview] = collections.deque()
        self._mem_bytes = 0
        self._reserved = 0
        self._head = bytearray()
        self.received = 0  # bytes written in by the download
        self.consumed = 0  # bytes handed to the live reader
        self.done = False
        self.error: BaseException | None = None
        self.is_head = False
        self.cancelled = False
        #: how many times this pipe's download stopped reading because its allowance was full
        self.pauses = 0

    # -- the download side ---------------------------------------------------------------

    def _room(self, want: int) -> int:  # with lock held
        """Bytes this pipe may reserve now (0: none, wait)."""
        b = self._budget
        if self.is_head:
            room = b.head_limit - self._mem_bytes - self._reserved
            floor = min(want, _MIN_GRANT, b.head_limit)
        else:
            room = b.limit - b.ahead
            floor = min(want, _MIN_GRANT, b.limit)
        return min(want, room) if room >= floor and room > 0 else 0

    def reserve(self, want: int) -> int:
        """Wait until memory has room for a read, reserve it, return its size (≤ ``want``).

        Until this returns, the download does not read its socket: the bytes it has not
        read wait in the kernel's buffers and then in the registry.
        """
        with self._lock:
            paused = False
            while True:
                if self.cancelled:
                    raise _Cancelled()
                grant = self._room(want)
                if grant:
                    break
                if not paused:
                    paused = True
                    self.pauses += 1
                    if not self.is_head:  # the head waiting for the apply is no news
                        self._budget.pauses += 1
                    log.debug("blob %s: memory full at byte %d; not reading", self.digest, self.received)
                (self._room_cv if self.is_head else self._budget.ahead_room).wait()
            self._reserved += grant
            self._budget._charge(grant, self.is_head)
            return grant

    def put(self, data: bytearray, reserved: int) -> None:
        """Hand over ``data`` (read into the ``reserved`` bytes); give back the rest."""
        n = len(data)
        with self._lock:
            self._reserved -= reserved
            if self.cancelled:
                self._budget._credit(reserved, self.is_head)
                raise _Cancelled()
            self._budget._credit(reserved - n, self.is_head)
            if n:
                if len(self._head) < HEAD_BYTES:
                    self._head += data[: HEAD_BYTES - len(self._head)]
                self._mem.append(memoryview(data))
                self._mem_bytes += n
                self.received += n
                self._data.notify()
        if n and self._on_bytes is not None:
            self._on_bytes(n)

    def unreserve(self, reserved: int) -> None:
        """Give back a reservation whose read failed."""
        with self._lock:
            self._reserved -= reserved
            self._budget._credit(reserved, self.is_head)

    def finish(self, error: BaseException | None = None) -> None:
        with self._lock:
            self.done = True
            self.error = error
            self._data.notify_all()

    # -- the loader side -----------------------------------------------------------------

    def make_head(self) -> None:
        """The blob's turn: what it holds moves from the later pipes' allowance to the head's."""
        with self._lock:
            if not self.is_head:
                self.is_head = True
                self._budget.ahead -= self._mem_bytes + self._reserved
                # the others may read on; this pipe's download, if waiting there, wakes
                # and from now on waits on its own allowance
                self._budget.ahead_room.notify_all()

    def read_live(self, b: memoryview) -> int:
        with self._lock:
            while True:
                if self._mem:
                    chunk = self._mem[0]
                    n = min(len(b), len(chunk))
                    b[:n] = chunk[:n]
                    if n == len(chunk):
                        self._mem.popleft()
                    else:
                        self._mem[0] = chunk[n:]
                    self._mem_bytes -= n
                    self.consumed += n
                    self._budget._credit(n, self.is_head)
                    if self.is_head:
                        self._room_cv.notify()
                    return n
                if self.cancelled:  # its bytes were dropped: an end here would truncate
                    raise ImageError(f"blob {self.digest}: download cancelled")
                if self.done:
                    if self.error is not None:
                        raise self.error
                    return 0
                self._data.wait()

    def kept_head(self, upto: int) -> bytes | None:
        """Bytes ``[0, upto)`` if the kept head still has them, else None."""
        with self._lock:
            return bytes(self._head[:upto]) if upto <= len(self._head) else None

    def cancel(self) -> None:
        """Stop the download and give its memory back (the loader is past this blob)."""
        with self._lock:
            self.cancelled = True
            self._mem.clear()
            self._budget._credit(self._mem_bytes, self.is_head)
            self._mem_bytes = 0
            self._data.notify_all()
            self._room_cv.notify_all()
            if not self.is_head:  # its download may wait with the others
                self._budget.ahead_room.notify_all()


class _PipeReader(io.RawIOBase):
    """A reader of one pipe from byte 0: the kept head first, then the live stream."""

    def __init__(self, source: RegistrySource, pipe: BlobPipe) -> None:
        super().__init__()
        self._source = source
        self._pipe = pipe
        self._pos = 0
        self._fallback: BlobReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(b)
        if self._fallback is None:
            pipe = self._pipe
            if self._pos == pipe.consumed:  # the live stream
                n = pipe.read_live(view)
                self._pos += n
                return n
            # behind the live stream (a second reader from byte 0): the kept head, if it
            # reaches, else the bytes are gone and are fetched again
            upto = min(pipe.consumed, self._pos + len(view))
            head = pipe.kept_head(upto)
            if head is not None:
                n = upto - self._pos
                view[:n] = head[self._pos:upto]
                self._pos += n
                return n
            self._fallback = self._source.reader_at(pipe.digest, pipe.size, self._pos)
        n = self._fallback.readinto(view)
        self._pos += n
        return n

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
        super().close()


class RegistrySource:
    """The :class:`lamina.images.source.Source` of one pull: blob names are digests."""

    #: blobs are read in chain order: opening one cancels the downloads before it
    concurrent = False

    def __init__(self, client: RegistryClient, repository: str, blobs: list[tuple[str, int]],
                 *, parallel: int = PARALLEL, memory: int = MEMORY_BUDGET,
                 known: dict[str, int] | None = None,
                 urls: dict[str, tuple[str, ...]] | None = None,
                 on_bytes: Callable[[str, int], None] | None = None,
                 on_state: Callable[[str, str], None] | None = None,
                 label: str | None = None) -> None:
        """``blobs``: (digest, size) of the layers to fetch, in the order they are applied;
        ``memory``: the bytes all their pipes may hold together (:class:`Budget`);
        ``label``: what the loader's errors start with (the pull's reference);
        ``known``: every blob of the image, for a layer the loader turns out to need
        after all (gone since we looked), which is then read on demand."""
        self.label = label or f"{client.registry}/{repository}"
        self.client = client
        self.repository = repository
        self._sizes = {**(known or {}), **dict(blobs)}
        self._urls = urls or {}
        self._on_state = on_state
        self._pipes: dict[str, BlobPipe] = {}
        self._order: list[str] = []
        self.budget = Budget(memory)
        for digest, size in blobs:
            if digest in self._pipes:
                continue
            cb = (lambda n, d=digest: on_bytes(d, n)) if on_bytes is not None else None
            self._pipes[digest] = BlobPipe(digest, size, self.budget, cb)
            self._order.append(digest)
        if self._order:
            self._pipes[self._order[0]].make_head()
        self._queue = list(self._order)
        self._qlock = threading.Lock()
        self._threads = [threading.Thread(target=self._worker, name=f"pull-{i}", daemon=True)
                         for i in range(min(parallel, len(self._order)))]
        self._opened: set[str] = set()
        for t in self._threads:
            t.start()

    # -- downloading ---------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            with self._qlock:
                if not self._queue:
                    return
                digest = self._queue.pop(0)
            pipe = self._pipes[digest]
            if pipe.cancelled:
                continue
            self._state(digest, "downloading")
            try:
                with BlobReader(self.client, self.repository, digest, pipe.size,
                                urls=self._urls.get(digest, ())) as r:
                    self._download(pipe, r)
                if pipe.received != pipe.size:
                    raise ImageError(f"{self.label}: blob {digest} ended at {pipe.received} of "
                                     f"{pipe.size} bytes")
                pipe.finish()
                self._state(digest, "downloaded")
            except _Cancelled:
                pipe.finish()
            except BaseException as e:  # handed to the loader, which names the layer
                pipe.finish(e)
                self._state(digest, "failed")

    @staticmethod
    def _download(pipe: BlobPipe, r: BlobReader) -> None:
        """Read the blob into its pipe, each read only once memory has room for it."""
        while pipe.received < pipe.size:
            grant = pipe.reserve(min(_CHUNK, pipe.size - pipe.received))
            buf = bytearray(grant)
            try:
                n = r.readinto(buf)
            except BaseException:
                pipe.unreserve(grant)
                raise
            if n < grant:
                del buf[n:]
            pipe.put(buf, grant)
            if not n:
                break

    def _state(self, digest: str, state: str) -> None:
        if self._on_state is not None:
            self._on_state(digest, state)

    # -- the Source protocol -------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self._sizes

    def size(self, name: str) -> int:
        if name not in self._sizes:
            raise ImageError(f"{self.label}: no blob {name} in this pull")
        return self._sizes[name]

    def names(self) -> list[str]:
        return list(self._order)

    def open(self, name: str) -> IO[bytes]:
        pipe = self._pipes.get(name)
        if pipe is None:  # a layer the pull did not expect to need (reloaded)
            return self.reader_at(name, self.size(name), 0)  # type: ignore[return-value]
        if name not in self._opened:
            self._opened.add(name)
            # this blob's turn: every pipe before it is done with
            idx = self._order.index(name)
            for earlier in self._order[:idx]:
                self._pipes[earlier].cancel()  # files are closed once the threads are gone
            pipe.make_head()
        return _PipeReader(self, pipe)  # type: ignore[return-value]

    def reader_at(self, digest: str, size: int, pos: int) -> BlobReader:
        return BlobReader(self.client, self.repository, digest, size, start=pos,
                          urls=self._urls.get(digest, ()))

    def close(self) -> None:
        """Stop the downloads and drop what they hold.

        Cancelling wakes a download waiting for memory at once; one in the middle of a
        socket read stops after it (a daemon thread, left behind after 30 s with a
        warning rather than holding up the caller).
        """
        for pipe in self._pipes.values():
            pipe.cancel()
        for t in self._threads:
            t.join(timeout=30)
        if any(t.is_alive() for t in self._threads):
            log.warning("%s: a download thread did not stop", self.label)

    def __enter__(self) -> RegistrySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
