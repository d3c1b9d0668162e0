"""``lamina image load`` against ``docker load`` into dockerd's overlay2, in the same run.

The image (built once, cached in ``bench/out``): a Debian bookworm rootfs made by
``debootstrap --variant=minbase`` and ``docker import``ed, plus two layers made with
``docker run`` + ``docker commit`` -- one copying ``/usr`` (real binaries and libraries,
thousands of files), one deleting documentation (whiteouts), editing files and adding a
20 MB blob -- then ``docker save``d: a real archive Docker wrote, >= 300 MB. Where
debootstrap cannot reach a Debian mirror, the base layer is this machine's ``/usr``
instead, and the output says so.

Every figure is taken twice: on a freshly made ext4 filesystem of its own (a sparse
image on a loop device, ``bench/freshfs.py``: no side inherits another's churn) and on
the store's own filesystem (a directory beside the default store root, ``/var/lib``,
with whatever history that filesystem has). Each measurement starts from nothing: a
fresh private dockerd (overlay2, its own data-root; ``tests/dockerd.py``) for ``docker
load -i``, a fresh store for ``lamina --driver D image load`` (the CLI, in its own
process, like the docker CLI). The archive is read once beforehand so both sides start
with it in the page cache; the sides run in alternating order (reversed every other
run), best of ``--runs``. Wall-clock seconds and CPU seconds (dockerd's and the CLI's;
lamina's process tree) are reported with their ratios; CPU is steadier than wall clock
on a shared machine.

What is measured, each with its target and ok/OVER:

* ``image load`` of the three-layer image: overlay (layers unpacked side by side,
  ``lamina.chainapply``) and vfs (one after the other: a vfs child starts as a copy of its
  parent) against ``docker load``: target <= 0.5x. Beside it, overlay with ``-j 1``: what
  unpacking side by side gained, serial against parallel in the same run.
* the same image as an OCI layout with gzip layers (level 6) against ``docker load`` of
  a docker-save archive holding the same gzip layers: target <= 0.5x.
* gzip decompression of those layers by zlib (the standard library), ISA-L (``isal``)
  and zlib-ng (``zlib-ng``, if installed), MB/s of output per CPU second, and which one
  lamina uses: target: the fastest.
* the peak memory of ``lamina image load`` (overlay) of an image with a 2 GB layer,
  summed over its process tree (``bench/peakrss.py``), against one with a 200 MB layer
  of the same shape: target <= 100 MB, and flat (at most 10 MB more for ten times the
  layer).
* ``docker save`` against ``lamina image save`` of the loaded image, for information.

Needs root and Debian's docker.io; without them it says so and exits 0. ``--quick`` is
a smoke run: a small synthetic image, one run, small memory images; its ratios are
start-up costs.

    python bench/bench_images.py [--runs 3] [--drivers overlay,vfs] [--quick] [--rebuild]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import imagekit  # noqa: E402
import peakrss  # noqa: E402
from dockerd import DockerDaemon  # noqa: E402
from freshfs import available as freshfs_available  # noqa: E402
from freshfs import fresh_fs  # noqa: E402

OUT = HERE / "out"
ROOTFS = OUT / "images-rootfs.tar"
ROOTFS_NOTE = OUT / "images-rootfs.source"
ARCHIVE = OUT / "images-bench.tar"
IMAGE = "lamina-bench/debian:1"
MIN_BYTES = 300 * 10**6
MIRROR = os.environ.get("LAMINA_BENCH_MIRROR", "http://deb.debian.org/debian")


def log(msg: str) -> None:
    print(msg, flush=True)


# -- the image ---------------------------------------------------------------------------


def _debootstrap(dest: Path) -> str | None:
    """Make a minbase bookworm rootfs tar at ``dest``; None on success, else why not."""
    if not shutil.which("debootstrap"):
        return "debootstrap not installed"
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        root = Path(tmp) / "rootfs"
        res = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), MIRROR],
                             capture_output=True, text=True, timeout=1200)
        if res.returncode != 0:
            return f"debootstrap failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}"
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(dest), "."],
                       check=True)
    return None


def _host_usr(dest: Path) -> None:
    """Fallback base: this machine's /usr (about 300 MB of it), as a rootfs tar."""
    subprocess.run(["tar", "--numeric-owner", "-C", "/", "-cf", str(dest), "--exclude=usr/local",
                    "--exclude=usr/src", "usr/bin", "usr/sbin", "usr/lib", "usr/share", "etc"],
                   check=False)


