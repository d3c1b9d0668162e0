"""The gRPC face: containerd.services.snapshots.v1.Snapshots on a unix socket.

Each call is translated between protobuf messages and :class:`SnapshotService`, and each
failure becomes the status code containerd maps to its error class (:func:`grpc_code`).
grpcio serves calls in a thread pool; the service and the store under it are
thread-safe, and the store's locks keep other processes (``lamina`` commands, the Docker
plugin) out of a layer being changed.

Mounts are returned, never performed, so a container keeps running while this server
restarts: what is mounted belongs to containerd, and the state (layers and snapshot
records) is on disk, recovered at start-up.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from lamina.drivers.base import MountSpec
from lamina.errors import (
    ChainTooDeep,
    InvalidLayerID,
    InvalidOption,
    LaminaError,
    LayerBusy,
    LayerExists,
    LayerHasChildren,
    LayerNotFound,
    NoSpace,
    ParentNotFound,
)
from lamina.records import SnapshotRecord
from lamina.serving import notify_systemd, prepare_socket
from lamina.snapshotter.errors import (
    FailedPrecondition,
    InvalidArgument,
    SnapshotExists,
    SnapshotNotFound,
    SnapshotterClosed,
)
from lamina.snapshotter.proto import snapshots_pb2 as pb
from lamina.snapshotter.proto import snapshots_pb2_grpc as pb_grpc
from lamina.snapshotter.service import ACTIVE, COMMITTED, VIEW, SnapshotService

log = logging.getLogger(__name__)

#: snapshots per List message: containerd reads a stream of batches
LIST_BATCH = 100

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (SnapshotNotFound, grpc.StatusCode.NOT_FOUND),
    (LayerNotFound, grpc.StatusCode.NOT_FOUND),
    (ParentNotFound, grpc.StatusCode.NOT_FOUND),
    (SnapshotExists, grpc.StatusCode.ALREADY_EXISTS),
    (LayerExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (LayerHasChildren, grpc.StatusCode.FAILED_PRECONDITION),
    (LayerBusy, grpc.StatusCode.FAILED_PRECONDITION),
    (ChainTooDeep, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidOption, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidLayerID, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # filters.InvalidFilter
    (NoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SnapshotterClosed, grpc.StatusCode.UNAVAILABLE),
]

_KIND_TO_PB = {ACTIVE: pb.ACTIVE, VIEW: pb.VIEW, COMMITTED: pb.COMMITTED}

T = TypeVar("T")


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    """The status code containerd expects for ``exc`` (Unknown for anything unforeseen)."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_message(snap: SnapshotRecord) -> pb.Info:
    return pb.Info(name=snap.key, parent=snap.parent or "", kind=_KIND_TO_PB[snap.kind],
                   created_at=_timestamp(snap.created_ns), updated_at=_timestamp(snap.updated_ns),
                   labels=snap.labels)


def mount_messages(specs: list[MountSpec]) -> list[pb.Mount]:
    return [pb.Mount(type=m.type, source=m.source, options=list(m.options)) for m in specs]


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    """One method per RPC; ``request.snapshotter`` (the plugin's name) is not needed."""

    def __init__(self, service: SnapshotService) -> None:
        self.service = service

    def _call(self, context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except LaminaError as e:
            code = grpc_code(e)
            if code == grpc.StatusCode.UNKNOWN:
                log.warning("%s: %s", what, e)
            else:
                log.debug("%s: %s: %s", what, code.name, e)
            context.abort(code, str(e))
        except OSError as e:
            log.exception("%s failed", what)
            context.abort(grpc.StatusCode.UNKNOWN, f"{what}: {e}")
        raise AssertionError("unreachable")  # context.abort raises

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's names
        specs = self._call(context, f"prepare {request.key}", lambda: self.service.prepare(
            request.key, request.parent, dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=mount_messages(specs))

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        specs = self._call(context, f"view {request.key}", lambda: self.service.view(
            request.key, request.parent, dict(request.labels)))
        return pb.ViewSnapshotResponse(mounts=mount_messages(specs))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        specs = self._call(context, f"mounts {request.key}", lambda: self.service.mounts(request.key))
        return pb.MountsResponse(mounts=mount_messages(specs))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._call(context, f"commit {request.key} as {request.name}", lambda: self.service.commit(
            request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._call(context, f"remove {request.key}", lambda: self.service.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        snap = self._call(context, f"stat {request.key}", lambda: self.service.stat(request.key))
        return pb.StatSnapshotResponse(info=info_message(snap))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        info = request.info
        snap = self._call(context, f"update {info.name}", lambda: self.service.update(
            info.name, dict(info.labels), list(request.update_mask.paths)))
        return pb.UpdateSnapshotResponse(info=info_message(snap))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        snaps = self._call(context, "list", lambda: list(self.service.list(list(request.filters))))
        for i in range(0, len(snaps), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_message(s) for s in snaps[i:i + LIST_BATCH]])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        usage = self._call(context, f"usage {request.key}", lambda: self.service.usage(request.key))
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        done = self._call(context, "cleanup", self.service.cleanup)
        for line in done:
            log.info("cleanup: %s", line)
        return empty_pb2.Empty()


class SnapshotterServer:
    """The gRPC server for one service on one unix socket."""

    def __init__(self, service: SnapshotService, socket_path: Path, *, workers: int = 8) -> None:
        self.service = service
        self.socket_path = Path(socket_path).absolute()
        self.workers = workers
        self._server: grpc.Server | None = None

    def start(self) -> None:
        """Listen; when this returns, the socket accepts calls."""
        if len(os.fsencode(self.socket_path)) > 107:
            raise InvalidOption(f"socket path {self.socket_path} is longer than a unix socket allows (107 bytes)")
        prepare_socket(self.socket_path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="snapshots"),
                             options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(self.service), server)
        if server.add_insecure_port(f"unix:{self.socket_path}") == 0:
            raise LaminaError(f"cannot listen on {self.socket_path}")
        server.start()
        os.chmod(self.socket_path, 0o660)
        self._server = server
        log.info("serving containerd's snapshotter API on %s", self.socket_path)

    def stop(self, grace: float = 10.0) -> None:
        """Stop listening; running calls get ``grace`` seconds to finish."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass


def serve(service: SnapshotService, socket_path: Path, *, workers: int = 8) -> None:
    """Recover, listen, tell systemd, and serve until SIGTERM or SIGINT. Blocks."""
    for line in service.recover():
        log.info("recovered: %s", line)
    server = SnapshotterServer(service, socket_path, workers=workers)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    notify_systemd("READY=1")
    try:
        stop.wait()
        log.info("stopping")
        notify_systemd("STOPPING=1")
    finally:
        server.stop()
        service.close()
