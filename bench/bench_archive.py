"""lamina's archive engine against GNU tar on the same data, in the same run.

Two layers are generated: 10,000 small files in nested directories, and 200 MB in 8
big files. For each, every operation is timed several times and the best time is kept
(the median is shown beside it); lamina's time is printed as a ratio to GNU tar's:

* apply: ``store.apply_diff(id, None, tar)`` on a vfs store (the whole path a layer
  takes: tar parsing, safe path resolution, tar-split recording, the DiffID hash and
  the store's sync) and ``apply_tar`` alone (the engine, no store), against
  ``tar -xf layer.tar`` into an empty directory. Target: <= 1.5x.
* diff: ``store.diff(id)`` of the applied layer (rebuilt from tar-split, so
  byte-identical to the tar applied) and ``tar_tree`` of the tree (what a diff of a
  layer without tar-split costs), both written to a file, against ``tar -cf``.
  Target: <= 1.5x.

It also times ``create_rw`` + ``get`` (mount) of a container layer on the 200 MB layer.

Before each timed run the previous run's output is removed and the page cache written
back (``sync``), untimed, so one run's writeback does not land in the next.

    python bench/bench_archive.py [--quick] [--runs N] [--driver vfs] [--dir DIR]

``--quick`` uses small sizes and skips the syncs (a few seconds; the test suite
smoke-runs it; its numbers mean little). If the
store cannot be imported or opened, the engine functions are timed alone and the output
says so.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import freshfs  # noqa: E402
from lamina.archive.export import tar_tree  # noqa: E402

MiB = 1 << 20
TARGET = 1.5


@dataclass
class Dataset:
    name: str
    describe: str
    make: Callable[[Path], None]


def make_small_files(root: Path, count: int, seed: int = 7) -> None:
    """``count`` files of 0-4 KiB, 20 per directory, two directory levels deep."""
    rng = random.Random(seed)
    for i in range(count):
        d = root / f"d{i % 20:02d}" / f"s{(i // 20) % 25:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.txt").write_bytes(rng.randbytes(rng.randint(0, 4096)))


def make_big_files(root: Path, count: int, size: int, seed: int = 8) -> None:
    """``count`` files of ``size`` bytes each (random 1 MiB blocks, rotated per block)."""
    rng = random.Random(seed)
    block = rng.randbytes(MiB)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with open(root / f"big{i}.bin", "wb") as f:
            left = size
            k = i
            while left:
                n = min(left, MiB)
                cut = (k * 4099) % MiB
                f.write((block[cut:] + block[:cut])[:n])
                left -= n
                k += 1


def tree_stats(root: Path) -> tuple[int, int, int]:
    files = dirs = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirs += len(dirnames)
        files += len(filenames)
        size += sum(os.lstat(os.path.join(dirpath, n)).st_size for n in filenames)
    return files, dirs, size


# -- timing -------------------------------------------------------------------------


#: write back dirty pages before each timed run (off in --quick: a smoke run on a busy
#: machine should not wait for everyone else's writeback)
SYNC = True


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (GNU tar), user + system."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_timed(runs: int, setup: Callable[[int], None], body: Callable[[int], None],
              teardown: Callable[[int], None]) -> tuple[list[float], list[float]]:
    """Time ``body(i)`` for each run, wall clock and CPU; setup/teardown (and a sync)
    are not timed."""
    wall, cpu = [], []
    for i in range(runs):
        setup(i)
        if SYNC:
            os.sync()
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        body(i)
        wall.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
        teardown(i)
    return wall, cpu


def rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_chunks(chunks, out: Path) -> None:
    with open(out, "wb") as f:
        for c in chunks:
            f.write(c)


def copy_stream(stream, out: Path) -> None:
    with stream, open(out, "wb") as f:
        shutil.copyfileobj(stream, f, MiB)


class Row:
    """One line of the report: a label and its run times (wall clock and CPU)."""

    def __init__(self, label: str, timed: tuple[list[float], list[float]]) -> None:
        self.label = label
        self.times, self.cpu_times = timed

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def best_cpu(self) -> float:
        return min(self.cpu_times)

    def cpu_ratio(self, base: Row) -> float:
        return self.best_cpu / max(base.best_cpu, 1e-6)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def line(self, base: Row | None = None, target: float | None = None) -> str:
        s = f"    {self.label:<22} {self.best:8.3f} s  [median {self.median:.3f}, cpu {self.best_cpu:.3f}]"
        if base is not None:
            r = self.best / base.best
            s += f"   ratio {r:.2f}x (cpu {self.cpu_ratio(base):.2f}x)"
            if target is not None:
                s += f" target <= {target}x: {'ok' if r <= target else 'OVER'}"
        return s


# -- the lamina side ------------------------------------------------------------------


class Lamina:
    """The store when it can be opened, else the engine functions alone."""

    def __init__(self, work: Path, driver: str) -> None:
        self.work = work
        self.store = None
        self.note = ""
        try:
            import lamina

            self.store = lamina.open(work / "store", driver=driver)
            self.driver = self.store.driver.name
        except Exception as e:  # the bench must still say something useful
            self.note = f"store unavailable ({type(e).__name__}: {e}); timing apply_tar/tar_tree directly"
        try:
            from lamina.archive.apply import apply_tar

            self.apply_tar = apply_tar
        except Exception as e:
            self.apply_tar = None
            self.note += f"; apply engine unavailable ({type(e).__name__}: {e})"


def bench_dataset(ds: Dataset, lam: Lamina, work: Path, runs: int) -> dict[str, float]:
    base = work / ds.name
    tree = base / "tree"
    ds.make(tree)
    layer_tar = base / "layer.tar"
    write_chunks(tar_tree(tree), layer_tar)
    files, dirs, size = tree_stats(tree)
    print(f"  {ds.name}: {ds.describe} -- {files} files, {dirs} dirs, {size / 1e6:.1f} MB;"
          f" layer tar {layer_tar.stat().st_size / 1e6:.1f} MB")
    ratios: dict[str, float] = {}
    scratch = base / "out"

    def fresh_dir(i: int) -> None:
        rm(scratch)
        scratch.mkdir()

    def clear(i: int) -> None:
        rm(scratch)

    # apply
    print("  apply")
    gnu_x = Row("tar -xf", run_timed(
        runs, fresh_dir,
        lambda i: subprocess.run(["tar", "-xf", str(layer_tar), "-C", str(scratch)], check=True),
        clear))
    print(gnu_x.line())
    applied: str | None = None
    if lam.store is not None:
        ids = [f"{ds.name}-{i}" for i in range(runs)]

        def store_apply(i: int) -> None:
            with open(layer_tar, "rb") as f:
                lam.store.apply_diff(ids[i], None, f)

        def drop_layer(i: int) -> None:
            if i < runs - 1:
                lam.store.remove(ids[i])

        row = Row("store.apply_diff", run_timed(runs, lambda i: None, store_apply, drop_layer))
        print(row.line(gnu_x, TARGET))
        ratios[f"{ds.name}.apply"] = row.best / gnu_x.best
        ratios[f"{ds.name}.apply.cpu"] = row.cpu_ratio(gnu_x)
        applied = ids[-1]
    if lam.apply_tar is not None:
        def engine_apply(i: int) -> None:
            with open(layer_tar, "rb") as f:
                lam.apply_tar(scratch, f)

        row = Row("apply_tar (engine)", run_timed(runs, fresh_dir, engine_apply, clear))
        print(row.line(gnu_x, TARGET if lam.store is None else None))
        ratios.setdefault(f"{ds.name}.apply", row.best / gnu_x.best)
        ratios.setdefault(f"{ds.name}.apply.cpu", row.cpu_ratio(gnu_x))

    # diff
    print("  diff")
    out = base / "out.tar"
    gnu_c = Row("tar -cf", run_timed(
        runs, lambda i: rm(out),
        lambda i: subprocess.run(["tar", "-cf", str(out), "-C", str(tree), "."], check=True),
        lambda i: rm(out)))
    print(gnu_c.line())
    if lam.store is not None and applied is not None:
        row = Row("store.diff", run_timed(
            runs, lambda i: rm(out), lambda i: copy_stream(lam.store.diff(applied), out),
            lambda i: None))
        print(row.line(gnu_c, TARGET))
        ratios[f"{ds.name}.diff"] = row.best / gnu_c.best
        ratios[f"{ds.name}.diff.cpu"] = row.cpu_ratio(gnu_c)
        if not filecmp.cmp(out, layer_tar, shallow=False):
            print("    NOTE: store.diff did not give back the applied tar byte for byte")
        rm(out)
    row = Row("tar_tree (engine)", run_timed(
        runs, lambda i: rm(out), lambda i: write_chunks(tar_tree(tree), out), lambda i: rm(out)))
    print(row.line(gnu_c, TARGET if lam.store is None else None))
    ratios.setdefault(f"{ds.name}.diff", row.best / gnu_c.best)
    ratios.setdefault(f"{ds.name}.diff.cpu", row.cpu_ratio(gnu_c))
    rm(tree)
    return ratios | ({"_layer": applied} if applied else {})  # type: ignore[dict-item]


def bench_mount(lam: Lamina, layer_id: str, runs: int) -> None:
    store = lam.store
    create_t, get_t = [], []
    for i in range(runs):
        rw = f"rw-{i}"
        if SYNC:
            os.sync()
        t0 = time.perf_counter()
        store.create_rw(rw, layer_id)
        t1 = time.perf_counter()
        store.get(rw)
        t2 = time.perf_counter()
        create_t.append(t1 - t0)
        get_t.append(t2 - t1)
        store.put(rw)
        store.remove(rw)
    total = [a + b for a, b in zip(create_t, get_t, strict=True)]
    print(f"  create_rw {min(create_t):.3f} s + get {min(get_t):.3f} s"
          f" = {min(total):.3f} s  [median {statistics.median(total):.3f}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 runs (a smoke run)")
    ap.add_argument("--runs", type=int, help="runs per measurement (default 5, quick 2)")
    ap.add_argument("--driver", default="vfs", help="store driver (default vfs)")
    ap.add_argument("--dir", type=Path, help="work directory (default: a freshly made ext4 "
                    "filesystem as root, else a new temp dir)")
    args = ap.parse_args(argv)
    if not shutil.which("tar"):
        print("bench_archive: GNU tar is not installed; nothing to compare against")
        return 0
    runs = args.runs or (2 if args.quick else 5)
    global SYNC
    SYNC = not args.quick
    small_n, big_n, big_size = (300, 8, MiB // 2) if args.quick else (10_000, 8, 25 * MiB)
    datasets = [
        Dataset("small", f"{small_n} small files in nested dirs",
                lambda root: make_small_files(root, small_n)),
        Dataset("big", f"{big_n} files of {big_size / MiB:g} MiB",
                lambda root: make_big_files(root, big_n, big_size)),
    ]
    with contextlib.ExitStack() as stack:
        parent = args.dir
        if parent is None and freshfs.available():
            parent = stack.enter_context(freshfs.fresh_fs())  # see bench/freshfs.py: why
        return _run(args, runs, datasets, parent, big_n, big_size)


def _run(args: argparse.Namespace, runs: int, datasets: list[Dataset], parent: Path | None,
         big_n: int, big_size: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="lamina-bench-", dir=parent))
    try:
        lam = Lamina(work, args.driver)
        where = f"{lam.driver} store" if lam.store is not None else "engine only"
        print(f"lamina archive benchmark: {where} in {work}; best of {runs} runs")
        if lam.note:
            print(f"NOTE: {lam.note}")
        summary: dict[str, float] = {}
        big_layer = None
        for ds in datasets:
            r = bench_dataset(ds, lam, work, runs)
            if ds.name == "big":
                big_layer = r.pop("_layer", None)
            else:
                r.pop("_layer", None)
            summary |= r
        if lam.store is not None and big_layer is not None:
            print(f"  mount: a container layer on the {big_n * big_size / MiB:g} MiB layer ({lam.driver})")
            bench_mount(lam, str(big_layer), max(1, min(runs, 3)))
        print("summary: " + " ".join(f"{k}={v:.2f}x" for k, v in summary.items()))
        if lam.store is not None:
            lam.store.close()
    finally:
        _remove_work(work)
    return 0


def _remove_work(work: Path) -> None:
    """Remove the work dir; a store may have left mounts (overlay) under it."""
    try:
        from lamina.fs.mount import mounts_under, umount

        for m in sorted(mounts_under(work), reverse=True):
            umount(m)
    except Exception:
        pass
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
