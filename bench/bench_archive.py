"""lamina's apply and diff against GNU tar, on the same data, in the same run (issue 13).

Three layers: **debian**, the layers of a real distro image (``bench_images.py``'s
debootstrap'ed bookworm image, its layer tars taken from the cached ``docker save``
archive in ``bench/out``; built with dockerd if missing, skipped with the reason if that
cannot be done); **small**, 100,000 files of 0-200 bytes; **big**, 200 MB in 8 files.

For each layer, every figure is taken twice, the Python API and the CLI users meet:

* apply: ``store.apply_diff`` on a vfs store / ``lamina apply ID FILE`` (a process),
  against ``tar -xf FILE`` followed by ``sync -f`` (syncfs of that filesystem: the
  durability lamina promises, since the store syncs before it records a layer ready).
  Each layer of the image is applied as a layer of its own (no parent: a vfs child
  would first copy its parent, which is no part of applying a tar), each synced.
  Targets: debian <= 1.1x, small <= 1.2x, big <= 1.0x.
* diff: ``store.diff`` of the applied layer (rebuilt from tar-split, byte for byte the
  tar applied; checked) written to a file / ``lamina diff ID -o FILE``, against
  ``tar -cf FILE -C LAYERDIR .`` (for the CLI followed by ``sync FILE``: ``lamina diff
  -o`` fsyncs the file before renaming it into place, so a tar that looks whole is
  whole). Targets: small <= 1.2x, big <= 0.7x (debian: shown).

and each on two filesystems: a **fresh** ext4 made for the measurement (each apply run
gets its own; see ``freshfs.py`` for why) and the **store**'s own filesystem (``--dir``,
default a directory beside the default store root, ``/var/lib`` as root), where churn
accumulates as it does for a real store. The lamina and tar sides alternate in order
from run to run; the best wall-clock time of each side is kept, and the ratio is
lamina's best over tar's best (CPU: the same with CPU seconds, children included).

Last, peak memory: ``lamina apply`` and ``lamina diff -o /dev/null`` of a 2 GB layer
(mostly zeros, piped in as it is generated), each a process, its peak RSS taken from
``wait4``; target <= 100 MB, and flat: compared with the same for a 200 MB layer.

    python bench/bench_archive.py [--quick] [--runs N] [--driver vfs] [--dir DIR]
                                  [--only debian,small,big,memory]

``--quick`` (the test suite's smoke run) uses small sizes, one run, no debian, and no
syncs between runs; its numbers mean little.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

import freshfs  # noqa: E402
from lamina.archive.tar import writer as tw  # noqa: E402

MiB = 1 << 20
OUT = HERE / "out"
MEMORY_TARGET_MB = 100

#: write back dirty pages before each timed run (off in --quick)
SYNC = True

#: the environment of the lamina processes: this tree's lamina, its bytecode cached as an
#: installed lamina's is (PYTHONDONTWRITEBYTECODE, which test runners set, would have every
#: start compile lamina anew: ~50 ms that no user pays), in bench/out, not in src/
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p),
    "PYTHONPYCACHEPREFIX": str(OUT / "pycache"),
}


# -- the layers ---------------------------------------------------------------------------


@dataclass
class Dataset:
    name: str
    describe: str
    layers: list[Path]
    apply_target: float
    diff_target: float | None


def _tar_writer(out: Path) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    f = open(out, "wb")  # noqa: SIM115 - closed by the returned function
    return f.write, f.close


def make_small_tar(out: Path, count: int, seed: int = 7) -> None:
    """``count`` files of 0-200 random bytes, 100 per directory, two levels deep, written
    straight as a Docker-shaped layer tar (names sorted, directories first)."""
    rng = random.Random(seed)
    write, close = _tar_writer(out)
    mtime = 1_700_000_000
    per_dir, fanout = 100, 20
    dirs = (count + per_dir - 1) // per_dir
    n = 0
    for top in range((dirs + fanout - 1) // fanout):
        write(tw.header(b"d%03d/" % top, 0o40755, 0, 0, 0, mtime, tw.DIRTYPE))
        for sub in range(fanout):
            if n >= count:
                break
            write(tw.header(b"d%03d/s%02d/" % (top, sub), 0o40755, 0, 0, 0, mtime, tw.DIRTYPE))
            for _ in range(min(per_dir, count - n)):
                data = rng.randbytes(rng.randint(0, 200))
                write(tw.header(b"d%03d/s%02d/f%06d" % (top, sub, n), 0o100644, 0, 0, len(data),
                                mtime, tw.REGTYPE))
                write(data + tw.padding(len(data)))
                n += 1
    write(tw.END_OF_ARCHIVE)
    close()


def make_big_tar(out: Path, count: int, size: int, seed: int = 8) -> None:
    """``count`` files of ``size`` random bytes (a 1 MiB random block, rotated)."""
    rng = random.Random(seed)
    block = rng.randbytes(MiB)
    write, close = _tar_writer(out)
    mtime = 1_700_000_000
    for i in range(count):
        write(tw.header(b"big%d.bin" % i, 0o100644, 0, 0, size, mtime, tw.REGTYPE))
        left, k = size, i
        while left:
            n = min(left, MiB)
            cut = (k * 4099) % MiB
            write((block[cut:] + block[:cut])[:n])
            left -= n
            k += 1
        write(tw.padding(size))
    write(tw.END_OF_ARCHIVE)
    close()


def zero_layer(total: int, files: int = 8) -> Iterator[bytes]:
    """A layer tar of ``files`` files of zeros, ``total`` bytes in all, generated."""
    each = total // files
    zeros = bytes(MiB)
    for i in range(files):
        yield tw.header(b"zero%d.bin" % i, 0o100644, 0, 0, each, 1_700_000_000, tw.REGTYPE)
        left = each
        while left:
            n = min(left, MiB)
            yield zeros[:n]
            left -= n
        yield tw.padding(each)
    yield tw.END_OF_ARCHIVE


def debian_layers(dest: Path, quick: bool) -> tuple[list[Path], str]:
    """The layer tars of bench_images.py's image (built if missing), or ([], why not)."""
    archive = OUT / "images-bench.tar"
    source_note = OUT / "images-rootfs.source"
    if quick:
        return [], "skipped in --quick"
    if not archive.exists():
        try:
            import bench_images

            archive, _ = bench_images.build_image(False)
        except Exception as e:  # no dockerd, no mirror, not root...
            return [], f"cannot build bench_images.py's image: {type(e).__name__}: {e}"
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as t:
        manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
        paths = []
        for i, member in enumerate(manifest[0]["Layers"]):
            out = dest / f"debian-layer{i}.tar"
            with t.extractfile(member) as src, open(out, "wb") as f:  # type: ignore[union-attr]
                shutil.copyfileobj(src, f, MiB)
            paths.append(out)
    source = source_note.read_text().strip() if source_note.exists() else "unknown base"
    return paths, source