def build_image(rebuild: bool) -> tuple[Path, str]:
    """The docker-save archive of the bench image, built if missing; (path, base source)."""
    OUT.mkdir(exist_ok=True)
    if ARCHIVE.exists() and ROOTFS_NOTE.exists() and not rebuild:
        return ARCHIVE, ROOTFS_NOTE.read_text().strip()
    if not ROOTFS.exists() or rebuild:
        log(f"building the base rootfs with debootstrap from {MIRROR} ...")
        why = _debootstrap(ROOTFS)
        if why is None:
            source = f"debootstrap --variant=minbase bookworm ({MIRROR})"
        else:
            log(f"  {why}; using this machine's /usr as the base layer instead")
            _host_usr(ROOTFS)
            source = f"this machine's /usr and /etc ({why})"
        ROOTFS_NOTE.write_text(source + "\n")
    source = ROOTFS_NOTE.read_text().strip()
    log("building the image with dockerd (import, run + commit twice, save) ...")
    with tempfile.TemporaryDirectory(dir=OUT) as tmp, DockerDaemon(Path(tmp) / "build") as d:
        d.docker("import", str(ROOTFS), "lamina-bench/base:1")
        d.docker("run", "--name", "l2", "--network", "none", "lamina-bench/base:1", "/bin/sh", "-c",
                 "cp -a /usr /opt/usr-copy")
        d.docker("commit", "l2", "lamina-bench/l2:1")
        d.docker("run", "--name", "l3", "--network", "none", "lamina-bench/l2:1", "/bin/sh", "-c",
                 "rm -rf /usr/share/doc /usr/share/man /opt/usr-copy/share/locale"
                 " && echo bench > /etc/motd && mkdir -p /srv"
                 " && head -c 20000000 /dev/urandom > /srv/blob.bin")
        d.docker("commit", "l3", IMAGE)
        tmp_archive = ARCHIVE.with_suffix(".tmp")
        d.docker("save", "-o", str(tmp_archive), IMAGE)
        os.replace(tmp_archive, ARCHIVE)
    return ARCHIVE, source


# -- where each measurement runs -------------------------------------------------------------

#: a fresh ext4 of its own, and the filesystem the store lives on by default
PLACES = ("fresh", "own")
PLACE_LABEL = {"fresh": "fresh ext4", "own": "store's fs"}


def own_parent() -> Path:
    """Where the store's own filesystem is: beside the default store root."""
    from lamina.store import default_root

    return default_root().parent


@contextlib.contextmanager
def place(kind: str, fresh_ok: bool) -> Iterator[Path]:
    """An empty directory on a fresh filesystem (``fresh``) or on the store's own."""
    if kind == "fresh" and fresh_ok:
        with fresh_fs(OUT) as mnt:
            yield mnt
        return
    parent = own_parent() if kind == "own" else OUT
    parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=parent, prefix="lamina-bench-"))
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=False)


# -- measuring -------------------------------------------------------------------------------


