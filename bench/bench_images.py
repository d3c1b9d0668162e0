"""``lamina image load`` against ``docker load`` into dockerd's overlay2, in the same run.

The image (built once, cached in ``bench/out``): a Debian bookworm rootfs made by
``debootstrap --variant=minbase`` and ``docker import``ed, plus two layers made with
``docker run`` + ``docker commit`` -- one copying ``/usr`` (real binaries and libraries,
thousands of files), one deleting documentation (whiteouts), editing files and adding a
20 MB blob -- then ``docker save``d: a real archive Docker wrote, ≥ 300 MB. Where
debootstrap cannot reach a Debian mirror, the base layer is this machine's ``/usr``
instead, and the output says so.

Each measurement starts from nothing, on a freshly made ext4 filesystem of its own (a
sparse image on a loop device, so no side inherits another's churn): a fresh private
dockerd (overlay2, its own data-root; ``tests/dockerd.py``) for ``docker load -i``, a fresh store for
``lamina --driver D image load`` (the CLI, in its own process, like the docker CLI). The
archive is read once beforehand so both sides start with it in the page cache; sides
alternate, best of ``--runs``. Reported: wall-clock seconds and the ratio lamina /
docker (target ≤ 1.2 for load), and CPU seconds (dockerd's and the CLI's; lamina's
process) with their ratio, steadier than wall clock on a shared machine. ``docker
save`` against ``lamina image save`` of the loaded image is timed too, for information.
Needs root and Debian's docker.io; without them it says so and exits 0.

    python bench/bench_images.py [--drivers vfs,overlay] [--runs 2] [--docker-vfs] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from dockerd import DockerDaemon  # noqa: E402
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


# -- measuring -----------------------------------------------------------------------------


def _warm(path: Path) -> None:
    with open(path, "rb") as f:
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
    """Wall-clock and CPU seconds of one load and the save after it."""

    load: float
    load_cpu: float
    save: float
    save_cpu: float


def time_docker(archive: Path, driver: str = "overlay2") -> Timing:
    """``docker load -i`` into a fresh dockerd, then ``docker save -o``. CPU time is the
    docker CLI's plus dockerd's own (the daemon does the work)."""
    with fresh_fs(OUT) as tmp:
        d = DockerDaemon(Path(tmp) / "d", storage_driver=driver)
        try:
            d.start()
            assert d.proc is not None
            pid = d.proc.pid
            c0, p0, t0 = _children_cpu(), _proc_cpu(pid), time.perf_counter()
            d.docker("load", "-i", str(archive))
            c1, p1, t1 = _children_cpu(), _proc_cpu(pid), time.perf_counter()
            d.docker("save", "-o", str(Path(tmp) / "saved.tar"), IMAGE)
            c2, p2, t2 = _children_cpu(), _proc_cpu(pid), time.perf_counter()
        finally:
            d.close()
            subprocess.run(["rm", "-rf", str(Path(tmp) / "d")], check=False)
    return Timing(t1 - t0, (c1 - c0) + (p1 - p0), t2 - t1, (c2 - c1) + (p2 - p1))


def time_lamina(archive: Path, driver: str) -> Timing:
    """``lamina image load`` into a fresh store, then ``lamina image save -o``."""
    with fresh_fs(OUT) as tmp:
        root = Path(tmp) / "store"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p))
        base = [sys.executable, "-m", "lamina", "--root", str(root), "--driver", driver, "image"]
        c0, t0 = _children_cpu(), time.perf_counter()
        res = subprocess.run([*base, "load", str(archive)], capture_output=True, text=True, env=env)
        c1, t1 = _children_cpu(), time.perf_counter()
        if res.returncode != 0:
            raise RuntimeError(f"lamina image load failed: {res.stderr.strip()}")
        res = subprocess.run([*base, "save", "-o", str(Path(tmp) / "saved.tar"), IMAGE],
                             capture_output=True, text=True, env=env)
        c2, t2 = _children_cpu(), time.perf_counter()
        if res.returncode != 0:
            raise RuntimeError(f"lamina image save failed: {res.stderr.strip()}")
        subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), "cleanup", "--unmount-all"],
                       capture_output=True, env=env, check=False)
    return Timing(t1 - t0, c1 - c0, t2 - t1, c2 - c1)


def _driver_available(driver: str) -> str | None:
    from lamina.drivers.registry import unavailable_reason

    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        return unavailable_reason(driver, Path(tmp))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drivers", default="vfs,overlay", help="lamina drivers to measure")
    ap.add_argument("--runs", type=int, default=2, help="loads per side; the best counts")
    ap.add_argument("--docker-vfs", action="store_true",
                    help="also time docker load into dockerd's vfs (context for lamina's vfs)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the rootfs and the image")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        log("bench_images: needs root and dockerd (Debian docker.io); skipped")
        return 0
    archive, source = build_image(args.rebuild)
    size = archive.stat().st_size
    with open(archive, "rb") as f:
        import tarfile

        layers = len(json.loads(tarfile.open(fileobj=f).extractfile("manifest.json").read())[0]["Layers"])  # type: ignore[union-attr]
    log(f"image: {archive.name}, {size / 1e6:.0f} MB, {layers} layers; base: {source}")
    from lamina.archive.tar import crc64 as tarsplit_crc

    crc = "anycrc (C)" if getattr(tarsplit_crc, "_FAST", None) is not None else "pure Python"
    log(f"tar-split CRC-64: {crc}")
    if size < MIN_BYTES:
        log(f"  warning: the image is under {MIN_BYTES / 1e6:.0f} MB")
    _warm(archive)
    drivers = []
    for drv in args.drivers.split(","):
        why = _driver_available(drv)
        if why:
            log(f"lamina {drv}: unavailable here ({why}); skipped")
        else:
            drivers.append(drv)
    sides = ["docker-overlay2", *(["docker-vfs"] if args.docker_vfs else []), *(f"lamina-{d}" for d in drivers)]
    runs: dict[str, list[Timing]] = {k: [] for k in sides}
    for run in range(args.runs):
        for side in sides:
            kind, drv = side.split("-", 1)
            runs[side].append(time_docker(archive, drv) if kind == "docker" else time_lamina(archive, drv))
        log(f"run {run + 1}: " + ", ".join(
            f"{k} load {runs[k][-1].load:.2f}s (cpu {runs[k][-1].load_cpu:.2f}) save {runs[k][-1].save:.2f}s"
            for k in sides))
    best = {k: Timing(*(min(getattr(t, f) for t in v) for f in ("load", "load_cpu", "save", "save_cpu")))
            for k, v in runs.items()}
    ref = best["docker-overlay2"]
    result: dict[str, object] = {
        "image_bytes": size, "layers": layers, "base": source, "runs": args.runs, "crc64": crc,
        "best": {k: vars(v) for k, v in best.items()}, "ratio": {}, "cpu_ratio": {}, "save_ratio": {}}
    log(f"{'best of ' + str(args.runs):<20}{'load s':>8}{'ratio':>7}{'cpu s':>8}{'ratio':>7}"
        f"{'save s':>8}{'ratio':>7}")
    for side in sides:
        t = best[side]
        ratio, cpu_ratio, save_ratio = t.load / ref.load, t.load_cpu / ref.load_cpu, t.save / ref.save
        verdict = ""
        if side.startswith("lamina-"):
            for key, value in (("ratio", ratio), ("cpu_ratio", cpu_ratio), ("save_ratio", save_ratio)):
                result[key][side[7:]] = round(value, 3)  # type: ignore[index]
            verdict = "  ok" if ratio <= 1.2 else "  load over the 1.2 target"
        log(f"{side.replace('-', ' '):<20}{t.load:>8.2f}{ratio:>7.2f}{t.load_cpu:>8.2f}{cpu_ratio:>7.2f}"
            f"{t.save:>8.2f}{save_ratio:>7.2f}{verdict}")
    (OUT / "bench_images.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
