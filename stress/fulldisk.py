"""Full disk: fill a small loop-mounted filesystem with layers until it is full.

A store is opened on a sparse ext4 image (64 MiB by default) mounted through a loop
device, and layers of incompressible files are applied until the filesystem says
ENOSPC. Then:

* the failure must be one clear line: a :class:`~lamina.errors.LaminaError` naming the
  layer, not an ``OSError`` escaping from wherever the disk filled (if one escapes, the
  innermost lamina frame it came from is reported);
* the failed layer must be gone: no half-made record, ``cleanup`` has nothing to do and
  ``check`` finds nothing wrong;
* the store must stay usable: a layer can be removed, a small one applied, and its diff
  read back byte for byte.

A second round does the same with inodes instead of blocks (a filesystem made with few
inodes, layers of many empty files). Needs root and loop devices; run
``python -m stress.fulldisk`` (``make stress``); tests/stress/test_fulldisk.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

MTIME = 1_700_000_000


def missing_tools() -> str | None:
    """Why this machine cannot run the harness, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices and mount)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control missing)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if not shutil.which(tool):
            return f"{tool} missing"
    return None


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


@contextlib.contextmanager
def loop_filesystem(workdir: Path, size_mib: int, *, inodes: int | None = None) -> Iterator[Path]:
    """A fresh ext4 of ``size_mib`` on a loop device, mounted; unmounted and detached on
    the way out whatever happened (lazily, if something still holds it)."""
    image = workdir / "disk.img"
    mnt = workdir / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    extra = ["-N", str(inodes)] if inodes else []
    _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0",
         *extra, str(image))
    dev = _run("losetup", "--find", "--show", str(image))
    try:
        _run("mount", "-t", "ext4", dev, str(mnt))
        try:
            yield mnt
        finally:
            _unmount_tree(mnt)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        image.unlink(missing_ok=True)


def _unmount_tree(mnt: Path) -> None:
    """Unmount everything at and under ``mnt``, deepest first."""
    real = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    points = [p.replace("\\040", " ") for p in points if p == real or p.startswith(real + "/")]
    for point in sorted(set(points), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)


def incompressible_tar(files: int, size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo(f"fill{seed}")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, MTIME
        tf.addfile(d)
        for i in range(files):
            data = rng.randbytes(size)
            info = tarfile.TarInfo(f"fill{seed}/f{i}")
            info.size, info.mode, info.mtime = size, 0o644, MTIME
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Round:
    """What one fill showed."""

    name: str
    layers_applied: int = 0
    bytes_applied: int = 0
    #: the error the full disk gave, as the user sees it
    error: str = ""
    error_kind: str = ""
    #: where an untyped error came from (innermost lamina frame), if one escaped
    escaped_from: str = ""
    #: what ``lamina apply`` printed on the full disk
    cli_error: str = ""
    #: what is wrong with the error itself (untyped, several lines, no layer named)
    error_problems: list[str] = field(default_factory=list)
    #: what is wrong with the store afterwards (partial layer, leftovers, unusable)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        where = f" (escaped from {self.escaped_from})" if self.escaped_from else ""
        return (f"{self.name}: {self.layers_applied} layers ({self.bytes_applied >> 20} MiB) applied before"
                f" the disk filled; error {self.error_kind}: {self.error}{where}; the CLI said"
                f" {self.cli_error!r}; problems with the error {len(self.error_problems)}, with the store"
                f" {len(self.problems)}")


def _innermost_lamina_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/lamina/" in f.filename]
    if not frames:
        return "outside lamina"
    f = frames[-1]
    return f"{Path(f.filename).relative_to(REPO / 'src')}:{f.lineno} ({f.name})"


def fill(store: object, rnd: Round, *, files: int, size: int, limit: int = 10_000) -> str | None:
    """Apply layers into ``store`` until one fails; return the ID of the failed one."""
    from lamina.errors import LaminaError

    for i in range(limit):
        lid = f"{rnd.name}{i}"
        tar = incompressible_tar(files, size, seed=i)
        try:
            rnd.bytes_applied += store.apply_diff(lid, None, io.BytesIO(tar))  # type: ignore[attr-defined]
            rnd.layers_applied += 1
        except LaminaError as e:
            rnd.error, rnd.error_kind = str(e), type(e).__name__
            if "\n" in rnd.error or not rnd.error:
                rnd.error_problems.append(f"the error is not one line: {rnd.error!r}")
            if lid not in rnd.error:
                rnd.error_problems.append(f"the error does not name layer {lid}: {rnd.error}")
            return lid
        except OSError as e:
            rnd.error, rnd.error_kind = str(e), type(e).__name__
            rnd.escaped_from = _innermost_lamina_frame(e)
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            rnd.error_problems.append(f"{'ENOSPC' if full else 'an OSError'} escaped as a bare {type(e).__name__}"
                                f" from {rnd.escaped_from}: {e}")
            return lid
        except Exception as e:  # noqa: BLE001 - sqlite3 and the like: report, don't die
            rnd.error, rnd.error_kind = str(e), type(e).__name__
            rnd.escaped_from = _innermost_lamina_frame(e)
            rnd.error_problems.append(f"{type(e).__name__} escaped from {rnd.escaped_from}: {e}")
            return lid
    rnd.problems.append(f"the disk never filled after {limit} layers")
    return None


def cli_apply(root: Path, tmp: Path, rnd: Round, tar: bytes) -> None:
    """``lamina apply`` into the full store: one line on stderr naming the layer, exit 1."""
    path = tmp / "cli-layer.tar"
    path.write_bytes(tar)
    lid = f"{rnd.name}-cli"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), "apply", lid, str(path)],
                          capture_output=True, text=True, env=env)
    path.unlink()
    rnd.cli_error = done.stderr.strip()
    lines = rnd.cli_error.splitlines()
    if done.returncode == 0:
        rnd.problems.append(f"lamina apply {lid} succeeded on a full disk")
    elif len(lines) != 1 or lid not in rnd.cli_error:
        rnd.error_problems.append(f"lamina apply on a full disk: the error is not one line naming {lid}: "
                            f"{rnd.cli_error!r}")


