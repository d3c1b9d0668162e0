"""dockerd on lamina against dockerd on its own overlay2, in the same run.

Two numbers, each as a ratio lamina / overlay2 (targets: ≤ 1.3):

* ``docker load`` of a multi-layer image of ≥ 300 MB (a docker-save archive built here,
  deterministic, cached in ``bench/out``): small-file layers like a distribution's, and
  big-file layers like an application's. Best of two loads (``docker rmi`` between).
* ``docker run --rm --network none IMAGE true`` latency: median of N runs after one
  warm-up, which is what a user feels for every container.

Each dockerd is private (own data-root, exec-root, socket; see ``tests/dockerd.py``)
and both live on the same filesystem, running at the same time; measurements alternate
between them, so that other work on the machine weighs on both sides alike. The lamina side is ``lamina serve docker-plugin``
with the driver given by ``--lamina-driver`` (overlay by default, the fair match for
overlay2). Needs root and Debian's docker.io; without them it says so and exits 0.

    python bench/bench_docker.py [--size-mb 320] [--runs 10] [--lamina-driver overlay]

First, with no dockerd (``--calls-only`` stops there; ``--quick`` makes it short), the
fixed cost of one plugin call over the socket, as dockerd's plugin client makes it (one
kept-alive connection, POST, JSON): p50 of ``Exists`` and of a ``Get`` + ``Put`` pair of
a layer that stays mounted, against a bare aiohttp handler answering ``{}`` on its own
socket in the same run (rounds alternate between them). Targets: ``Exists`` p50 <=
0.15 ms, ``Get`` + ``Put`` p50 <= 0.3 ms; each line prints the ratio to the bare
handler (two bare calls for the pair), the target and ok/OVER.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))

from dockerd import DockerDaemon, busybox_rootfs_tar  # noqa: E402
from plugin_process import PluginProcess  # noqa: E402

OUT = HERE / "out"
IMAGE = "lamina-bench:1"
MTIME = 1_700_000_000


# -- the image -----------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
    tar.addfile(ti, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
    tar.addfile(ti)


def _small_files_layer(path: Path, rnd: random.Random, top: str, count: int, lo: int, hi: int) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_dir(tar, top)
        per_dir = 50
        for d in range((count + per_dir - 1) // per_dir):
            _add_dir(tar, f"{top}/d{d:03d}")
            for f in range(min(per_dir, count - d * per_dir)):
                _add(tar, f"{top}/d{d:03d}/f{f:03d}", rnd.randbytes(rnd.randint(lo, hi)))


def _big_file_layer(path: Path, rnd: random.Random, name: str, size: int, whiteout: str | None = None) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        top = name.split("/")[0]
        _add_dir(tar, top)
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = size, 0o644, MTIME
        tar.addfile(ti, _RandomReader(rnd, size))
        if whiteout:
            head, _, base = whiteout.rpartition("/")
            _add(tar, f"{head}/.wh.{base}", b"")


class _RandomReader(io.RawIOBase):
    """``size`` random bytes, generated as read (a 100 MB file never sits in memory)."""

    def __init__(self, rnd: random.Random, size: int) -> None:
        self._rnd, self._left = rnd, size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        self._left -= n
        return self._rnd.randbytes(n)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def build_image(size_mb: int) -> Path:
    """A docker-save archive of five layers adding up to about ``size_mb`` MB; cached."""
    OUT.mkdir(parents=True, exist_ok=True)
    archive = OUT / f"docker-bench-{size_mb}mb.tar"
    if archive.exists():
        return archive
    rnd = random.Random(size_mb)
    big = (size_mb << 20) - (70 << 20)
    work = Path(tempfile.mkdtemp(prefix="bench-image-", dir=OUT))
    try:
        layers = [work / f"layer{i}.tar" for i in range(5)]
        busybox_rootfs_tar(layers[0], extra={"etc/os-release": b"NAME=bench\n"})
        _small_files_layer(layers[1], rnd, "usr/share/doc", 6000, 512, 8192)  # ~28 MB
        _big_file_layer(layers[2], rnd, "opt/app.bin", big * 2 // 5)
        _small_files_layer(layers[3], rnd, "usr/lib/app", 300, 64 << 10, 192 << 10)  # ~38 MB
        _big_file_layer(layers[4], rnd, "opt/data.bin", big * 3 // 5, whiteout="etc/os-release")
        diff_ids = ["sha256:" + _sha256(p) for p in layers]
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"bench layer {i}"}
                        for i in range(len(layers))],
        }).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = [{"Config": config_name, "RepoTags": [IMAGE],
                     "Layers": [f"{d[7:]}/layer.tar" for d in diff_ids]}]
        tmp = archive.with_suffix(".partial")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for d, p in zip(diff_ids, layers, strict=True):
                _add_dir(tar, d[7:])
                _add(tar, f"{d[7:]}/VERSION", b"1.0")
                tar.add(p, f"{d[7:]}/layer.tar")
            _add(tar, config_name, config)
            _add(tar, "manifest.json", json.dumps(manifest).encode())
        os.replace(tmp, archive)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return archive


# -- the fixed cost of one plugin call ---------------------------------------------------------

#: targets of issue 14: one call's p50 over the socket
EXISTS_TARGET_MS = 0.15
GET_PUT_TARGET_MS = 0.3
#: a bare aiohttp server on a unix socket answering every POST with {}: the floor
BARE_SERVER = r"""
import sys
from aiohttp import web

