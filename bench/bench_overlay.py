"""The overlay driver against vfs, in the same run, on the same disk.

Three measurements, each the median of several runs (the best is shown beside it):

* changes: ``store.changes(ctr)`` of a container layer with 10 changed files (4
  modified, 3 added, 3 deleted) over a 10,000-file image. vfs compares the whole
  container tree with the whole image tree; overlay reads its upper directory and looks
  up only those names below. Target: overlay >= 50x faster.
* create-rw + mount: ``store.create_rw(ctr, image)`` then ``store.get(ctr)`` on a
  200 MB image (8 files of 25 MiB). vfs copies the image; overlay makes two directories
  and mounts. Target: overlay <= 50 ms median.
* deep mount: ``store.get(top)`` of a chain of 500 layers (one file each); overlay
  mounts 499 lower directories with fsconfig ``lowerdir+``. Target: overlay <= 200 ms
  median. vfs is left out here: it has nothing to mount (each layer is a full copy,
  paid at create, and building its 500 copies takes minutes).

    python bench/bench_overlay.py [--quick] [--runs N] [--dir DIR]

Needs root and overlayfs (otherwise it says so and exits 0). ``--quick`` uses small
sizes (a few seconds; its numbers mean little).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import lamina  # noqa: E402
from lamina.drivers.registry import unavailable_reason  # noqa: E402

MiB = 1 << 20
DRIVERS = ("overlay", "vfs")


class Row:
    """Run times of one driver for one measurement."""

    def __init__(self, driver: str, times: list[float]) -> None:
        self.driver = driver
        self.times = times

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def line(self) -> str:
        return (f"    {self.driver:<8} median {self.median * 1000:9.2f} ms"
                f"   [best {min(self.times) * 1000:.2f} ms, {len(self.times)} runs]")


def timed(runs: int, body: Callable[[int], None], setup: Callable[[int], None] = lambda i: None,
          teardown: Callable[[int], None] = lambda i: None) -> list[float]:
    times = []
    for i in range(runs):
        setup(i)
        t0 = time.perf_counter()
        body(i)
        times.append(time.perf_counter() - t0)
        teardown(i)
    return times


def verdict(ok: bool) -> str:
    return "ok" if ok else "OVER"


# -- layer tars ------------------------------------------------------------------------


def many_files_tar(count: int) -> bytes:
    """``count`` small files, 100 per directory (an image's /usr in miniature)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(count):
            if i % 100 == 0:
                d = tarfile.TarInfo(f"dir{i // 100:03d}")
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tf.addfile(d)
            data = (f"file {i}\n" * (1 + i % 40)).encode()
            info = tarfile.TarInfo(f"dir{i // 100:03d}/f{i:05d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def big_files_tar(path: Path, count: int, size: int) -> None:
    block = os.urandom(MiB)
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(count):
            info = tarfile.TarInfo(f"big{i}.bin")
            info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
            tf.addfile(info, _Repeat(block, size))


class _Repeat(io.RawIOBase):
    """``size`` bytes made of one block repeated, without holding them in memory."""

    def __init__(self, block: bytes, size: int) -> None:
        self.block, self.left = block, size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = min(len(b), self.left, len(self.block))
        b[:n] = self.block[:n]
        self.left -= n
        return n


# -- the measurements ------------------------------------------------------------------


def bench_changes(stores: dict[str, lamina.store.Store], files: int, runs: int) -> dict[str, Row]:
    tar = many_files_tar(files)
    rows = {}
    for name, store in stores.items():
        store.apply_diff("img", None, io.BytesIO(tar))
        store.create_rw("ctr", "img")
        with store.mounted("ctr") as view:
            for i in (0, 101, 202, 303):  # modified
                (view / f"dir{i // 100:03d}/f{i:05d}").write_text("changed\n")
            for i in range(3):  # added
                (view / f"dir00{i}/new{i}").write_text("new\n")
            for i in (404, 505, 606):  # deleted
                (view / f"dir{i // 100:03d}/f{i:05d}").unlink()
        got = store.changes("ctr")
        rows[name] = Row(name, timed(runs, lambda i, s=store: s.changes("ctr")))
        print(rows[name].line() + f"   ({len(got)} changes)")
    return rows


def bench_create_mount(stores: dict[str, lamina.store.Store], work: Path, count: int, size: int,
                       runs: dict[str, int]) -> dict[str, Row]:
    tar_path = work / "big.tar"
    big_files_tar(tar_path, count, size)
    rows = {}
    for name, store in stores.items():
        with open(tar_path, "rb") as f:
            store.apply_diff("big", None, f)
        os.sync()

        def body(i: int, s: lamina.store.Store = store) -> None:
            s.create_rw(f"c{i}", "big")
            s.get(f"c{i}")

        def teardown(i: int, s: lamina.store.Store = store) -> None:
            s.put(f"c{i}")
            s.remove(f"c{i}")
            os.sync()

        rows[name] = Row(name, timed(runs[name], body, teardown=teardown))
        print(rows[name].line())
    tar_path.unlink()
    return rows


def bench_deep_mount(stores: dict[str, lamina.store.Store], depth: int, runs: int) -> dict[str, Row]:
    rows = {}
    for name, store in stores.items():
        t0 = time.perf_counter()
        parent = None
        for i in range(depth):
            layer = f"deep{i:03d}"
            tar = io.BytesIO()
            with tarfile.open(fileobj=tar, mode="w") as tf:
                data = layer.encode()
                info = tarfile.TarInfo(f"layer-{i:03d}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            tar.seek(0)
            store.apply_diff(layer, parent, tar)
            parent = layer
        built = time.perf_counter() - t0
        top = parent
        assert top is not None

        def body(i: int, s: lamina.store.Store = store, top: str = top) -> None:
            view = s.get(top)
            assert (view / "layer-000").read_bytes() == b"deep000"

        def teardown(i: int, s: lamina.store.Store = store, top: str = top) -> None:
            s.put(top)

        rows[name] = Row(name, timed(runs, body, teardown=teardown))
        print(rows[name].line() + f"   (building the chain took {built:.1f} s)")
    return rows


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few runs (a smoke run)")
    ap.add_argument("--runs", type=int, help="runs per measurement (default 7, quick 3)")
    ap.add_argument("--dir", type=Path, help="work directory on a real disk (default: a temp dir)")
    args = ap.parse_args(argv)
    runs = args.runs or (3 if args.quick else 7)
    files, big_n, big_size, depth = (1000, 4, MiB, 50) if args.quick else (10_000, 8, 25 * MiB, 500)

    work = Path(tempfile.mkdtemp(prefix="lamina-bench-overlay-", dir=args.dir))
    try:
        reason = unavailable_reason("overlay", work / "probe")
        if reason:
            print(f"bench_overlay: overlay unavailable here ({reason}); nothing to compare")
            return 0
        print(f"lamina overlay benchmark in {work}: overlay vs vfs, median of {runs} runs")
        summary: list[str] = []

        def fresh() -> dict[str, lamina.store.Store]:
            return {name: lamina.open(work / f"{name}-{time.monotonic_ns()}", driver=name)
                    for name in DRIVERS}

        print(f"  changes: 10 changed files over a {files}-file image")
        stores = fresh()
        rows = bench_changes(stores, files, runs)
        speedup = rows["vfs"].median / rows["overlay"].median
        print(f"    overlay is {speedup:.0f}x faster (target >= 50x: {verdict(speedup >= 50)})")
        summary.append(f"changes_speedup={speedup:.0f}x")
        _close(stores)

        print(f"  create-rw + mount on a {big_n * big_size / 1e6:.0f} MB image")
        stores = fresh()
        rows = bench_create_mount(stores, work, big_n, big_size,
                                  {"overlay": runs, "vfs": max(1, min(runs, 3))})
        ms = rows["overlay"].median * 1000
        print(f"    overlay median {ms:.1f} ms (target <= 50 ms: {verdict(ms <= 50)});"
              f" {rows['vfs'].median / rows['overlay'].median:.0f}x faster than vfs")
        summary.append(f"create_mount_ms={ms:.1f}")
        _close(stores)

        print(f"  mount a chain of {depth} layers")
        stores = fresh()
        _close({"vfs": stores.pop("vfs")})
        rows = bench_deep_mount(stores, depth, runs)
        ms = rows["overlay"].median * 1000
        print(f"    overlay median {ms:.1f} ms (target <= 200 ms: {verdict(ms <= 200)});"
              " vfs left out: it mounts nothing and pays a full copy per layer at create")
        summary.append(f"deep_mount_ms={ms:.1f}")
        _close(stores)
        print("summary: " + " ".join(summary))
    finally:
        _remove_work(work)
    return 0


def _close(stores: dict[str, lamina.store.Store]) -> None:
    for store in stores.values():
        store.cleanup(unmount_all=True)
        store.close()


def _remove_work(work: Path) -> None:
    from lamina.fs.mount import mounts_under, umount

    for point in mounts_under(work):
        umount(point)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