def verify_after(store: object, rnd: Round, failed: str | None) -> None:
    """No trace of the failed layer; cleanup idle; check clean; the store still works."""
    from lamina.check import check
    from lamina.store import Store

    assert isinstance(store, Store)
    with store.records.read() as db:
        half = [(r.id, r.state) for r in db.layers() if not r.complete]
    rnd.problems += [f"layer {lid} left {state} after the failed apply" for lid, state in half]
    if failed and store.exists(failed):
        rnd.problems.append(f"the failed layer {failed} exists")
    if failed and store.driver.layer_dir(failed).exists():
        rnd.problems.append(f"the failed layer's directory {store.driver.layer_dir(failed)} is left")
    left = sorted(p.name for p in (store.root / "tmp").iterdir())
    if left:
        rnd.problems.append(f"tmp/ holds {left[:5]} after the failed apply")
    mended = store.cleanup()
    if mended:
        rnd.problems.append(f"cleanup had work to do after the failed apply: {mended}")
    problems, _ = check(store)
    rnd.problems += [f"check: {p}" for p in problems]
    layers = [r.id for r in store.layers() if r.id.startswith(rnd.name)]
    if store.exists(f"{rnd.name}-cli"):
        rnd.problems.append(f"the layer {rnd.name}-cli that lamina apply failed to make exists")
    if len(layers) != rnd.layers_applied:
        rnd.problems.append(f"{len(layers)} layers of this round in the store, {rnd.layers_applied} applied")
    try:
        for lid in layers[:2]:  # free some room
            store.remove(lid)
        small = incompressible_tar(3, 1000, seed=99_999)
        store.apply_diff(f"{rnd.name}-after", None, io.BytesIO(small))
        with store.diff(f"{rnd.name}-after") as f:
            if f.read() != small:
                rnd.problems.append("the layer applied after the fill does not diff back to its tar")
        with store.mounted(f"{rnd.name}-after") as path:
            (path / f"fill{99_999}" / "f0").read_bytes()
    except Exception as e:  # noqa: BLE001 - any failure here is the finding
        rnd.problems.append(f"the store is not usable after the fill: {type(e).__name__}: {e}")


def run(*, size_mib: int = 64, driver: str | None = None, tmpdir: str = "/var/tmp") -> list[Round]:
    """Both rounds (blocks, inodes) on fresh filesystems; returns their figures."""
    import lamina

    rounds = []
    for name, fs_inodes, files, size in (("blocks", None, 8, 512 << 10), ("inodes", 1024, 300, 0)):
        rnd = Round(name)
        with tempfile.TemporaryDirectory(prefix="lamina-full-", dir=tmpdir) as tmp, \
                loop_filesystem(Path(tmp), size_mib, inodes=fs_inodes) as mnt:
            store = lamina.open(mnt / "store", driver=driver)
            try:
                failed = fill(store, rnd, files=files, size=size)
                if failed:  # the disk is still full: what does a user of the CLI see?
                    cli_apply(store.root, Path(tmp), rnd, incompressible_tar(files, size, seed=7_777))
                verify_after(store, rnd, failed)
            finally:
                with contextlib.suppress(Exception):
                    store.cleanup(unmount_all=True)
                store.close()
        rounds.append(rnd)
    return rounds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=64, help="filesystem size in MiB (default 64)")
    ap.add_argument("--driver", default=None)
    args = ap.parse_args(argv)
    reason = missing_tools()
    if reason:
        print(f"stress.fulldisk: cannot run: {reason}")
        return 2
    t = time.monotonic()
    rounds = run(size_mib=args.size, driver=args.driver)
    for rnd in rounds:
        print(rnd.line())
        for p in (rnd.error_problems + rnd.problems)[:20]:
            print("  " + p)
    count = sum(len(r.problems) + len(r.error_problems) for r in rounds)
    print(f"total: {time.monotonic() - t:.0f} s, problems {count}")
    return 1 if count else 0


if __name__ == "__main__":
    sys.exit(main())