def layer_stats(paths: list[Path]) -> tuple[int, int, int]:
    """(non-directories, directories, bytes of regular-file content) in the layer tars,
    read with lamina's reader (tarfile would keep every member in memory)."""
    from lamina.archive.tar.reader import DIR, REG, TarReader

    files = dirs = size = 0
    for p in paths:
        with open(p, "rb") as f:
            for e in TarReader(f):
                if e.type == DIR:
                    dirs += 1
                else:
                    files += 1
                    size += e.size if e.type == REG else 0
    return files, dirs, size


# -- timing -----------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children, user + system."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(cmd: list[str], **kw) -> None:
    res = subprocess.run(cmd, capture_output=True, env=ENV, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.decode(errors='replace').strip()}")


@dataclass
class Side:
    """One side of a comparison: its times over the runs."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def time(self, body: Callable[[], None]) -> None:
        if SYNC:
            os.sync()
        c0, t0 = cpu_seconds(), time.perf_counter()
        body()
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(cpu_seconds() - c0)

    def best(self) -> str:
        return f"{min(self.wall):7.3f} s (med {statistics.median(self.wall):.3f}, cpu {min(self.cpu):.3f})"


class Report:
    """Every figure with its target, and the summary line."""

    def __init__(self) -> None:
        self.figures: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.verdicts: list[tuple[str, bool]] = []

    def compare(self, key: str, where: str, ref_label: str, ref: Side, lam: Side,
                target: float | None) -> None:
        ratio = min(lam.wall) / max(min(ref.wall), 1e-6)
        cpu_ratio = min(lam.cpu) / max(min(ref.cpu), 1e-6)
        verdict = ""
        if target is not None:
            ok = ratio <= target
            verdict = f"  target <= {target}x: {'ok' if ok else 'OVER'}"
            self.verdicts.append((key, ok))
        print(f"    {where:<10} {ref_label} {ref.best()}  lamina {lam.best()}"
              f"  ratio {ratio:.2f}x (cpu {cpu_ratio:.2f}x){verdict}", flush=True)
        self.figures[key] = ratio
        self.cpu[key] = cpu_ratio

    def summary(self) -> str:
        heads: dict[str, float] = {}
        for key, value in self.figures.items():
            head = ".".join(key.split(".")[:2])
            heads[head] = max(heads.get(head, 0.0), value)
            heads[head + ".cpu"] = max(heads.get(head + ".cpu", 0.0), self.cpu[key])
        items = heads | self.figures
        return " ".join(f"{k}={v:.2f}x" for k, v in items.items())


# -- where the work happens ----------------------------------------------------------------------


class Places:
    """The filesystems of the two sides: ``fresh`` (a new ext4 per use) and ``store``."""

    def __init__(self, store_dir: Path, fresh: bool) -> None:
        self.store_dir = store_dir
        self.fresh = fresh
        self._n = 0

    def sides(self) -> list[str]:
        return (["fresh"] if self.fresh else []) + ["store"]

    @contextlib.contextmanager
    def place(self, side: str) -> Iterator[Path]:
        """An empty directory on that side's filesystem, removed (untimed) after."""
        if side == "fresh":
            with freshfs.fresh_fs() as mnt:
                yield mnt
            return
        self._n += 1
        d = self.store_dir / f"place{self._n}"
        d.mkdir()
        try:
            yield d
        finally:
            _remove(d)