def _warm(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's reaped children so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu(pid: int) -> float:
    """CPU seconds of a live process and its reaped children (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Timing:
    """Wall-clock and CPU seconds of one load and the save after it (0 if not timed)."""

    load: float
    load_cpu: float
    save: float = 0.0
    save_cpu: float = 0.0


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p))


def time_docker(archive: Path, where: Path, image: str, *, save: bool) -> Timing:
    """``docker load -i`` into a fresh dockerd (overlay2), then ``docker save -o``. CPU
    time is the docker CLI's plus dockerd's own (the daemon does the work)."""
    d = DockerDaemon(where / "d", storage_driver="overlay2")
    try:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        c0, p0, t0 = _children_cpu(), _proc_cpu(pid), time.perf_counter()
        d.docker("load", "-i", str(archive))
        c1, p1, t1 = _children_cpu(), _proc_cpu(pid), time.perf_counter()
        out = Timing(t1 - t0, (c1 - c0) + (p1 - p0))
        if save:
            d.docker("save", "-o", str(where / "saved.tar"), image)
            c2, p2, t2 = _children_cpu(), _proc_cpu(pid), time.perf_counter()
            out.save, out.save_cpu = t2 - t1, (c2 - c1) + (p2 - p1)
    finally:
        d.close()
        subprocess.run(["rm", "-rf", str(where / "d"), str(where / "saved.tar")], check=False)
    return out


def time_lamina(archive: Path, where: Path, driver: str, image: str, *, jobs: int | None,
                save: bool) -> Timing:
    """``lamina image load`` into a fresh store, then ``lamina image save -o``."""
    root = where / "store"
    base = [sys.executable, "-m", "lamina", "--root", str(root), "--driver", driver, "image"]
    jobs_args = ["-j", str(jobs)] if jobs is not None else []
    try:
        c0, t0 = _children_cpu(), time.perf_counter()
        res = subprocess.run([*base, "load", *jobs_args, str(archive)], capture_output=True, text=True,
                             env=_env())
        c1, t1 = _children_cpu(), time.perf_counter()
        if res.returncode != 0:
            raise RuntimeError(f"lamina image load failed: {res.stderr.strip()}")
        out = Timing(t1 - t0, c1 - c0)
        if save:
            res = subprocess.run([*base, "save", "-o", str(where / "saved.tar"), image],
                                 capture_output=True, text=True, env=_env())
            c2, t2 = _children_cpu(), time.perf_counter()
            if res.returncode != 0:
                raise RuntimeError(f"lamina image save failed: {res.stderr.strip()}")
            out.save, out.save_cpu = t2 - t1, c2 - c1
    finally:
        subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), "cleanup", "--unmount-all"],
                       capture_output=True, env=_env(), check=False)
        subprocess.run(["rm", "-rf", str(root), str(where / "saved.tar")], check=False)
    return out


def _driver_available(driver: str) -> str | None:
    from lamina.drivers.registry import unavailable_reason

    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        return unavailable_reason(driver, Path(tmp))


@dataclass(frozen=True)
class Side:
    """One thing timed: a label and how to time it in a given directory."""

    label: str
    time: Callable[[Path], Timing]
    lamina: bool = True


def alternate(sides: list[Side], runs: int, fresh_ok: bool) -> dict[tuple[str, str], list[Timing]]:
    """Time every side on both filesystems, ``runs`` times, in alternating order."""
    out: dict[tuple[str, str], list[Timing]] = {}
    for run in range(runs):
        order = sides if run % 2 == 0 else sides[::-1]
        for kind in PLACES:
            for side in order:
                with place(kind, fresh_ok) as where:
                    t = side.time(where)
                out.setdefault((kind, side.label), []).append(t)
            log(f"  run {run + 1} {PLACE_LABEL[kind]}: " + ", ".join(
                f"{s.label} {out[(kind, s.label)][-1].load:.2f}s (cpu {out[(kind, s.label)][-1].load_cpu:.2f})"
                for s in order))
    return out


def best(timings: list[Timing]) -> Timing:
    return Timing(*(min(getattr(t, f) for t in timings) for f in ("load", "load_cpu", "save", "save_cpu")))


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "OVER"


# -- the sections -----------------------------------------------------------------------------

LOAD_TARGET = 0.5
RSS_TARGET = 100 << 20
RSS_FLAT = 10 << 20


def section_load(archive: Path, image: str, drivers: list[str], runs: int, fresh_ok: bool,
                 summary: dict[str, object]) -> None:
    """The image against docker load: overlay side by side, overlay -j 1, vfs."""
    sides = [Side("docker overlay2", lambda w: time_docker(archive, w, image, save=True), lamina=False)]
    for drv in drivers:
        sides.append(Side(f"lamina {drv}", lambda w, d=drv: time_lamina(archive, w, d, image, jobs=None, save=True)))
        if drv == "overlay":
            sides.append(Side("lamina overlay -j1", lambda w: time_lamina(archive, w, "overlay", image,
                                                                          jobs=1, save=True)))
    log(f"== image load: lamina against docker load (overlay2), best of {runs}, sides alternating")
    results = alternate(sides, runs, fresh_ok)
    log(f"{'':12}{'':22}{'load s':>8}{'cpu s':>8}{'save s':>8}{'cpu s':>8}")
    for kind in PLACES:
        for side in sides:
            t = best(results[(kind, side.label)])
            log(f"{PLACE_LABEL[kind]:12}{side.label:22}{t.load:8.2f}{t.load_cpu:8.2f}{t.save:8.2f}{t.save_cpu:8.2f}")
    for kind in PLACES:
        ref = best(results[(kind, "docker overlay2")])
        for side in sides[1:]:
            t = best(results[(kind, side.label)])
            ratio, cpu = t.load / ref.load, t.load_cpu / ref.load_cpu
            key = f"load.{side.label[7:].replace(' ', '')}.{kind}"
            summary[key] = round(ratio, 3)
            summary[key + ".cpu"] = round(cpu, 3)
            note = "  (vfs: one layer after another, a child starts as a copy of its parent)" \
                if side.label == "lamina vfs" else ""
            log(f"load {side.label[7:]:12} {PLACE_LABEL[kind]:12} {ratio:5.2f}x (cpu {cpu:4.2f}x) of docker load"
                f"   target <= {LOAD_TARGET}x: {verdict(ratio, LOAD_TARGET)}{note}")
        if ("fresh", "lamina overlay -j1") in results:
            par, ser = best(results[(kind, "lamina overlay")]), best(results[(kind, "lamina overlay -j1")])
            summary[f"parallel_gain.{kind}"] = round(ser.load / par.load, 3)
            log(f"side by side, overlay, {PLACE_LABEL[kind]}: -j1 {ser.load:.2f} s -> default {par.load:.2f} s,"
                f" {ser.load / par.load:.2f}x faster (cpu {ser.load_cpu:.2f} -> {par.load_cpu:.2f} s,"
                f" {par.load_cpu / ser.load_cpu:.2f}x)")
        for side in sides[1:]:
            t = best(results[(kind, side.label)])
            log(f"save {side.label[7:]:12} {PLACE_LABEL[kind]:12} {t.save / ref.save:5.2f}x of docker save"
                f" (cpu {t.save_cpu / ref.save_cpu:4.2f}x), for information")


def section_gzip(variants: imagekit.GzipVariants, image: str, driver: str, runs: int, fresh_ok: bool,
                 summary: dict[str, object]) -> None:
    """The gzip OCI layout against docker load of the same gzip layers."""
    comp = sum(c for c, _ in variants.sizes)
    raw = sum(r for _, r in variants.sizes)
    log(f"== gzip layers: lamina image load of an OCI layout against docker load of a docker-save "
        f"archive, the same gzip -{imagekit.GZIP_LEVEL} layers ({comp / 1e6:.0f} MB for {raw / 1e6:.0f} MB "
        f"of tar), best of {runs}")
    sides = [Side("docker overlay2", lambda w: time_docker(variants.archive, w, image, save=False), lamina=False),
             Side(f"lamina {driver}", lambda w: time_lamina(variants.layout, w, driver, image, jobs=None,
                                                              save=False))]
    results = alternate(sides, runs, fresh_ok)
    for kind in PLACES:
        ref = best(results[(kind, "docker overlay2")])
        t = best(results[(kind, f"lamina {driver}")])
        ratio, cpu = t.load / ref.load, t.load_cpu / ref.load_cpu
        summary[f"gzip_load.{kind}"] = round(ratio, 3)
        summary[f"gzip_load.{kind}.cpu"] = round(cpu, 3)
        log(f"gzip load {driver} {PLACE_LABEL[kind]:12} lamina {t.load:.2f} s (cpu {t.load_cpu:.2f}), "
            f"docker {ref.load:.2f} s (cpu {ref.load_cpu:.2f}): {ratio:5.2f}x (cpu {cpu:4.2f}x)"
            f"   target <= {LOAD_TARGET}x: {verdict(ratio, LOAD_TARGET)}")


def _decompressors() -> list[tuple[str, Callable[[object], object] | None, str]]:
    import gzip

    out: list[tuple[str, Callable[[object], object] | None, str]] = [
        ("zlib (standard library gzip)", lambda f: gzip.GzipFile(fileobj=f), "")]  # type: ignore[arg-type]
    try:
        from isal import igzip

        out.append(("ISA-L igzip (isal)", lambda f: igzip.IGzipFile(fileobj=f), ""))  # type: ignore[arg-type]
    except ImportError:
        out.append(("ISA-L igzip (isal)", None, "isal not installed"))
    try:
        from zlib_ng import gzip_ng

        out.append(("zlib-ng (zlib-ng)", lambda f: gzip_ng.GzipNGFile(fileobj=f), ""))  # type: ignore[arg-type]
    except ImportError:
        out.append(("zlib-ng (zlib-ng)", None, "zlib-ng not installed (pip install zlib-ng)"))
    return out


def section_decompress(blobs: list[Path], summary: dict[str, object]) -> None:
    """MB/s of each gzip library on the image's own gzip layers; which lamina uses."""
    from lamina.compression import gzip_library

    total_in = sum(p.stat().st_size for p in blobs)
    log(f"== gzip decompression of the image's layers ({total_in / 1e6:.0f} MB of gzip), best of 3, "
        "MB of tar per CPU second (and per wall second)")
    _warm(blobs[0].parent)
    libs = _decompressors()
    rates: dict[str, tuple[float, float]] = {}
    buf = bytearray(1 << 20)
    for rep in range(3):
        for name, opener, _ in libs if rep % 2 == 0 else libs[::-1]:
            if opener is None:
                continue
            out, t0, c0 = 0, time.perf_counter(), time.process_time()
            for blob in blobs:
                with open(blob, "rb") as f:
                    reader = opener(f)
                    while n := reader.readinto(buf):  # type: ignore[attr-defined]
                        out += n
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            old = rates.get(name, (0.0, 0.0))
            rates[name] = (max(old[0], out / 1e6 / cpu), max(old[1], out / 1e6 / wall))
    for name, _, why in libs:
        if name in rates:
            log(f"  {name:32} {rates[name][0]:7.0f} MB/s cpu ({rates[name][1]:.0f} MB/s wall)")
        else:
            log(f"  {name:32} {why}")
    used = gzip_library()
    mine = next((r for n, r in rates.items() if n.split(" (")[0].split()[0] in used), None)
    fastest = max(rates.items(), key=lambda kv: kv[1][0])
    ok = mine is not None and mine[0] >= 0.95 * fastest[1][0]
    summary["gunzip_mb_s"] = {n: round(r[0]) for n, r in rates.items()}
    summary["gunzip_lamina"] = used
    log(f"lamina decompresses gzip with {used}; fastest here: {fastest[0]}"
        f"   target: lamina's is the fastest (within 5%): {'ok' if ok else 'OVER'}")


def section_memory(sizes: tuple[int, int], driver: str, fresh_ok: bool, summary: dict[str, object]) -> None:
    """Peak memory of image load: a small and a ten times larger layer of the same shape."""
    small, large = sizes
    log(f"== peak memory of lamina image load ({driver}): an image of an 8 MB base and one layer of "
        f"{_size(small)} against one of {_size(large)} (files of 256 KiB on average), summed over the "
        "process tree (the largest single process beside it)")
    images = {}
    for size in sizes:
        name = f"images-rss-{_size(size).replace(' ', '')}.tar"
        log(f"  making {name} (once; kept in bench/out) ...") if not (OUT / name).exists() else None
        images[size] = imagekit.synthetic_image(OUT / name, [min(8 << 20, size), size], "lamina-bench/rss:1")
    for kind in PLACES:
        peaks = {}
        for size in sizes:
            _warm(images[size])
            with place(kind, fresh_ok) as where:
                root = where / "store"
                try:
                    peak = peakrss.run([sys.executable, "-m", "lamina", "--root", str(root), "--driver", driver,
                                        "image", "load", str(images[size])], env=_env())
                finally:
                    subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), "cleanup",
                                    "--unmount-all"], capture_output=True, env=_env(), check=False)
            if peak.returncode != 0:
                raise RuntimeError(f"lamina image load failed: {peak.stderr.strip()}")
            peaks[size] = peak
            log(f"  {PLACE_LABEL[kind]:12} {_size(size):>7} layer: {peak.wall:6.2f} s, peak RSS "
                f"{peak.tree / 2**20:5.1f} MiB (largest process {peak.single / 2**20:5.1f} MiB)")
        big, little = peaks[large], peaks[small]
        growth = big.tree - little.tree
        summary[f"rss_mib.{kind}"] = round(big.tree / 2**20, 1)
        summary[f"rss_growth_mib.{kind}"] = round(growth / 2**20, 1)
        log(f"memory {_size(large)} layer {PLACE_LABEL[kind]:12} {big.tree / 2**20:5.1f} MiB"
            f"   target <= {RSS_TARGET >> 20} MiB: {verdict(big.tree, RSS_TARGET)}")
        log(f"memory flat {PLACE_LABEL[kind]:12} {growth / 2**20:+5.1f} MiB from {_size(small)} to "
            f"{_size(large)}   target <= +{RSS_FLAT >> 20} MiB: {verdict(growth, RSS_FLAT)}")


