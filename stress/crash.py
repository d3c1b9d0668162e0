"""Crash injection: SIGKILL lamina in the middle of its work, then prove nothing was lost.

Nine operations are crashed: ``lamina apply``, ``lamina create-rw``, ``lamina rm``,
``lamina image load`` (a docker-save archive built here), ``lamina image pull`` (the same
image from a docker-registry on loopback, pushed there by skopeo; after each kill and
cleanup it is pulled again and must come out whole), the plugin's ApplyDiff
(``lamina serve docker-plugin`` killed while it unpacks a chunked upload), and the
containerd snapshotter's Prepare, Commit and an image layer's whole import as containerd
does it (Prepare, mount, unpack, Commit), with ``lamina serve containerd-snapshotter``
killed under them. For each, one
undisturbed run is timed first, watching the store's records to learn when the
operation's real work begins (its first record appears) and when it is done (the record
is ready, gone, or the image record is written). The kill points are then spread over
that window: a tenth before the work begins (start-up), most of them inside it, a tenth
after it (commit to exit). A point inside the window is timed from the moment the work
is seen to begin, not from the process start, so interpreter start-up jitter does not
push the kills out of the window; but where the process is a server already up before
the call (the snapshotter's), start-up does not jitter and the work lasts a few ms,
less than seeing it begin takes, so those kills are timed from the call.

After every kill the harness runs ``cleanup`` and ``check`` (with content hashing) and
asserts:

* no half-made layer is visible: every record is complete; the target either does not
  exist or is whole (an applied layer's DiffID is the sha256 of the tar it came from);
* no mount is leaked under the store root, and ``tmp/`` is empty;
* every layer that was complete before the kill is still there and intact;
* (snapshotter) after the snapshotter's recovery every snapshot record names a whole
  layer, no snapshot layer is left without a record, a Commit left the snapshot either
  active under its key or committed under its name, and an imported layer that is
  committed holds the whole tar;
* (image load) every image record is readable and names only complete layers; after
  ``images.recover`` (which ``lamina cleanup`` runs too) no layer of the killed load is
  left without an image record, and no load journal is left.

Full run: ``python -m stress.crash --points 200`` (``make stress``); the test suite runs
``--points 10`` on small inputs (tests/stress/test_stress_short.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from lamina import open as lamina_open  # noqa: E402
from lamina.check import check, leaked_mounts  # noqa: E402
from lamina.records import Records  # noqa: E402
from lamina.store import Store  # noqa: E402

OPERATIONS = ("apply", "create-rw", "rm", "image-load", "pull", "plugin-apply", "snap-prepare", "snap-commit",
              "snap-import")
#: operations that make an image, journalled, and are undone by images.recover
IMAGE_OPS = ("image-load", "pull")
POLL = 0.002  # seconds between looks at the records while waiting for the work to begin
RETIME = 25  # kill points between two undisturbed runs that re-measure the window
MTIME = 1_700_000_000


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def lamina_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "--root", str(root), *args]


# -- inputs ---------------------------------------------------------------------------------


def layer_tar_bytes(files: int, size: int, seed: int) -> bytes:
    """A layer tar: ``files`` files of ``size`` bytes in nested dirs, plus a whiteout."""
    buf = io.BytesIO()
    ndirs = max(1, files // 50)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(ndirs):
            info = tarfile.TarInfo(f"d{d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tf.addfile(info)
        for i in range(files):
            data = (f"{seed}-{i}-".encode() * (size // 4 + 1))[:size]
            info = tarfile.TarInfo(f"d{i % ndirs}/f{seed}-{i}")
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tf.addfile(info, io.BytesIO(data))
        wh = tarfile.TarInfo(".wh.gone")
        wh.mtime = MTIME
        tf.addfile(wh)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class SavedImage:
    """A docker-save archive on disk and what loading it must produce."""

    path: Path
    image_id: str
    layer_ids: list[str]  # lamina layer IDs (chain ID hex), bottom first
    diff_ids: list[str]


def make_docker_save(path: Path, layers: list[bytes], name: str) -> SavedImage:
    """A docker-save archive (Docker 20.10's shape: ``<v1>/layer.tar``, config, manifest)."""
    diff_ids = [sha256(t) for t in layers]
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }).encode()
    image_id = sha256(config)
    chain: list[str] = []
    for d in diff_ids:  # chain IDs: sha256 of "parent-chain diff-id"
        chain.append(d if not chain else sha256(f"{chain[-1]} {d}".encode()))
    entries: dict[str, bytes] = {}
    paths = []
    for i, tar in enumerate(layers):
        v1 = hashlib.sha256(f"v1 {chain[i]}".encode()).hexdigest()
        entries[f"{v1}/VERSION"] = b"1.0"
        entries[f"{v1}/json"] = json.dumps({"id": v1}).encode()
        entries[f"{v1}/layer.tar"] = tar
        paths.append(f"{v1}/layer.tar")
    entries[f"{image_id[7:]}.json"] = config
    entries["manifest.json"] = json.dumps(
        [{"Config": f"{image_id[7:]}.json", "RepoTags": [name], "Layers": paths}]).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for entry in sorted(entries):
            info = tarfile.TarInfo(entry)
            info.size, info.mode, info.mtime = len(entries[entry]), 0o644, MTIME
            tf.addfile(info, io.BytesIO(entries[entry]))
    return SavedImage(path, image_id, [c[7:] for c in chain], diff_ids)