def _remove(path: Path) -> None:
    subprocess.run(["rm", "-rf", str(path)], check=False)
    if SYNC:
        os.sync()


def default_store_dir() -> Path:
    """A new directory on the filesystem that holds the default store root."""
    from lamina.store import default_root

    base = default_root()
    while not base.exists():
        base = base.parent
    return Path(tempfile.mkdtemp(prefix="lamina-bench-", dir=base))


# -- the measurements -------------------------------------------------------------------------------


def lamina_cmd(root: Path, driver: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "--root", str(root), "--driver", driver, *args]


def alternate(runs: int, lamina_run: Callable[[], None], tar_run: Callable[[], None]) -> None:
    """Run both sides ``runs`` times, lamina first in even runs, tar first in odd ones."""
    for i in range(runs):
        for step in ((lamina_run, tar_run) if i % 2 == 0 else (tar_run, lamina_run)):
            step()


def bench_apply(ds: Dataset, places: Places, side: str, cli: bool, runs: int, driver: str,
                report: Report) -> None:
    """Apply every layer of ``ds`` on a new place of ``side`` per run, each side."""
    ref, lam = Side(), Side()

    def tar_run() -> None:
        with places.place(side) as where:
            def body() -> None:
                for k, layer in enumerate(ds.layers):
                    out = where / f"x{k}"
                    out.mkdir()
                    run(["tar", "-xf", str(layer), "-C", str(out)])
                    run(["sync", "-f", str(out)])
            ref.time(body)

    def lamina_run() -> None:
        with places.place(side) as where:
            root = where / "store"
            if cli:
                def body() -> None:
                    for k, layer in enumerate(ds.layers):
                        run(lamina_cmd(root, driver, "apply", f"l{k}", str(layer)))
                lam.time(body)
                return
            import lamina

            store = lamina.open(root, driver=driver)
            try:
                def api_body() -> None:
                    for k, layer in enumerate(ds.layers):
                        with open(layer, "rb") as f:
                            store.apply_diff(f"l{k}", None, f)
                lam.time(api_body)
            finally:
                store.close()

    alternate(runs, lamina_run, tar_run)
    report.compare(f"{ds.name}.apply.{'cli' if cli else 'api'}.{side}",
                   f"{'CLI' if cli else 'API'} {side}", "tar -xf", ref, lam, ds.apply_target)


def bench_diff(ds: Dataset, places: Places, side: str, runs: int, driver: str,
               report: Report) -> None:
    """Both paths on one applied copy of the layers (on that side's filesystem)."""
    import lamina

    with places.place(side) as where:
        root = where / "store"
        store = lamina.open(root, driver=driver)
        try:
            for k, layer in enumerate(ds.layers):
                with open(layer, "rb") as f:
                    store.apply_diff(f"l{k}", None, f)
            ids = [f"l{k}" for k in range(len(ds.layers))]
            dirs = [store.driver.layer_dir(i) for i in ids]  # type: ignore[attr-defined]
            out = where / "out.tar"
            exact = all(_diff_is_exact(store, i, layer, out) for i, layer in zip(ids, ds.layers, strict=True))
            for cli in (False, True):
                _diff_pair(ds, store, root, driver, ids, dirs, out, cli, side, runs, report)
            if not exact:
                print("    NOTE: the diff did not give back the applied tar byte for byte")
        finally:
            store.close()