async def answer(request):
    await request.read()
    return web.json_response({}, content_type="application/vnd.docker.plugins.v1+json")

app = web.Application()
app.router.add_post("/{tail:.*}", answer)
web.run_app(app, path=sys.argv[1], access_log=None, print=None, handle_signals=True)
"""


class _Client:
    """One kept-alive connection, as dockerd's plugin client keeps one, speaking just
    enough HTTP/1.1 to time the server: ``http.client`` parses headers through the email
    package and would weigh more than a Go client (the floor would be the client's)."""

    def __init__(self, sock: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(sock))
        self.buf = b""

    def call(self, method: str, body: dict[str, object]) -> dict[str, object]:
        data = json.dumps(body).encode() + b"\n"
        self.sock.sendall(b"POST /GraphDriver.%s HTTP/1.1\r\nHost: plugin.moby.localhost\r\n"
                          b"Accept: application/vnd.docker.plugins.v1.2+json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (method.encode(), len(data), data))
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in lines[1:]
                      if line.lower().startswith(b"content-length:"))
        while len(self.buf) < length:
            self.buf += self._recv()
        payload, self.buf = self.buf[:length], self.buf[length:]
        reply = json.loads(payload or b"{}")
        if not lines[0].startswith(b"HTTP/1.1 200") or reply.get("Err"):
            raise RuntimeError(f"{method}: {lines[0]!r} {reply}")
        return reply

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        return chunk


def _bare_server(sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(sock)], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the bare aiohttp server did not start")
        time.sleep(0.02)
    return proc


def call_costs(calls: int, driver: str) -> dict[str, float]:
    """p50 (ms) of a bare {} handler, Exists, and Get+Put of a mounted layer."""
    work = Path(tempfile.mkdtemp(prefix="bench-calls-", dir="/var/tmp"))
    sockdir = Path(tempfile.mkdtemp(prefix="bc-", dir="/tmp"))  # sun_path is short
    plugin = PluginProcess(work / "plugin", driver=driver)
    bare = _bare_server(sockdir / "bare.sock")
    layer = "c" * 64
    try:
        plugin.start()
        ours, floor = _Client(plugin.socket), _Client(sockdir / "bare.sock")
        ours.call("Init", {"Home": str(work / "home")})
        ours.call("Create", {"ID": "b" * 64})
        ours.call("CreateReadWrite", {"ID": layer, "Parent": "b" * 64})
        ours.call("Get", {"ID": layer})  # held for the whole run: Get+Put of a mounted layer
        times: dict[str, list[float]] = {"bare": [], "exists": [], "get_put": []}

        def timed(key: str, fn: Callable[[], object]) -> None:
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)

        def get_put() -> None:
            ours.call("Get", {"ID": layer})
            ours.call("Put", {"ID": layer})

        for _ in range(50):  # warm-up: connections, caches, the thread pool
            floor.call("Exists", {"ID": layer})
            ours.call("Exists", {"ID": layer})
            get_put()
        rounds = 10
        for _ in range(rounds):  # alternate, so load on the machine weighs on all alike
            for _ in range(calls // rounds):
                timed("bare", lambda: floor.call("Exists", {"ID": layer}))
            for _ in range(calls // rounds):
                timed("exists", lambda: ours.call("Exists", {"ID": layer}))
            for _ in range(calls // rounds):
                timed("get_put", get_put)
        ours.call("Put", {"ID": layer})
        ours.call("Cleanup", {})
        return {k: statistics.median(v) * 1000 for k, v in times.items()}
    finally:
        plugin.close()
        bare.terminate()
        bare.wait(10)
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def print_call_costs(costs: dict[str, float], driver: str) -> list[str]:
    """The two lines with ratio, target and ok/OVER; returns the summary entries."""
    bare = costs["bare"]
    print(f"plugin calls over the socket ({driver}), p50; bare aiohttp {{}} handler: {bare:.3f} ms")
    summary = []
    for key, label, target, floor in (("exists", "Exists", EXISTS_TARGET_MS, bare),
                                      ("get_put", "Get + Put", GET_PUT_TARGET_MS, 2 * bare)):
        p50 = costs[key]
        verdict = "ok" if p50 <= target else "OVER"
        print(f"  {label:10} p50 {p50:6.3f} ms  ratio {p50 / floor:5.2f}x the bare handler"
              f"{' (two calls)' if floor != bare else ''}  target <= {target} ms: {verdict}")
        summary.append(f"{key}={p50:.3f}ms {key}.ratio={p50 / floor:.2f}x")
    return summary


# -- the comparison -------------------------------------------------------------------------


@contextmanager
def daemon_on(kind: str, workdir: Path, lamina_driver: str | None) -> Iterator[DockerDaemon]:
    """A private dockerd on overlay2, or on a lamina plugin process."""
    plugin = None
    if kind == "lamina":
        plugin = PluginProcess(workdir / "plugin", driver=lamina_driver)
        plugin.start()
    daemon = DockerDaemon(workdir / "docker", storage_driver=plugin.name if plugin else "overlay2")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.close()
        if plugin is not None:
            plugin.close()


def _timed(d: DockerDaemon, *args: str) -> float:
    t0 = time.perf_counter()
    d.docker(*args, timeout=900)
    return time.perf_counter() - t0


def compare(archive: Path, runs: int, lamina_driver: str | None) -> dict[str, dict[str, object]]:
    """Both daemons up at once, every measurement taken in turns (overlay2, lamina,
    overlay2, ...), so that a machine busy with other work slows both sides alike."""
    kinds = ("overlay2", "lamina")
    work = Path(tempfile.mkdtemp(prefix="bench-docker-", dir=OUT))
    loads: dict[str, list[float]] = {k: [] for k in kinds}
    latencies: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        with daemon_on("overlay2", work / "overlay2", None) as a, \
                daemon_on("lamina", work / "lamina", lamina_driver) as b:
            daemons = dict(zip(kinds, (a, b), strict=True))
            for attempt in range(2):
                for kind, d in daemons.items():
                    if attempt:
                        d.docker("rmi", IMAGE)
                    loads[kind].append(_timed(d, "load", "-q", "-i", str(archive)))
            for d in daemons.values():
                d.docker("run", "--rm", "--network", "none", IMAGE, "true")  # warm-up
            for _ in range(runs):
                for kind, d in daemons.items():
                    latencies[kind].append(_timed(d, "run", "--rm", "--network", "none", IMAGE, "true"))
            drivers = {kind: d.info()["Driver"] for kind, d in daemons.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {kind: {"driver": drivers[kind], "load_s": min(loads[kind]), "loads_s": loads[kind],
                   "run_s": statistics.median(latencies[kind]), "runs_s": latencies[kind]}
            for kind in kinds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=320, help="image size (default 320, at least 300)")
    ap.add_argument("--runs", type=int, default=10, help="docker run repetitions (default 10)")
    ap.add_argument("--lamina-driver", default="overlay", help="lamina driver (default overlay)")
    ap.add_argument("--calls", type=int, default=5000, help="plugin calls timed per kind (default 5000)")
    ap.add_argument("--calls-only", action="store_true", help="time plugin calls only (no dockerd)")
    ap.add_argument("--quick", action="store_true", help="a short call run (a smoke test: numbers mean little)")
    args = ap.parse_args(argv)
    calls_driver = args.lamina_driver if os.geteuid() == 0 else "vfs"
    costs = call_costs(200 if args.quick else args.calls, calls_driver)
    summary = print_call_costs(costs, calls_driver)
    print("summary: " + " ".join(summary))
    if args.calls_only or args.quick:
        return 0
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        print("bench_docker: skipped (needs root and dockerd from Debian's docker.io)")
        return 0
    archive = build_image(args.size_mb)
    print(f"image: {archive.name}, {archive.stat().st_size / 1e6:.0f} MB, 5 layers")
    results = compare(archive, args.runs, args.lamina_driver)
    base, ours = results["overlay2"], results["lamina"]
    load_ratio = float(ours["load_s"]) / float(base["load_s"])  # type: ignore[arg-type]
    run_ratio = float(ours["run_s"]) / float(base["run_s"])  # type: ignore[arg-type]
    print(f"{'':24}{'overlay2':>12}{'lamina':>12}{'ratio':>8}  target")
    print(f"{'docker load (best of 2)':24}{base['load_s']:>11.2f}s{ours['load_s']:>11.2f}s{load_ratio:>8.2f}  <= 1.3")
    print(f"{'docker run --rm (median)':24}{base['run_s']:>11.3f}s{ours['run_s']:>11.3f}s{run_ratio:>8.2f}  <= 1.3")
    print(f"lamina driver: {args.lamina_driver}")
    (OUT / "bench_docker.json").write_text(json.dumps(
        {"size_mb": args.size_mb, "results": results, "load_ratio": load_ratio, "run_ratio": run_ratio},
        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
