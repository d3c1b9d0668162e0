"""Talking to lamina's containerd snapshotter the way containerd does, for the tests.

* :class:`Client`: the ten calls over gRPC (lamina's generated stub), each failure a
  :class:`SnapshotError` carrying the status code, as containerd's proxy sees it.
* :func:`mount_all` / :func:`unmount_all`: perform the returned mounts exactly as
  containerd's ``mount.All`` does on Linux: fstab flags split from data, a bind made
  read-only by a remount, and overlay options near a page made shorter by moving into
  the lower directories' common parent (``compactLowerdirOption``). The 128-layer test
  depends on that last part.
* :class:`InProcessSnapshotter`: a store and the gRPC server on a short socket, in this
  process, for the conformance suite; :class:`SnapshotterProcess`: the server as
  ``lamina serve containerd-snapshotter``, for containerd itself to use.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

import lamina
from lamina.drivers.base import CreateOptions
from lamina.fs.mount import MS_BIND, MS_RDONLY, mount, umount
from lamina.fs.overlayfs import in_directory
from lamina.records import SnapshotRecord, Writer
from lamina.snapshotter.proto import snapshots_pb2 as pb
from lamina.snapshotter.proto import snapshots_pb2_grpc as pb_grpc
from lamina.snapshotter.server import SnapshotterServer
from lamina.snapshotter.service import SnapshotService
from procs import start_logged, wait_until

REPO = Path(__file__).resolve().parent.parent
KIND_NAMES = {pb.ACTIVE: "active", pb.VIEW: "view", pb.COMMITTED: "committed"}


class SnapshotError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass
class Info:
    name: str
    parent: str
    kind: str
    created: int
    updated: int
    labels: dict[str, str]

    @classmethod
    def of(cls, msg: pb.Info) -> Info:
        return cls(msg.name, msg.parent, KIND_NAMES.get(msg.kind, "unknown"),
                   msg.created_at.seconds * 1_000_000_000 + msg.created_at.nanos,
                   msg.updated_at.seconds * 1_000_000_000 + msg.updated_at.nanos, dict(msg.labels))


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


def short_socket_dir() -> Path:
    """A directory whose socket paths fit in sun_path (108 bytes), wherever tmp is."""
    return Path(tempfile.mkdtemp(prefix="lsn-", dir="/tmp"))


class Client:
    """containerd's side of the proxy protocol, one call per method."""

    def __init__(self, socket_path: Path, name: str = "lamina") -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)
        self.name = name

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self.stub, method)(request, timeout=120)
        except grpc.RpcError as e:
            raise SnapshotError(e.code(), e.details() or "") from None

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        r = self._call("Prepare", pb.PrepareSnapshotRequest(snapshotter=self.name, key=key, parent=parent,
                                                            labels=dict(labels or {})))
        return _mounts(r.mounts)  # type: ignore[attr-defined]

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        r = self._call("View", pb.ViewSnapshotRequest(snapshotter=self.name, key=key, parent=parent,
                                                      labels=dict(labels or {})))
        return _mounts(r.mounts)  # type: ignore[attr-defined]

    def mounts(self, key: str) -> list[Mount]:
        return _mounts(self._call("Mounts", pb.MountsRequest(snapshotter=self.name, key=key)).mounts)  # type: ignore[attr-defined]

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self._call("Commit", pb.CommitSnapshotRequest(snapshotter=self.name, name=name, key=key,
                                                      labels=dict(labels or {})))

    def remove(self, key: str) -> None:
        self._call("Remove", pb.RemoveSnapshotRequest(snapshotter=self.name, key=key))

    def stat(self, key: str) -> Info:
        return Info.of(self._call("Stat", pb.StatSnapshotRequest(snapshotter=self.name, key=key)).info)  # type: ignore[attr-defined]

    def update(self, info: Info, *paths: str) -> Info:
        msg = pb.Info(name=info.name, parent=info.parent, labels=info.labels)
        req = pb.UpdateSnapshotRequest(snapshotter=self.name, info=msg)
        req.update_mask.paths.extend(paths)
        return Info.of(self._call("Update", req).info)  # type: ignore[attr-defined]

    def walk(self, *filters: str) -> list[Info]:
        return list(self.walk_stream(*filters))

    def walk_stream(self, *filters: str) -> Iterator[Info]:
        """The List stream as it is read, one snapshot at a time: what containerd's
        Walk callback sees, with the stream still open (StatInWalk calls Stat there)."""
        try:
            stream = self.stub.List(pb.ListSnapshotsRequest(snapshotter=self.name, filters=list(filters)),
                                    timeout=120)
            for resp in stream:
                for i in resp.info:
                    yield Info.of(i)
        except grpc.RpcError as e:
            raise SnapshotError(e.code(), e.details() or "") from None

    def usage(self, key: str) -> tuple[int, int]:
        r = self._call("Usage", pb.UsageRequest(snapshotter=self.name, key=key))
        return r.size, r.inodes  # type: ignore[attr-defined]

    def cleanup(self) -> None:
        self._call("Cleanup", pb.CleanupRequest(snapshotter=self.name))