# -- watching the records -------------------------------------------------------------------


class Probe:
    """Reads ``meta.db`` read-only, so the harness sees states the API hides (creating,
    removing) while a victim is at work."""

    def __init__(self, root: Path) -> None:
        self._records = Records(root / "meta.db", readonly=True)

    def row(self, layer_id: str) -> tuple[str, str | None] | None:
        """(state, diff_id) of a layer's record, or None."""
        try:
            with self._records.read() as db:
                rec = db.layer(layer_id)
        except sqlite3.OperationalError:  # busy: a writer is checkpointing
            return ("?", None)
        return (rec.state, rec.diff_id) if rec is not None else None

    def refs(self, layer_id: str) -> int:
        try:
            with self._records.read() as db:
                return db.refcount(layer_id)
        except sqlite3.OperationalError:
            return 0

    def state(self, layer_id: str) -> str | None:
        r = self.row(layer_id)
        return r[0] if r else None

    def snapshot(self, key: str) -> tuple[str, str | None] | None:
        """(kind, its layer's state) of a containerd snapshot's record, or None."""
        try:
            with self._records.read() as db:
                snap = db.snapshot(key, ready_only=False)
                layer = db.layer(snap.layer) if snap is not None else None
        except sqlite3.OperationalError:
            return ("?", None)
        if snap is None:
            return None
        return snap.kind, layer.state if layer is not None else None

    def close(self) -> None:
        self._records.close()


# -- figures ----------------------------------------------------------------------------


@dataclass
class Figures:
    """What one operation's kills showed."""

    op: str
    kills: int = 0
    #: the victim had begun the operation's work when it died
    in_work: int = 0
    #: the operation was already complete when the kill came (or the victim had exited)
    completed: int = 0
    #: cleanup dropped a half-made layer, finished an interrupted removal or unmounted a leak
    mended: int = 0
    #: killed before it touched the store: nothing to mend
    before_work: int = 0
    #: image load: complete layers of the killed load left with no image record after
    #: cleanup (each one is also a problem: recovery should have dropped them)
    image_layers_left: int = 0
    #: image load: half-written image record files (hidden dotfiles) left behind
    record_temps_left: int = 0
    window_ms: tuple[float, float, float] = (0.0, 0.0, 0.0)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        begin, done, end = self.window_ms
        extra = ""
        if self.op == "image-load":
            extra = (f", complete image layers left without a record {self.image_layers_left}"
                     f", record temp files left {self.record_temps_left}")
        return (f"{self.op}: kills {self.kills} (work began at {begin:.0f} ms, done at {done:.0f} ms,"
                f" exit at {end:.0f} ms), killed mid-work {self.in_work}, half-made/half-removed"
                f" layers or leaked mounts mended by cleanup {self.mended}, completed before the kill {self.completed},"
                f" killed before any work {self.before_work}{extra}, problems {len(self.problems)}")


# -- victims ------------------------------------------------------------------------------


class Victim:
    """One run of an operation that can be killed. Subclasses start the work."""

    def start(self) -> None:
        raise NotImplementedError

    def finished(self) -> bool:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.finished():
            if time.monotonic() > deadline:
                raise TimeoutError("operation did not finish")
            time.sleep(POLL)


