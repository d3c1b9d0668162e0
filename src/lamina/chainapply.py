"""Applying the layers of one chain side by side, each made ready strictly in chain order.

Why: an image's layers are independent until one needs to look at those below it, and
unpacking is Python work per tar entry that one core does at a time. Why processes and
not threads: with the GIL, two layers unpacked in two threads took longer than one
after the other (1.11 s against 0.99 s for bench_images' two big layers, 1.4 s of CPU
against 1.0); in two processes, 0.64 s. So the bottom layer of a batch is unpacked here
on a thread (it is the one every other may wait for, and it costs no process start and
no copy through a pipe), and each layer above it by a worker process
(:mod:`lamina.applyworker`) whose tar a thread of this process feeds through a pipe,
reading the caller's stream, so decompression and blob digests stay with the caller.

Why a child may be unpacked while its parent is still being written:

* the driver says so (:class:`lamina.drivers.base.ApplyPlanner`: overlay): each layer's
  files go to a directory of its own that no other layer's unpacking writes to, and a
  layer can be made over a parent that is still being filled;
* the archive engine reads the layers below only to copy up a hardlink's target from
  them and to refuse a path through a lower layer's symlink, and only through
  :attr:`lamina.archive.apply.ApplyOptions.wait_for_lowers`, which here blocks until
  every layer below has been unpacked whole. A tar that never needs to look below (the
  usual case: Docker's layer tars list every parent directory) never waits; one that
  does goes on from there exactly as a serial apply would, against whole lowers. The
  layer that results, its tar-split and DiffID, and every refusal with the entry it
  names, are the serial ones.

What the store promises still holds:

* records: each layer is begun (its *creating* record, its empty directory) in chain
  order, over a parent that may still be creating (:meth:`Lifecycle.begin`'s
  ``parent_pending``); :meth:`ChainApply.finish` takes the layers bottom up and, for
  each, checks its DiffID, syncs the filesystem, keeps its tar-split and only then marks
  it ready: never before its parent, never before its files are on disk;
* a failure anywhere: the failed layer and every layer above it are abandoned, workers
  killed first, top down (a child of a failed layer can never be made ready); the caller
  removes those already ready (the image loader does, as it always has);
* a crash: every layer still unpacking is a creating record. The workers share its work
  lock (they are handed the lock's open file description) and are killed by the kernel
  when this process dies (``PR_SET_PDEATHSIG``), so once they are gone the lock is free
  and cleanup drops the layer as half-made; until then nobody takes it for abandoned
  while something still writes into it.

Where nothing can run side by side (vfs, ``jobs=1``, a source read once in order),
:class:`SerialChain` takes the same calls and runs the store's ordinary ``apply_diff``:
the serial path, unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lamina.applyworker import Channel, decode_error
from lamina.archive.apply import apply_tar
from lamina.drivers.base import ApplyPlan, CreateOptions
from lamina.errors import DiffIDMismatch, LaminaError
from lamina.fs.durable import EarlyWriteback, syncfs
from lamina.fs.locks import KeyLock
from lamina.ids import check_id
from lamina.lifecycle import raise_no_space
from lamina.streams import HashingReader

if TYPE_CHECKING:
    from lamina.store import Store

log = logging.getLogger(__name__)

#: bytes of each copy from the caller's stream into a worker's pipe
_CHUNK = 1 << 20
#: the pipe's own buffer (Linux's default most a user may ask for, pipe-max-size)
_PIPE_SIZE = 1 << 20
#: layers smaller than this are unpacked on a thread here even above the bottom one: a
#: worker's process start and pipe cost more than unpacking them beside the GIL's owner
WORKER_MIN = 16 << 20


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - Linux has it
        return os.cpu_count() or 1


@dataclass(eq=False)
class _Layer:
    """One layer of the batch, from :meth:`ChainApply.add` to :meth:`ChainApply.finish`."""

    id: str
    parent: str | None
    stream: IO[bytes]
    expected: str | None
    #: the layers of this batch below it, bottom first (what it may wait for)
    below: list[_Layer] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)
    lock: KeyLock | None = None
    begun: bool = False
    #: set once nothing writes into the layer any more (unpacked whole, or failed)
    applied: threading.Event = field(default_factory=threading.Event)
    size: int | None = None
    diff_id: str | None = None
    error: BaseException | None = None
    #: an error reading the caller's stream (it explains the worker's truncated tar)
    feed_error: BaseException | None = None
    cancelled: bool = False
    threads: list[threading.Thread] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None


@dataclass(eq=False)
class _Spare:
    """A worker process started ahead of need, and the socket to give it its job."""

    proc: subprocess.Popen[bytes]
    channel: Channel


class _Cancellable:
    """The caller's stream for the in-process apply; raises once the batch is aborted,
    so the thread unpacking it stops at its next read."""

    def __init__(self, layer: _Layer) -> None:
        self._layer = layer
        src = layer.stream
        self._readinto = getattr(src, "readinto", None)
        self._src = src

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:
        if self._layer.cancelled:
            raise LaminaError(f"layer {self._layer.id}: apply cancelled")
        if self._readinto is not None:
            return int(self._readinto(b) or 0)
        data = self._src.read(len(b))
        b[: len(data)] = data
        return len(data)


def open_chain(store: Store, jobs: int | None = None,
               sizes: Sequence[int] | None = None) -> ChainApply | SerialChain:
    """The chain apply for ``store``: side by side where its driver allows it, more
    than one job is asked for (None: one per CPU) and more than one layer is to come
    (``sizes``: about how many bytes each holds, bottom up; None: unknown), else one
    layer at a time."""
    want = cpu_count() if jobs is None else jobs
    if want > 1 and store.native.plan is not None and (sizes is None or len(sizes) > 1):
        return ChainApply(store, want, sizes)
    return SerialChain(store)


class SerialChain:
    """One layer at a time through the store's own ``apply_diff``: :meth:`add` applies,
    :meth:`finish` reports. The same calls as :class:`ChainApply`, so a caller has one
    loop; any store with ``apply_diff`` will do (the image tests' in-memory one too)."""

    jobs = 1

    def __init__(self, store: Any) -> None:
        self._store = store
        self._done: list[tuple[str, int | None, BaseException | None]] = []

    @property
    def pending(self) -> int:
        return len(self._done)

    def add(self, layer_id: str, parent: str | None, stream: IO[bytes], *,
            expected_diff_id: str | None = None, size_hint: int | None = None) -> None:
        try:
            size = self._store.apply_diff(layer_id, parent, stream, expected_diff_id=expected_diff_id)
        except Exception as e:  # noqa: BLE001 - raised by finish, as ChainApply does
            self._done.append((layer_id, None, e))
        else:
            self._done.append((layer_id, int(size), None))

    def finish(self, layer_id: str) -> int:
        if not self._done or self._done[0][0] != layer_id:
            raise ValueError(f"layer {layer_id} is not the oldest pending layer of this chain apply")
        _, size, error = self._done.pop(0)
        if error is not None:
            raise error
        assert size is not None
        return size

    def close(self) -> None:
        """Nothing is half-made between calls: each add made its layer ready or nothing."""
        self._done.clear()

    def __enter__(self) -> SerialChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChainApply:
    """Layers of one chain, bottom up, side by side: :meth:`add` each, :meth:`finish`
    each in the same order; use as a context manager, whose exit abandons whatever was
    not finished.

    At most :attr:`jobs` layers should be pending at once (the caller finishes the
    oldest before adding more). Call :meth:`add` from one thread that outlives the batch
    (its workers die with the thread that started them).
    """

    def __init__(self, store: Store, jobs: int, sizes: Sequence[int] | None = None) -> None:
        if store.native.plan is None:
            raise ValueError(f"driver {store.driver.name} cannot unpack layers side by side")
        self._store = store
        #: layers unpacked at once
        self.jobs = max(2, jobs)
        #: about how large the layers the caller means to add are (None: unknown), so that
        #: a worker is started ahead of need, and only for a layer that will want one
        self._sizes = list(sizes) if sizes is not None else None
        self._added = 0
        self._spare: _Spare | None = None
        self._pending: list[_Layer] = []
        self._writeback: EarlyWriteback | None = None
        self._aborting = threading.Event()

    @property
    def pending(self) -> int:
        """Layers added and not yet finished."""
        return len(self._pending)

    # -- adding ---------------------------------------------------------------------------

    def add(self, layer_id: str, parent: str | None, stream: IO[bytes], *,
            expected_diff_id: str | None = None, size_hint: int | None = None) -> None:
        """Start making read-only layer ``layer_id`` over ``parent`` from the uncompressed
        layer tar ``stream``, which the batch reads to its end (from another thread).

        ``parent`` is the layer added last, or (with nothing pending) a ready layer or
        None. ``size_hint``: about how many bytes the stream holds (a layer under
        :data:`WORKER_MIN` is unpacked on a thread here). Errors of the apply are raised
        by :meth:`finish`; those of starting it (a busy or existing layer) here, with
        nothing left behind.
        """
        check_id(layer_id)
        if parent:
            check_id(parent, "parent ID")
        below = self._pending[-1] if self._pending else None
        if below is not None and below.id != parent:
            raise ValueError(f"layer {layer_id}: a chain apply takes one chain, bottom up "
                             f"(parent {parent}, last added {below.id})")
        layer = _Layer(layer_id, parent, stream, expected_diff_id)
        layer.below = [*below.below, below] if below is not None else []
        layer.lock = self._store.work_locks.take(layer_id)
        self._pending.append(layer)  # from here on, an abort undoes it
        try:
            plan = self._begin(layer, below)
            if self._writeback is None:
                self._writeback = EarlyWriteback(self._store.root).__enter__()
            small = size_hint is not None and size_hint < WORKER_MIN
            if below is None or plan is None or small:
                self._start_here(layer, plan)
            else:
                self._start_worker(layer, plan)
        except BaseException:
            if layer.proc is not None and not layer.threads:
                layer.proc.kill()
                layer.proc.wait()
            self._abandon(layer)
            self._pending.remove(layer)
            raise
        self._added += 1
        if self._spare is None and self._next_wants_worker():
            self._spare = self._spawn()  # the next layer's worker starts while this one unpacks

    def _next_wants_worker(self) -> bool:
        if self._sizes is None:
            return True
        return self._added < len(self._sizes) and self._sizes[self._added] >= WORKER_MIN

    def _begin(self, layer: _Layer, below: _Layer | None) -> ApplyPlan | None:
        """The creating record and the empty directory; the driver's plan for the tar."""
        store = self._store
        opts = CreateOptions()
        store.lifecycle.begin(layer.id, layer.parent, rw=False, opts=opts,
                              parent_pending=below is not None)
        layer.begun = True
        store.lifecycle.build(layer.id, layer.parent, rw=False, opts=opts, sync=False)
        if below is not None:
            layer.chain = [layer.id, *below.chain]
        elif layer.parent:
            with store.records.read() as db:
                layer.chain = [layer.id, *db.chain(layer.parent)]
        else:
            layer.chain = [layer.id]
        assert store.native.plan is not None
        return store.native.plan.apply_plan(layer.id, layer.parent, layer.chain)

    # -- unpacking here ---------------------------------------------------------------------

    def _start_here(self, layer: _Layer, plan: ApplyPlan | None) -> None:
        t = threading.Thread(target=self._apply_here, args=(layer, plan), daemon=True,
                             name=f"lamina-apply-{layer.id[:12]}")
        layer.threads.append(t)
        t.start()

    def _apply_here(self, layer: _Layer, plan: ApplyPlan | None) -> None:
        """Unpack on this thread, as the store's apply_diff does (without committing)."""
        store = self._store
        hashed = HashingReader(_Cancellable(layer))  # type: ignore[arg-type]
        try:
            if plan is None:  # the driver declined: its own way, once the layers below are whole
                self._wait_below(layer)
            with store.tarsplits.recording(layer.id) as ts:
                if plan is not None:
                    opts = dataclasses.replace(plan.options, tarsplit=ts,
                                               wait_for_lowers=lambda: self._wait_below(layer))
                    size: int | None = apply_tar(plan.root, hashed, opts)  # type: ignore[arg-type]
                else:
                    size = None
                    if store.native.apply is not None:
                        size = store.native.apply.apply_diff(layer.id, layer.parent, layer.chain,
                                                             hashed, tarsplit=ts)  # type: ignore[arg-type]
                    if size is None:
                        size = store.naive.apply(layer.id, hashed, ts)  # type: ignore[arg-type]
            hashed.drain()
            layer.size, layer.diff_id = int(size), hashed.digest()
        except BaseException as e:  # noqa: BLE001 - raised by finish
            layer.error = e
        finally:
            hashed.close()
            layer.applied.set()

    def _wait_below(self, layer: _Layer) -> None:
        """Until every layer of the batch below ``layer`` is unpacked whole; LaminaError
        if one failed or the batch is being aborted."""
        for low in layer.below:
            while not low.applied.wait(0.2):
                if self._aborting.is_set():
                    break
            if not low.applied.is_set() or low.error is not None or low.feed_error is not None:
                raise LaminaError(f"layer {layer.id}: layer {low.id} below it failed; not applying it")

    # -- unpacking in a worker process ----------------------------------------------------------

    def _spawn(self) -> _Spare:
        """A worker process, started now, importing while it waits for a job."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "lamina.applyworker", str(os.getpid())],
                                    stdin=theirs, stdout=subprocess.DEVNULL, env=_worker_env())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return _Spare(proc, Channel(ours))

    def _start_worker(self, layer: _Layer, plan: ApplyPlan) -> None:
        assert layer.lock is not None
        spare, self._spare = self._spare or self._spawn(), None
        layer.proc = spare.proc
        data_r, data_w = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(data_w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        opts = plan.options
        job = {"layer": layer.id, "store_root": str(self._store.root), "root": str(plan.root),
               "log_level": logging.getLogger("lamina").getEffectiveLevel(),
               "options": {"whiteouts": opts.whiteouts, "opaque_xattr": opts.opaque_xattr,
                           "uid_map": [list(m) for m in opts.uid_map],
                           "gid_map": [list(m) for m in opts.gid_map],
                           "privileged": opts.privileged,
                           "lower_roots": [str(p) for p in opts.lower_roots]}}
        try:
            spare.channel.send(job, fds=[data_r, layer.lock.fileno()])
        except BaseException:
            os.close(data_w)
            spare.channel.sock.close()
            raise
        finally:
            os.close(data_r)
        for target, args in ((self._feed, (layer, data_w)), (self._watch, (layer, spare.channel))):
            t = threading.Thread(target=target, args=args, daemon=True,
                                 name=f"lamina-{target.__name__[1:]}-{layer.id[:12]}")
            layer.threads.append(t)
            t.start()

    def _feed(self, layer: _Layer, fd: int) -> None:
        """Copy the caller's stream into the worker's pipe, to its end."""
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        src = layer.stream
        readinto = getattr(src, "readinto", None)
        try:
            while not layer.cancelled:
                if readinto is not None:
                    n = readinto(buf) or 0
                else:
                    data = src.read(_CHUNK)
                    n = len(data)
                    buf[:n] = data
                if not n:
                    break
                out = view[:n]
                while out:
                    out = out[os.write(fd, out):]
        except BrokenPipeError:
            pass  # the worker stopped reading: its own error says why
        except BaseException as e:  # noqa: BLE001 - reported by finish, before the worker's
            layer.feed_error = e
        finally:
            os.close(fd)

    def _watch(self, layer: _Layer, channel: Channel) -> None:
        """Answer the worker's questions, take its result, wait for it to exit."""
        proc = layer.proc
        assert proc is not None
        result: dict[str, Any] | None = None
        try:
            while True:
                doc, _ = channel.receive()
                if doc is None:
                    break
                if doc.get("need") == "lowers":
                    try:
                        self._wait_below(layer)
                        answer = "ready"
                    except LaminaError:
                        answer = "gone"
                    with contextlib.suppress(OSError):
                        channel.send({"lowers": answer})
                else:
                    result = doc
        except (OSError, ValueError) as e:
            layer.error = LaminaError(f"layer {layer.id}: lost the apply worker's answer ({e})")
        finally:
            channel.sock.close()
            code = proc.wait()
            if layer.error is None:
                if result is not None and "done" in result:
                    layer.size = int(result["done"]["size"])
                    layer.diff_id = str(result["done"]["diff_id"])
                elif result is not None and "error" in result:
                    layer.error = decode_error(result["error"])
                else:
                    how = f"signal {-code}" if code < 0 else f"status {code}"
                    layer.error = LaminaError(f"layer {layer.id}: the apply worker died ({how})")
            layer.applied.set()

    # -- finishing ----------------------------------------------------------------------------

    def finish(self, layer_id: str) -> int:
        """Wait for the oldest pending layer, ``layer_id``; make it ready; return the
        bytes applied (the size of its regular files).

        Raises what made it fail (an error reading the caller's stream first: it
        explains the worker's truncated tar), or :class:`DiffIDMismatch`; then it and
        every layer above it are gone.
        """
        if not self._pending or self._pending[0].id != layer_id:
            raise ValueError(f"layer {layer_id} is not the oldest pending layer of this chain apply")
        layer = self._pending[0]
        self._join(layer)
        error = layer.feed_error or layer.error
        if error is None and layer.expected is not None and layer.diff_id != layer.expected:
            assert layer.diff_id is not None
            error = DiffIDMismatch(layer.id, layer.expected, layer.diff_id)
        if error is not None:
            self.abort()
            raise_no_space(layer.id, error)
            raise error
        store = self._store
        assert layer.size is not None
        try:
            syncfs(store.root)
            store.tarsplits.keep(layer.id)
            store.lifecycle.commit(layer.id, size=layer.size, has_tarsplit=True, diff_id=layer.diff_id)
        except BaseException as e:
            self.abort()
            raise_no_space(layer.id, e)
            raise
        self._pending.pop(0)
        assert layer.lock is not None
        layer.lock.release()
        if not self._pending:
            self._stop_writeback()
        return layer.size

    def _join(self, layer: _Layer) -> None:
        layer.applied.wait()
        for t in layer.threads:
            t.join()

    # -- giving up ----------------------------------------------------------------------------

    def abort(self) -> None:
        """Abandon every pending layer, top down: stop the workers and threads first."""
        self._aborting.set()
        try:
            for layer in reversed(self._pending):
                layer.cancelled = True
                if layer.proc is not None and layer.proc.poll() is None:
                    with contextlib.suppress(OSError):
                        layer.proc.kill()
            for layer in reversed(self._pending):
                self._join(layer)
            while self._pending:
                self._abandon(self._pending.pop())
        finally:
            self._aborting.clear()
            self._stop_writeback()
            self._drop_spare()

    def _drop_spare(self) -> None:
        if self._spare is not None:
            spare, self._spare = self._spare, None
            spare.channel.sock.close()
            with contextlib.suppress(OSError):
                spare.proc.kill()
            spare.proc.wait()

    def _abandon(self, layer: _Layer) -> None:
        try:
            self._store.tarsplits.discard(layer.id)
            if layer.begun:
                self._store.lifecycle.abandon(layer.id)
        except Exception as e:  # noqa: BLE001 - cleanup drops it later; the first error matters
            log.warning("could not remove half-made layer %s: %s", layer.id, e)
        finally:
            if layer.lock is not None:
                layer.lock.release()

    def _stop_writeback(self) -> None:
        if self._writeback is not None:
            self._writeback.__exit__(None, None, None)
            self._writeback = None

    def close(self) -> None:
        """Abandon whatever was added and not finished."""
        self.abort()

    def __enter__(self) -> ChainApply:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_env() -> dict[str, str]:
    """This environment, with lamina's own directory first on the worker's path (the
    worker must run the same lamina as this process, installed or not)."""
    here = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (here, path) if p))