def _diff_is_exact(store, layer_id: str, layer: Path, out: Path) -> bool:  # type: ignore[no-untyped-def]
    import filecmp

    with store.diff(layer_id) as s, open(out, "wb") as f:
        shutil.copyfileobj(s, f, MiB)
    same = filecmp.cmp(out, layer, shallow=False)
    out.unlink()
    return same


def _diff_pair(ds: Dataset, store, root: Path, driver: str, ids: list[str],  # type: ignore[no-untyped-def]
               dirs: list[Path], out: Path, cli: bool, side: str, runs: int, report: Report) -> None:
    ref, lam = Side(), Side()

    def tar_run() -> None:
        def body() -> None:
            for d in dirs:
                run(["tar", "-cf", str(out), "-C", str(d), "."])
                if cli:  # lamina diff -o fsyncs the file before it names it: so does this side
                    run(["sync", str(out)])
        ref.time(body)
        out.unlink()

    def lamina_run() -> None:
        def cli_body() -> None:
            for i in ids:
                run(lamina_cmd(root, driver, "diff", i, "-o", str(out)))

        def api_body() -> None:
            for i in ids:
                with store.diff(i) as s, open(out, "wb") as f:
                    shutil.copyfileobj(s, f, MiB)
        lam.time(cli_body if cli else api_body)
        out.unlink()

    alternate(runs, lamina_run, tar_run)
    report.compare(f"{ds.name}.diff.{'cli' if cli else 'api'}.{side}",
                   f"{'CLI' if cli else 'API'} {side}", "tar -cf+sync" if cli else "tar -cf", ref, lam,
                   ds.diff_target)


#: starts its arguments as a child of its own and prints the child's peak RSS (KiB) on
#: stderr. Why a launcher: a child forked from this process starts out with this
#: process's memory counted in its high-water mark (the kernel keeps it across exec), so
#: wait4 here would report the bench's size, not lamina's.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"\\nmaxrss={usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_mb(cmd: list[str], stdin_chunks: Iterator[bytes] | None = None) -> float:
    """Run ``cmd`` (feeding it ``stdin_chunks``) and return its peak RSS in MB (10^6)."""
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *cmd],
                            stdin=subprocess.PIPE if stdin_chunks is not None else None,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()))  # type: ignore[union-attr]
    reader.start()
    if stdin_chunks is not None:
        assert proc.stdin is not None
        try:
            for chunk in stdin_chunks:
                proc.stdin.write(chunk)
        finally:
            proc.stdin.close()
    proc.wait()
    reader.join()
    text = b"".join(errors).decode(errors="replace")
    if proc.returncode != 0 or "maxrss=" not in text:
        raise RuntimeError(f"{' '.join(cmd)} failed: {text}")
    return int(text.rsplit("maxrss=", 1)[1].split()[0]) * 1024 / 1e6


def bench_memory(places: Places, driver: str, big: int, small: int) -> None:
    side = places.sides()[0]
    results: dict[str, dict[int, float]] = {"apply": {}, "diff": {}}
    for size in (small, big):
        with places.place(side) as where:
            root = where / "store"
            results["apply"][size] = peak_rss_mb(lamina_cmd(root, driver, "apply", "m", "-"),
                                                 zero_layer(size))
            results["diff"][size] = peak_rss_mb(lamina_cmd(root, driver, "diff", "m", "-o", "/dev/null"))
    for op in ("apply", "diff"):
        peak, base = results[op][big], results[op][small]
        ok = peak <= MEMORY_TARGET_MB
        growth = peak - base
        flat = growth <= max(5.0, 0.05 * base)
        print(f"    {op:<6} peak RSS {peak:6.1f} MB for a {big / 1e9:.1f} GB layer"
              f" ({base:.1f} MB for {small / 1e6:.0f} MB: {'flat' if flat else 'NOT flat'},"
              f" {growth:+.1f} MB)  target <= {MEMORY_TARGET_MB} MB: {'ok' if ok else 'OVER'}",
              flush=True)


def bench_mount(places: Places, ds: Dataset, driver: str, runs: int) -> None:
    """create_rw + get of a container layer on the big layer (the store's filesystem)."""
    import lamina

    with places.place("store") as where:
        store = lamina.open(where / "store", driver=driver)
        try:
            with open(ds.layers[0], "rb") as f:
                store.apply_diff("base", None, f)
            total = []
            for i in range(runs):
                if SYNC:
                    os.sync()
                t0 = time.perf_counter()
                store.create_rw(f"rw{i}", "base")
                store.get(f"rw{i}")
                total.append(time.perf_counter() - t0)
                store.put(f"rw{i}")
                store.remove(f"rw{i}")
            print(f"  mount: create_rw + get of a container layer on the {ds.name} layer ({driver}):"
                  f" {min(total):.3f} s [median {statistics.median(total):.3f}]", flush=True)
        finally:
            store.close()