def _mounts(msgs: Sequence[pb.Mount]) -> list[Mount]:
    return [Mount(m.type, m.source, tuple(m.options)) for m in msgs]


# -- mounting as containerd's mount.All does on Linux -----------------------------------

#: containerd's table of fstab words that are flags; (clears, flag)
_FLAGS = {
    "bind": (False, MS_BIND), "rbind": (False, MS_BIND | 0x4000), "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY), "nosuid": (False, 2), "nodev": (False, 4), "noexec": (False, 8),
    "remount": (False, 32), "defaults": (False, 0),
}
MS_REMOUNT = 32


def compact_lowerdirs(options: Sequence[str]) -> tuple[str, list[str]]:
    """containerd's compactLowerdirOption: the lowers relative to their common parent."""
    idx = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if idx < 0:
        return "", list(options)
    dirs = options[idx].removeprefix("lowerdir=").split(":")
    if len(dirs) == 1:
        return "", list(options)
    common = os.path.commonprefix([min(dirs), max(dirs)])
    common = os.path.dirname(common) if not common.endswith("/") else common.rstrip("/")
    if common in ("", "/"):
        return "", list(options)
    common += "/"
    out = [o for i, o in enumerate(options) if i != idx]
    out.append("lowerdir=" + ":".join(d[len(common):] for d in dirs))
    return common, out


def mount_one(m: Mount, target: Path) -> None:
    chdir, options = "", list(m.options)
    page = os.sysconf("SC_PAGE_SIZE")
    if m.type == "overlay" and sum(map(len, options)) >= page - 512:
        chdir, options = compact_lowerdirs(options)
    flags, data = 0, []
    for o in options:
        if o in _FLAGS and _FLAGS[o][1]:
            clear, f = _FLAGS[o]
            flags = flags & ~f if clear else flags | f
        else:
            data.append(o)
    text = ",".join(data)
    if len(text) > page:
        raise OSError(7, f"mount options is too long ({len(text)} bytes)")
    fstype = None if flags & MS_BIND else m.type

    def do() -> None:
        mount(m.source, target, fstype, flags, text)

    if chdir:
        in_directory(Path(chdir), do)
    else:
        do()
    if flags & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
        mount("", target, None, flags | MS_REMOUNT)


def mount_all(mounts: Sequence[Mount], target: Path) -> None:
    for m in mounts:
        mount_one(m, target)


def unmount_all(target: Path) -> None:
    for _ in range(10):
        try:
            umount(target, lazy=False)
        except OSError:
            umount(target)
        if not _is_mounted(target):
            return


def _is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