class CliVictim(Victim):
    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finished(self) -> bool:
        assert self.proc is not None
        return self.proc.poll() is not None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def reap(self) -> str:
        """Wait for the process; return its stderr if it failed on its own."""
        assert self.proc is not None
        _, err = self.proc.communicate()
        if self.proc.returncode not in (0, -signal.SIGKILL):
            return err.decode(errors="replace").strip()
        return ""


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 60) -> None:
        super().__init__("plugin.localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def plugin_call(sock: Path, endpoint: str, body: dict[str, object] | None = None) -> dict[str, object]:
    conn = _Unix(sock)
    try:
        conn.request("POST", endpoint, body=json.dumps(body or {}).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read() or b"{}")
    finally:
        conn.close()
    if resp.status != 200 or data.get("Err"):
        raise RuntimeError(f"{endpoint}: {resp.status} {data}")
    return data


class PluginVictim(Victim):
    """``lamina serve docker-plugin`` with layer ``layer_id`` made by Create; ``start``
    streams the tar as a chunked ApplyDiff, and ``kill`` SIGKILLs the server."""

    def __init__(self, root: Path, work: Path, layer_id: str, parent: str, tar: bytes,
                 driver: str | None) -> None:
        self.root, self.layer_id, self.parent, self.tar = root, layer_id, parent, tar
        self.sock = work / "plugin.sock"
        cmd = [sys.executable, "-m", "lamina", "serve", "docker-plugin", "--socket", str(self.sock),
               "--state", str(work / "plugin-state.json"), "--workers", "2"]
        if driver:
            cmd += ["--driver", driver]
        self.log = open(work / "plugin.log", "ab")  # noqa: SIM115 - closed in reap()
        self.proc = subprocess.Popen(cmd, env=env(), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plugin exited with {self.proc.returncode}; see {work / 'plugin.log'}")
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                plugin_call(self.sock, "/Plugin.Activate")
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("plugin did not answer within 60 s")
            time.sleep(0.02)
        plugin_call(self.sock, "/GraphDriver.Init", {"Home": str(root), "Opts": [], "UIDMaps": None,
                                                     "GIDMaps": None})
        plugin_call(self.sock, "/GraphDriver.Create", {"ID": layer_id, "Parent": parent,
                                                       "MountLabel": "", "StorageOpt": {}})
        self.thread: threading.Thread | None = None
        self.answer: str | None = None

    def _chunks(self) -> Iterator[bytes]:
        view = memoryview(self.tar)
        for i in range(0, len(view), 48_000):
            yield bytes(view[i:i + 48_000])

    def _upload(self) -> None:
        conn = _Unix(self.sock)
        try:
            conn.request("POST", f"/GraphDriver.ApplyDiff?id={self.layer_id}&parent={self.parent}",
                         body=self._chunks(), encode_chunked=True,
                         headers={"Transfer-Encoding": "chunked", "Content-Type": "application/x-tar"})
            resp = conn.getresponse()
            self.answer = f"{resp.status} {resp.read()[:200]!r}"
        except (OSError, http.client.HTTPException) as e:
            self.answer = f"connection lost: {e}"
        finally:
            conn.close()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._upload, daemon=True)
        self.thread.start()

    def finished(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def reap(self) -> str:
        """Join the client, stop a server that was not killed; return an unexpected error."""
        if self.thread is not None:
            self.thread.join(60)
        failed = ""
        if self.proc.poll() is None:
            if self.answer is not None and not self.answer.startswith("200"):
                failed = f"ApplyDiff answered {self.answer}"
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return failed


class SnapshotterVictim(Victim):
    """``lamina serve containerd-snapshotter`` on the store; ``start`` runs ``action``
    (calls through the gRPC stub, as containerd makes them) in a thread, ``kill``
    SIGKILLs the server."""

    def __init__(self, root: Path, work: Path, action: Callable[[Any], None]) -> None:
        import grpc

        from lamina.snapshotter.proto import snapshots_pb2_grpc

        self.action = action
        self.sock = Path(tempfile.mkdtemp(prefix="lcs-", dir="/tmp")) / "s.sock"
        cmd = lamina_cmd(root, "serve", "containerd-snapshotter", "--socket", str(self.sock), "--workers", "2")
        self.log = open(work / "snapshotter.log", "ab")  # noqa: SIM115 - closed in reap()
        self.proc = subprocess.Popen(cmd, env=env(), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"unix:{self.sock}")
        try:
            grpc.channel_ready_future(self.channel).result(timeout=60)
        except grpc.FutureTimeoutError:
            self.proc.kill()
            raise RuntimeError(f"snapshotter did not answer within 60 s; see {work / 'snapshotter.log'}") from None
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self.thread: threading.Thread | None = None
        self.error: str | None = None

    def _run(self) -> None:
        import grpc

        try:
            self.action(self.stub)
        except grpc.RpcError as e:
            self.error = f"{e.code().name}: {e.details()}"
        except Exception as e:  # noqa: BLE001 - reported by reap
            self.error = f"{type(e).__name__}: {e}"

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def finished(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def reap(self) -> str:
        if self.thread is not None:
            self.thread.join(60)
        failed = ""
        if self.proc.poll() is None:
            if self.error:
                failed = f"the calls failed: {self.error}"
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.channel.close()
        self.log.close()
        with contextlib.suppress(OSError):
            self.sock.unlink()  # left by a killed server; a stopped one removed it
        with contextlib.suppress(OSError):
            self.sock.parent.rmdir()
        return failed


# -- operations ---------------------------------------------------------------------------


@dataclass
class Attempt:
    """One run of an operation, ready to start."""

    victim: Victim
    #: the layers the operation makes or removes
    targets: list[str]
    #: the work has begun (a record appeared / changed state)
    begun: Callable[[Probe], bool]
    #: the work is done (committed)
    done: Callable[[Probe], bool]
    #: extra checks after cleanup and check: returns problems
    verify: Callable[[Store], list[str]] = lambda store: []
    #: the process to kill is up before ``start`` (a server the call goes to), so the
    #: time from ``start`` to the work is steady and every kill is timed from ``start``:
    #: waiting to see the work begin costs a poll, longer than a few-ms window
    warm: bool = False


class Operation:
    """An operation to crash: ``attempt(i)`` sets up the store and returns the run;
    ``reset(store)`` puts the store back so the next attempt starts alike."""

    name = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def attempt(self, i: int) -> Attempt:
        raise NotImplementedError

    def reset(self, store: Store, attempt: Attempt) -> None:
        for lid in reversed(attempt.targets):
            if store.exists(lid):
                store.remove(lid)


@dataclass
class Context:
    root: Path
    work: Path
    driver: str | None
    tar: bytes  # the layer applied by apply and ApplyDiff
    image: SavedImage | None = None
    #: where the pull operation pulls ctx.image from (a registry the harness runs)
    pull_ref: str | None = None


def _applied_intact(store: Store, lid: str, tar: bytes) -> list[str]:
    if not store.exists(lid):
        return []
    rec = store.layer(lid)
    if rec.diff_id not in (None, sha256(tar)):
        return [f"layer {lid} exists with DiffID {rec.diff_id}, the tar is {sha256(tar)}"]
    return []


class ApplyOp(Operation):
    name = "apply"

    def attempt(self, i: int) -> Attempt:
        lid = f"a{i}"
        tar_path = self.ctx.work / "layer.tar"
        if not tar_path.exists():
            tar_path.write_bytes(self.ctx.tar)
        return Attempt(CliVictim(lamina_cmd(self.ctx.root, "apply", lid, "--parent", "base", str(tar_path))),
                       [lid], begun=lambda p: p.state(lid) is not None,
                       done=lambda p: p.state(lid) == "ready",
                       verify=lambda store: _applied_intact(store, lid, self.ctx.tar))


class CreateRwOp(Operation):
    name = "create-rw"

    def attempt(self, i: int) -> Attempt:
        lid = f"c{i}"
        return Attempt(CliVictim(lamina_cmd(self.ctx.root, "create-rw", lid, "--parent", "base")),
                       [lid], begun=lambda p: p.state(lid) is not None,
                       done=lambda p: p.state(lid) == "ready")


class RmOp(Operation):
    name = "rm"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.store: Store | None = None

    def attempt(self, i: int) -> Attempt:
        lid = f"r{i}"
        assert self.store is not None
        self.store.apply_diff(lid, "base", io.BytesIO(self.ctx.tar))
        return Attempt(CliVictim(lamina_cmd(self.ctx.root, "rm", lid)), [lid],
                       begun=lambda p: p.state(lid) == "removing",
                       done=lambda p: p.state(lid) is None,
                       verify=lambda store: _applied_intact(store, lid, self.ctx.tar))


class ImageLoadOp(Operation):
    name = "image-load"

    def attempt(self, i: int) -> Attempt:
        img = self.ctx.image
        assert img is not None
        record = self.ctx.root / "images" / f"{img.image_id[7:]}.json"
        return Attempt(CliVictim(lamina_cmd(self.ctx.root, "image", "load", str(img.path))),
                       list(img.layer_ids),
                       begun=lambda p: any(p.state(lid) is not None for lid in img.layer_ids),
                       done=lambda p: record.exists(),
                       verify=lambda store: self._verify(store, img))

    def _verify(self, store: Store, img: SavedImage) -> list[str]:
        problems = []
        images = self.ctx.root / "images"
        for path in images.glob("*.json"):
            if path.name.startswith("."):
                continue
            try:
                doc = json.loads(path.read_bytes())
                chain = [c.split(":", 1)[1] for c in doc["chain_ids"]]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                problems.append(f"image record {path.name} is unreadable: {e}")
                continue
            missing = [lid for lid in chain if not store.exists(lid)]
            if missing:
                problems.append(f"image record {path.name} names missing layer(s) {missing}")
        return problems

    def reset(self, store: Store, attempt: Attempt) -> None:
        from lamina.images.records import ImageRecords
        from lamina.images.remove import remove_images

        img = self.ctx.image
        assert img is not None
        if ImageRecords(store.root).get(img.image_id) is not None:
            remove_images(store, [img.image_id], force=True)
        super().reset(store, attempt)
        for tmp in (store.root / "images").glob(".*.tmp"):
            tmp.unlink()


class PullOp(ImageLoadOp):
    """``lamina image pull`` of ctx.image from a local registry, killed; then pulled again."""

    name = "pull"

    def attempt(self, i: int) -> Attempt:
        img, ref = self.ctx.image, self.ctx.pull_ref
        assert img is not None and ref is not None
        record = self.ctx.root / "images" / f"{img.image_id[7:]}.json"
        return Attempt(CliVictim(lamina_cmd(self.ctx.root, "image", "pull", ref)),
                       list(img.layer_ids),
                       begun=lambda p: any(p.state(lid) is not None for lid in img.layer_ids),
                       done=lambda p: record.exists(),
                       verify=lambda store: self._verify(store, img) + self._repull(store, img, ref))

    def _repull(self, store: Store, img: SavedImage, ref: str) -> list[str]:
        """After the kill and cleanup a pull must finish the work."""
        from lamina.errors import LaminaError
        from lamina.registry import pull

        try:
            res = pull(store, ref)
        except LaminaError as e:
            return [f"re-pull failed: {e}"]
        if res.image_id != img.image_id or any(not store.exists(lid) for lid in img.layer_ids):
            return [f"re-pull made image {res.image_id}, not {img.image_id} with all its layers"]
        return []


class PluginApplyOp(Operation):
    name = "plugin-apply"

    def attempt(self, i: int) -> Attempt:
        lid = f"p{i}"
        victim = PluginVictim(self.ctx.root, self.ctx.work, lid, "base", self.ctx.tar, self.ctx.driver)

        def done(p: Probe) -> bool:
            row = p.row(lid)
            return row is not None and row[0] == "ready" and row[1] is not None

        return Attempt(victim, [lid], begun=lambda p: p.state(lid) == "creating", done=done,
                       verify=lambda store: _applied_intact(store, lid, self.ctx.tar))


class SnapOp(Operation):
    """A containerd snapshotter call crashed; the store holds a committed snapshot
    ``base`` to build on."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.store: Store | None = None

    def service(self, store: Store) -> Any:
        from lamina.snapshotter.service import SnapshotService

        svc = SnapshotService(store)
        if not any(s.key == "base" for s in svc.list()):
            svc.prepare("base-active")
            svc.commit("base", "base-active")
        return svc

    def keys(self, i: int) -> list[str]:
        return [f"key{i}", f"name{i}"]

    def reset(self, store: Store, attempt: Attempt) -> None:
        svc = self.service(store)
        present = {s.key for s in svc.list()}
        for key in attempt.targets:
            if key in present:
                svc.remove(key)

    def verify_common(self, store: Store) -> list[str]:

        problems = []
        svc = self.service(store)
        svc.recover()
        with store.records.read() as db:
            rows = db.snapshots(ready_only=False)
            states = {r.id: r.state for r in db.layers()}
        for row in rows:
            if states.get(row.layer) != "ready":
                problems.append(f"snapshot {row.key!r} names layer {row.layer} in state {states.get(row.layer)}")
        named = {row.layer for row in rows}
        for lid in states:
            if len(lid) == 32 and lid not in named:
                problems.append(f"snapshot layer {lid} has no snapshot record")
        return problems

    def attempt_with(self, i: int, action: Callable[[Any], None], begun: Callable[[Probe], bool],
                     done: Callable[[Probe], bool], verify: Callable[[Store], list[str]]) -> Attempt:
        victim = SnapshotterVictim(self.ctx.root, self.ctx.work, action)
        return Attempt(victim, self.keys(i), begun=begun, done=done,
                       verify=lambda store: self.verify_common(store) + verify(store), warm=True)


def _pb() -> Any:
    from lamina.snapshotter.proto import snapshots_pb2

    return snapshots_pb2


class SnapPrepareOp(SnapOp):
    name = "snap-prepare"

    def attempt(self, i: int) -> Attempt:
        assert self.store is not None
        self.service(self.store)
        key = f"key{i}"

        def action(stub: Any) -> None:
            stub.Prepare(_pb().PrepareSnapshotRequest(key=key, parent="base"), timeout=60)

        def done(p: Probe) -> bool:
            row = p.snapshot(key)
            return row is not None and row[1] == "ready"

        return self.attempt_with(i, action, begun=lambda p: p.snapshot(key) is not None, done=done,
                                 verify=lambda store: [])


class SnapCommitOp(SnapOp):
    name = "snap-commit"

    def attempt(self, i: int) -> Attempt:
        assert self.store is not None
        svc = self.service(self.store)
        key, name = f"key{i}", f"name{i}"
        svc.prepare(key, "base")
        started = threading.Event()

        def action(stub: Any) -> None:
            started.set()
            stub.Commit(_pb().CommitSnapshotRequest(key=key, name=name), timeout=60)

        def verify(store: Store) -> list[str]:
            kinds = {s.key: s.kind for s in self.service(store).list()}
            if (kinds.get(key), kinds.get(name)) not in ((None, "committed"), ("active", None)):
                return [f"after a killed Commit: key {kinds.get(key)}, name {kinds.get(name)}"]
            return []

        return self.attempt_with(i, action, begun=lambda p: started.is_set(),
                                 done=lambda p: (p.snapshot(name) or ("",))[0] == "committed", verify=verify)


class SnapImportOp(SnapOp):
    """An image layer as containerd unpacks one: Prepare, mount what it returns, unpack
    the tar into it, unmount, Commit under the layer's name."""

    name = "snap-import"

    def attempt(self, i: int) -> Attempt:
        assert self.store is not None
        self.service(self.store)
        key, name = f"key{i}", f"name{i}"
        target = self.ctx.work / f"mnt{i}"
        tar = self.ctx.tar

        def action(stub: Any) -> None:
            from lamina.archive.apply import ApplyOptions, apply_tar
            from lamina.fs.mount import MS_BIND, mount, umount

            resp = stub.Prepare(_pb().PrepareSnapshotRequest(key=key, parent="base"), timeout=60)
            (m,) = resp.mounts
            target.mkdir(exist_ok=True)
            if m.type == "bind":
                mount(m.source, target, None, MS_BIND)
            else:
                mount(m.source, target, m.type, 0, ",".join(m.options))
            try:
                apply_tar(target, io.BytesIO(tar), ApplyOptions(whiteouts="delete"))
            finally:
                umount(target)
            stub.Commit(_pb().CommitSnapshotRequest(key=key, name=name), timeout=60)

        def verify(store: Store) -> list[str]:
            snaps = {s.key: s for s in self.service(store).list()}
            if name not in snaps:
                return []
            with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
                files = [m for m in tf.getmembers() if m.isreg() and not os.path.basename(m.name).startswith(".wh.")]
            with store.mounted(snaps[name].layer) as view:
                missing = [m.name for m in files if not (view / m.name).is_file()
                           or (view / m.name).stat().st_size != m.size]
            return [f"committed import {name} lacks {len(missing)} files, e.g. {missing[:3]}"] if missing else []

        return self.attempt_with(i, action, begun=lambda p: p.snapshot(key) is not None,
                                 done=lambda p: (p.snapshot(name) or ("",))[0] == "committed", verify=verify)


class MountOp(Operation):
    """``lamina mount`` of a container layer (not in the default set: the window between
    mount(2) and the committed record is a few milliseconds of fsync)."""

    name = "mount"
    layer = "m"

    def attempt(self, i: int) -> Attempt:
        root = self.ctx.root
        store = lamina_open(root)
        try:
            if not store.exists(self.layer):
                store.create_rw(self.layer, "base")
        finally:
            store.close()
        merged = root / "layers" / self.layer / "merged"

        def begun(p: Probe) -> bool:  # the kernel mount: its record comes after it
            return os.path.ismount(merged) or p.refs(self.layer) > 0

        return Attempt(CliVictim(lamina_cmd(root, "mount", self.layer)), [], begun=begun,
                       done=lambda p: p.refs(self.layer) > 0, verify=self._verify)

    def _verify(self, store: Store) -> list[str]:
        """Mounted with a (persistent) reference and its record, or not mounted at all."""
        rec = store.layer(self.layer)
        mounted = store.driver.is_mounted(self.layer)
        if rec.mount_count and not mounted and store.driver.name != "vfs":
            return [f"layer {self.layer} has {rec.mount_count} reference(s) but is not mounted"]
        if mounted and not rec.mount_count:
            return [f"layer {self.layer} is mounted with no reference"]
        return []

    def reset(self, store: Store, attempt: Attempt) -> None:
        while store.put(self.layer, persistent=True):
            pass
        if store.driver.is_mounted(self.layer):  # a leak (reported): clear it for the next point
            store.driver.unmount(self.layer)


OPS: dict[str, type[Operation]] = {
    c.name: c for c in (ApplyOp, CreateRwOp, RmOp, ImageLoadOp, PullOp, PluginApplyOp, SnapPrepareOp,
                        SnapCommitOp, SnapImportOp, MountOp)}


# -- kill points --------------------------------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    """Where in an operation to kill it, relative to its measured window."""

    #: "pre" (before the work begins), "work" (while it runs) or "post" (after it is done)
    phase: str
    #: how far into that phase, 0..1
    fraction: float

    def anchor(self, warm: bool = False) -> str:
        """What the offset counts from: the victim's start, or its work being seen
        (for a cold victim, whose start-up time jitters; see :attr:`Attempt.warm`)."""
        return "start" if self.phase == "pre" or warm else "begun"

    def offset(self, window: tuple[float, float, float], warm: bool = False) -> float:
        begin, done, end = window
        span = max(done - begin, 0.001)
        if self.phase == "pre":
            return begin * self.fraction
        lead = begin if warm else 0.0
        if self.phase == "work":
            return lead + span * self.fraction
        return lead + span + (max(end - done, 0.0) + 0.1 * end) * self.fraction


def timeline(attempt: Attempt, probe: Probe, timeout: float = 600) -> tuple[float, float, float]:
    """Run ``attempt`` to the end; return when its work began, was done, and it finished."""
    begin = done = None
    t0 = time.monotonic()
    attempt.victim.start()
    while True:
        now = time.monotonic() - t0
        if begin is None and attempt.begun(probe):
            begin = now
        if begin is not None and done is None and attempt.done(probe):
            done = now
        if attempt.victim.finished():
            break
        if now > timeout:
            raise TimeoutError("the timing run did not finish")
        time.sleep(POLL / 2)
    end = time.monotonic() - t0
    if begin is None:
        begin = end
    if done is None:
        done = end
    return begin, max(done, begin), end


def kill_points(n: int) -> list[KillPoint]:
    """A tenth before the work, most within it, a tenth after it (to a little past exit)."""
    pre = max(1, round(n * 0.1)) if n >= 3 else 0
    post = max(1, round(n * 0.1)) if n >= 3 else 0
    work = n - pre - post
    return ([KillPoint("pre", (k + 0.5) / pre) for k in range(pre)]
            + [KillPoint("work", (k + 0.5) / work) for k in range(work)]
            + [KillPoint("post", (k + 0.5) / post) for k in range(post)])


def strike(attempt: Attempt, probe: Probe, point: KillPoint, offset: float) -> tuple[bool, bool]:
    """Start the attempt and kill it ``offset`` seconds after ``point``'s anchor; return
    (killed, work had begun)."""
    victim = attempt.victim
    t0 = time.monotonic()
    victim.start()
    if point.anchor(attempt.warm) == "begun":
        while not attempt.begun(probe):
            if victim.finished():
                return False, True
            if time.monotonic() - t0 > 300:
                break
            time.sleep(POLL)
        t0 = time.monotonic()
    while time.monotonic() - t0 < offset:
        if victim.finished():
            return False, True
        time.sleep(min(POLL, offset))
    if victim.finished():
        return False, True
    began = attempt.begun(probe)
    victim.kill()
    return True, began


# -- after a kill -------------------------------------------------------------------------


def inspect(store: Store, before: set[str], attempt: Attempt) -> tuple[list[str], list[str]]:
    """Run cleanup and check; return (what cleanup mended, problems)."""
    problems: list[str] = []
    try:
        mended = store.cleanup()
    except Exception as e:  # noqa: BLE001 - a cleanup that fails is the finding
        problems.append(f"cleanup failed: {type(e).__name__}: {e}")
        time.sleep(1)  # e.g. a child of the killed process still writing: let it finish
        mended = store.cleanup()
    found, _ = check(store)
    problems += [f"check after cleanup: {p}" for p in found]
    ids = {r.id for r in store.layers()}
    lost = before - ids - set(attempt.targets)
    if lost:
        problems.append(f"complete layers lost: {sorted(lost)}")
    with store.records.read() as db:
        half = [(r.id, r.state) for r in db.layers() if not r.complete]
        refs = sum(not r.persistent for r in db.refs())
        recorded = {os.path.realpath(m.path) for m in db.mounts()}
    own = {os.path.realpath(p) for p in store.driver.own_mounts()}
    leaks = [m for m in leaked_mounts(store.root) if m not in own | recorded]
    problems += [f"leaked mount {m}" for m in leaks]
    problems += [f"layer {lid} still {state} after cleanup" for lid, state in half]
    if refs:
        problems.append(f"{refs} mount reference(s) left with no process alive to hold them")
    left = sorted(p.name for p in (store.root / "tmp").iterdir())
    if left:
        problems.append(f"tmp/ not empty after cleanup: {left[:5]}")
    problems += attempt.verify(store)
    return mended, problems


def crash_operation(op: Operation, store: Store, probe: Probe, points: int,
                    log: Callable[[str], None] = print, verbose: bool = False,
                    timing_runs: int = 1) -> Figures:
    fig = Figures(op.name)

    def measure(runs: int, tag: int) -> tuple[float, float, float] | None:
        """The window of the fastest of ``runs`` undisturbed runs (least slowed by load)."""
        windows = []
        for k in range(runs):
            first = op.attempt(tag - k)
            windows.append(timeline(first, probe))
            err = first.victim.reap() if isinstance(first.victim, (CliVictim, PluginVictim, SnapshotterVictim)) else ""
            if err:
                fig.problems.append(f"undisturbed run failed: {err}")
                return None
            store.cleanup()
            op.reset(store, first)
        return min(windows, key=lambda w: w[2])

    window = measure(timing_runs, -1)
    if window is None:
        return fig
    fig.window_ms = (window[0] * 1000, window[1] * 1000, window[2] * 1000)
    for n, point in enumerate(kill_points(points), 1):
        if n % RETIME == 0:  # the machine's load drifts: measure again now and then
            window = measure(1, -1000 - n) or window
        attempt = op.attempt(n)
        before = {r.id for r in store.layers()}
        offset = point.offset(window, attempt.warm)
        killed, began = strike(attempt, probe, point, offset)
        err = attempt.victim.reap() if isinstance(attempt.victim, (CliVictim, PluginVictim, SnapshotterVictim)) else ""
        what = f"{op.name} point {n} ({point.anchor(attempt.warm)}+{offset * 1000:.0f} ms)"
        if err:
            fig.problems.append(f"{what}: failed on its own: {err}")
        fig.kills += killed
        mended, problems = inspect(store, before, attempt)
        if op.name in IMAGE_OPS:  # what `lamina cleanup` does after the store's cleanup
            from lamina.images import recover as recover_images

            mended += recover_images(store)
        fig.problems += [f"{what}: {p}" for p in problems]
        present = [t for t in attempt.targets if store.exists(t)]
        if any(m.startswith(("dropped half-made", "finished removing", "unmounted leaked", "dropped layer",
                             "forgot snapshot"))
               for m in mended):
            fig.mended += 1
        elif killed and op.name == "rm" and not present:
            fig.completed += 1
        elif killed and op.name != "rm" and present == attempt.targets and attempt.done(probe):
            fig.completed += 1
        elif killed and not began:
            fig.before_work += 1
        elif not killed:
            fig.completed += 1
        fig.in_work += killed and began
        if op.name in IMAGE_OPS:
            assert op.ctx.image is not None
            record = store.root / "images" / f"{op.ctx.image.image_id[7:]}.json"
            if not record.exists() and present:
                fig.image_layers_left += 1
                fig.problems.append(f"{what}: layers of the image left without a record after cleanup: {present}")
            fig.record_temps_left += len(list((store.root / "images").glob(".*.tmp")))
            journals = sorted(p.name for p in (store.root / "images").glob("*.load-*"))
            if journals:
                fig.problems.append(f"{what}: load journals left after cleanup: {journals}")
        if verbose:
            log(f"  {what}: killed={killed} began={began} present={present} mended={mended}")
        op.reset(store, attempt)
        if problems or err:
            log(f"  {what}: {'; '.join(problems or [err])}")
    return fig


def cli_check(root: Path) -> str:
    """``lamina check`` as a user would run it: '' if it says the store is whole."""
    out = subprocess.run(lamina_cmd(root, "check"), env=env(), capture_output=True)
    return "" if out.returncode == 0 else (out.stdout + out.stderr).decode(errors="replace").strip()


def run(ops: list[str], points: int, *, files: int, file_size: int, driver: str | None,
        log: Callable[[str], None] = print, verbose: bool = False) -> list[Figures]:
    """Crash each of ``ops`` at ``points`` points on a fresh store; return the figures."""
    figures = []
    with tempfile.TemporaryDirectory(prefix="lamina-crash-", dir="/var/tmp") as tmp, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        root = work / "store"
        store = lamina_open(root, driver=driver)
        try:
            store.apply_diff("base", None, io.BytesIO(layer_tar_bytes(max(10, files // 4), file_size, seed=0)))
            ctx = Context(root, work, store.driver.name, layer_tar_bytes(files, file_size, seed=1))
            if any(o in IMAGE_OPS for o in ops):
                per = max(1, files // 3)
                ctx.image = make_docker_save(work / "image.tar",
                                             [layer_tar_bytes(per, file_size, seed=10 + k) for k in range(3)],
                                             "crash/test:latest")
            if "pull" in ops:
                assert ctx.image is not None
                ctx.pull_ref = stack.enter_context(_registry_with(work, ctx.image))
            probe = Probe(root)
            for name in ops:
                op = OPS[name](ctx)
                if isinstance(op, (RmOp, SnapOp)):
                    op.store = store
                fig = crash_operation(op, store, probe, points, log, verbose,
                                      timing_runs=3 if points >= 50 else 2)
                complaint = cli_check(root)
                if complaint:
                    fig.problems.append(f"lamina check at the end: {complaint}")
                log(fig.line())
                figures.append(fig)
            probe.close()
        finally:
            store.cleanup(unmount_all=True)
            store.close()
            unmount_under(work)  # whatever the store failed to release, so the rmtree works
    return figures


@contextlib.contextmanager
def _registry_with(work: Path, img: SavedImage) -> Iterator[str]:
    """A docker-registry on loopback holding ``img`` (pushed by skopeo, gzip layers)."""
    sys.path.insert(0, str(REPO / "tests"))
    from registry_support import Registry, skopeo

    with Registry(work / "registry") as reg:
        ref = f"{reg.host}/crash/test:latest"
        skopeo("copy", "--dest-tls-verify=false", f"docker-archive:{img.path}", f"docker://{ref}")
        yield ref


def unmount_under(path: Path) -> None:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4] for line in f}
    for point in sorted((p for p in points if p.startswith(real + "/")), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=200, help="kill points per operation (default 200)")
    ap.add_argument("--files", type=int, default=2000, help="files in the applied layer tar")
    ap.add_argument("--file-size", type=int, default=512, help="bytes per file")
    ap.add_argument("--driver", default=None, help="lamina driver (default: the store's default)")
    ap.add_argument("--ops", default=",".join(OPERATIONS),
                    help=f"comma-separated operations to crash (default: {','.join(OPERATIONS)};"
                         " also: mount)")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per kill point")
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        ap.error(f"unknown operation(s) {unknown}; choose from {', '.join(OPS)}")
    t = time.monotonic()
    figures = run(ops, args.points, files=args.files, file_size=args.file_size, driver=args.driver,
                  verbose=args.verbose)
    kills = sum(f.kills for f in figures)
    problems = [p for f in figures for p in f.problems]
    print(f"total: {kills} kills survived in {time.monotonic() - t:.0f} s, "
          f"{sum(f.in_work for f in figures)} of them mid-work, "
          f"{sum(f.mended for f in figures)} half-made/half-removed layers or leaked mounts mended by cleanup, "
          f"problems {len(problems)}")
    for p in problems[:30]:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