# -- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 run (a smoke run)")
    ap.add_argument("--runs", type=int, help="runs per measurement (default 3, quick 1)")
    ap.add_argument("--driver", default="vfs", help="store driver (default vfs)")
    ap.add_argument("--dir", type=Path, help="a directory on the store's filesystem (default: "
                    "beside the default store root)")
    ap.add_argument("--only", default="debian,small,big,memory",
                    help="what to measure (comma-separated: debian, small, big, memory)")
    args = ap.parse_args(argv)
    if not shutil.which("tar"):
        print("bench_archive: GNU tar is not installed; nothing to compare against")
        return 0
    global SYNC
    SYNC = not args.quick
    runs = args.runs or (1 if args.quick else 3)
    only = set(args.only.split(","))
    store_dir = Path(tempfile.mkdtemp(prefix="lamina-bench-", dir=args.dir)) if args.dir \
        else default_store_dir()
    try:
        return _run(args, runs, only, store_dir)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)


def _run(args: argparse.Namespace, runs: int, only: set[str], store_dir: Path) -> int:
    from lamina.archive import native

    places = Places(store_dir, fresh=freshfs.available())
    OUT.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src" / "lamina")],
                   env=ENV, stdout=subprocess.DEVNULL, check=False)
    inputs = store_dir / "inputs"
    inputs.mkdir()
    small_n, big_n, big_size = (300, 8, MiB // 2) if args.quick else (100_000, 8, 25 * MiB)
    mem_big, mem_small = (64 * MiB, 16 * MiB) if args.quick else (2 << 30, 200 << 20)
    speedups = "C speedups" if native.ext is not None else "pure Python (no C speedups)"
    print(f"lamina archive benchmark: {args.driver} store, {speedups}; best of {runs} runs;"
          f" sides: {', '.join(places.sides())} (store fs: {store_dir})", flush=True)
    if not places.fresh:
        print("NOTE: no fresh filesystems here (needs root, loop devices and mkfs.ext4)")
    datasets: list[Dataset] = []
    if "debian" in only:
        layers, source = debian_layers(inputs, args.quick)
        if layers:
            datasets.append(Dataset("debian", f"the {len(layers)} layers of bench_images.py's image"
                                    f" ({source})", layers, 1.1, None))
        else:
            print(f"  debian: {source}")
    if "small" in only:
        make_small_tar(inputs / "small.tar", small_n)
        datasets.append(Dataset("small", f"{small_n} files of 0-200 bytes", [inputs / "small.tar"],
                                1.2, 1.2))
    if "big" in only:
        make_big_tar(inputs / "big.tar", big_n, big_size)
        datasets.append(Dataset("big", f"{big_n} files of {big_size / MiB:g} MiB", [inputs / "big.tar"],
                                1.0, 0.7))
    report = Report()
    for ds in datasets:
        files, dirs, size = layer_stats(ds.layers)
        tar_mb = sum(p.stat().st_size for p in ds.layers) / 1e6
        print(f"  {ds.name}: {ds.describe} -- {files} files, {dirs} dirs, {size / 1e6:.1f} MB;"
              f" layer tar{'s' if len(ds.layers) > 1 else ''} {tar_mb:.1f} MB", flush=True)
        for path in ds.layers:  # both sides read the input from the page cache
            with open(path, "rb") as f:
                while f.read(16 * MiB):
                    pass
        print(f"  apply (tar -xf = tar -xf + sync -f; target <= {ds.apply_target}x)")
        for side in places.sides():
            for cli in (False, True):
                bench_apply(ds, places, side, cli, runs, args.driver, report)
        target = f"target <= {ds.diff_target}x" if ds.diff_target else "no target"
        print(f"  diff (tar -cf; the CLI against tar -cf + sync FILE; {target})")
        for side in places.sides():
            bench_diff(ds, places, side, runs, args.driver, report)
        if ds.name == "big":
            bench_mount(places, ds, args.driver, max(1, min(runs, 3)))
    if "memory" in only:
        print(f"  memory: lamina apply / lamina diff -o /dev/null of a generated layer (peak RSS;"
              f" target <= {MEMORY_TARGET_MB} MB, flat in the layer size)")
        bench_memory(places, args.driver, mem_big, mem_small)
    if report.verdicts:
        over = [k for k, ok in report.verdicts if not ok]
        print(f"targets: {len(report.verdicts) - len(over)} ok, {len(over)} OVER"
              + (f" ({', '.join(over)})" if over else ""))
    print("summary: " + report.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