@contextlib.contextmanager
def mounted(mounts: Sequence[Mount], target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    mount_all(mounts, target)
    try:
        yield target
    finally:
        unmount_all(target)


# -- what crashes leave -----------------------------------------------------------------


def half_made_snapshot(store: lamina.Store, key: str) -> str:
    """Leave what a Prepare killed between making its layer and marking it ready
    leaves: the row and the layer's ``creating`` record, the layer's content on disk,
    and nobody holding its work lock. Returns the layer ID."""
    layer = secrets.token_hex(16)
    now = time.time_ns()
    opts = CreateOptions()

    def record(db: Writer) -> None:
        db.insert_snapshot(SnapshotRecord(key=key, layer=layer, kind="active", parent=None, labels={},
                                          created_ns=now, updated_ns=now))

    with store.work_locks.busy(layer):
        store.lifecycle.begin(layer, None, rw=True, opts=opts, record=record)
        store.driver.create(layer, None, rw=True, opts=opts)
    return layer


def interrupted_removal(store: lamina.Store, key: str) -> str:
    """Leave what a Remove killed after marking the snapshot's layer ``removing`` leaves:
    the row, the record, the content. Returns the layer ID."""
    with store.records.read() as db:
        snap = db.snapshot(key)
    assert snap is not None, key
    with store.work_locks.busy(snap.layer):
        store.lifecycle.mark_removing(snap.layer, snapshot=key)
    return snap.layer


# -- servers ----------------------------------------------------------------------------


class InProcessSnapshotter:
    """A fresh store at ``root`` with driver ``driver``, served on a short socket here."""

    def __init__(self, root: Path, driver: str) -> None:
        self.store = lamina.open(root, driver)
        self.service = SnapshotService(self.store)
        self.sockdir = short_socket_dir()
        self.socket = self.sockdir / "s.sock"
        self.server = SnapshotterServer(self.service, self.socket)
        self.server.start()
        self.client = Client(self.socket)
        self.client.wait_ready()

    def close(self) -> None:
        """The snapshotter's Close: the client's connection, the server, the service
        (and its store). Closing again does nothing."""
        self.client.close()
        self.server.stop(grace=1)
        self.service.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


class SnapshotterProcess:
    """``lamina serve containerd-snapshotter`` as a process of its own (start, stop,
    kill as a crash, start again), logging to ``workdir/snapshotter.log``."""

    def __init__(self, workdir: Path, root: Path, driver: str, socket_path: Path,
                 options: Mapping[str, str] | None = None) -> None:
        self.workdir, self.root, self.driver, self.socket = Path(workdir), Path(root), driver, Path(socket_path)
        self.options = dict(options or {})
        self.log_path = self.workdir / "snapshotter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        opts = [a for k, v in self.options.items() for a in ("--opt", f"{k}={v}")]
        return [sys.executable, "-m", "lamina", "--root", str(self.root), "--driver", self.driver, *opts,
                "serve", "containerd-snapshotter", "--socket", str(self.socket)]

    def start(self, timeout: float = 30.0, env: Mapping[str, str] | None = None, *, wait: bool = True) -> None:
        """Start the server; with ``wait`` (the default) return once it answers calls,
        else at once (a test that must see readiness by other means)."""
        full = dict(os.environ)
        full["PYTHONPATH"] = str(REPO / "src") + os.pathsep + full.get("PYTHONPATH", "")
        full.update(env or {})
        self.proc = start_logged(self.command(), self.log_path, full)
        if not wait:
            return
        wait_until(self.proc, self.answers, timeout=timeout, what="snapshotter", log_tail=self.log_tail,
                   give_up=self.kill)

    def answers(self) -> bool:
        if not self.socket.exists():
            return False
        client = Client(self.socket)
        try:
            client.stat("lamina-test-readiness-probe")
        except SnapshotError as e:
            return e.code == grpc.StatusCode.NOT_FOUND
        finally:
            client.close()
        return True

    def stop(self, timeout: float = 30.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        return "---- snapshotter log tail ----\n" + "\n".join(text.splitlines()[-lines:])