def _size(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 1 << 30 else f"{n / 2**20:g} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drivers", default="overlay,vfs", help="lamina drivers to measure")
    ap.add_argument("--runs", type=int, default=3, help="loads per side and filesystem; the best counts")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the rootfs and the image")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: a small synthetic image, one run, small memory images")
    ap.add_argument("--skip", default="", help="sections to leave out: load,gzip,gunzip,memory")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        log("bench_images: needs root and dockerd (Debian docker.io); skipped")
        return 0
    skip = set(filter(None, args.skip.split(",")))
    OUT.mkdir(exist_ok=True)
    if args.quick:
        archive = imagekit.synthetic_image(OUT / "images-quick.tar", [6 << 20, 3 << 20, 1 << 20],
                                           "lamina-bench/quick:1", file_size=32 << 10)
        image, source, runs = "lamina-bench/quick:1", "synthetic (--quick)", 1
        rss_sizes = (2 << 20, 20 << 20)
    else:
        archive, source = build_image(args.rebuild)
        image, runs = IMAGE, args.runs
        rss_sizes = (200 << 20, 2 << 30)
    fresh_ok = freshfs_available() and not args.quick
    if not fresh_ok:
        PLACE_LABEL["fresh"] = "bench/out"  # no fresh ext4 (quick, or no loop devices)
    size = archive.stat().st_size
    import tarfile

    with tarfile.open(archive) as tf:
        layers = len(json.loads(tf.extractfile("manifest.json").read())[0]["Layers"])  # type: ignore[union-attr]
    log(f"image: {archive.name}, {size / 1e6:.0f} MB, {layers} layers; base: {source}")
    from lamina.archive.tar import crc64 as tarsplit_crc
    from lamina.chainapply import cpu_count

    crc = "anycrc (C)" if getattr(tarsplit_crc, "_FAST", None) is not None else "pure Python"
    log(f"tar-split CRC-64: {crc}; CPUs: {cpu_count()}; load average: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    log(f"filesystems: {'a fresh ext4 per measurement' if fresh_ok else 'a directory under bench/out (no fresh ext4)'}"
        f" and the store's own ({own_parent()})")
    if not args.quick and size < MIN_BYTES:
        log(f"  warning: the image is under {MIN_BYTES / 1e6:.0f} MB")
    drivers = []
    for drv in args.drivers.split(","):
        why = _driver_available(drv)
        if why:
            log(f"lamina {drv}: unavailable here ({why}); skipped")
        else:
            drivers.append(drv)
    main_driver = "overlay" if "overlay" in drivers else drivers[0]
    summary: dict[str, object] = {"image_bytes": size, "layers": layers, "base": source, "runs": runs,
                                  "crc64": crc}
    _warm(archive)
    if "load" not in skip:
        section_load(archive, image, drivers, runs, fresh_ok, summary)
    if not {"gzip", "gunzip"} <= skip:
        log("making the gzip variants (once; kept in bench/out) ...")
        variants = imagekit.gzip_variants(archive, OUT / f"{archive.stem}-gzip", image)
        _warm(variants.archive)
        _warm(variants.layout)
        if "gzip" not in skip:
            section_gzip(variants, image, main_driver, runs, fresh_ok, summary)
        if "gunzip" not in skip:
            section_decompress(variants.blobs, summary)
    if "memory" not in skip:
        section_memory(rss_sizes, main_driver, fresh_ok, summary)
    log("summary: " + " ".join(f"{k}={v}" for k, v in summary.items()
                               if isinstance(v, (int, float)) and "." in k))
    (OUT / ("bench_images-quick.json" if args.quick else "bench_images.json")).write_text(
        json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
