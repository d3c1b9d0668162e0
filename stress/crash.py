"""Crash injection: SIGKILL lamina in the middle of its work, then prove nothing was lost.

For each operation (apply, create-rw, rm, image load, the plugin's ApplyDiff where
those faces exist) the harness first times one undisturbed run, then starts the
operation again and again, killing it at points spread evenly over that duration (plus
a little past it). After every kill it runs ``lamina cleanup`` and ``check`` and asserts:

* no half-made layer is visible: the target layer either does not exist, or exists and
  its content matches its DiffID;
* no mount is leaked under the store root;
* every layer that was complete before the kill is still complete and intact.

Run ``python -m stress.crash --points 200`` for the full run (``make stress``); the test
suite runs a short version.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def lamina_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lamina", "--root", str(root), *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def make_layer_tar(path: Path, files: int, size: int, seed: int) -> None:
    """A layer tar of ``files`` files of ``size`` bytes in nested dirs, plus a whiteout."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(max(1, files // 50)):
            info = tarfile.TarInfo(f"d{d}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tf.addfile(info)
        for i in range(files):
            data = (f"{seed}-{i}-".encode() * (size // 8 + 1))[:size]
            info = tarfile.TarInfo(f"d{i % max(1, files // 50)}/f{i}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
        wh = tarfile.TarInfo(".wh.gone")
        tf.addfile(wh)


@dataclass
class Tally:
    kills: int = 0
    completed_anyway: int = 0
    dropped: int = 0
    failures: list[str] = field(default_factory=list)


def run_cleanup_and_check(root: Path, target: str, before: set[str], tally: Tally, what: str) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from lamina import open as lamina_open
    from lamina.check import check, leaked_mounts

    cl = subprocess.run(lamina_cmd(root, "cleanup"), env=env(), capture_output=True)
    if cl.returncode != 0:
        tally.failures.append(f"{what}: cleanup failed: {cl.stderr.decode().strip()}")
        return
    if b"dropped" in cl.stdout or b"finished removing" in cl.stdout:
        tally.dropped += 1
    store = lamina_open(root)
    try:
        problems, _ = check(store)
        for p in problems:
            tally.failures.append(f"{what}: check after cleanup: {p}")
        ids = {r.id for r in store.layers()}
        lost = before - ids - {target}
        if lost:
            tally.failures.append(f"{what}: complete layers lost: {sorted(lost)}")
        leaks = leaked_mounts(root)
        own = {os.path.realpath(p) for p in store.driver.own_mounts()}
        leaks = [m for m in leaks if m not in own]
        if leaks:
            tally.failures.append(f"{what}: leaked mounts {leaks}")
    finally:
        store.close()


def kill_at(cmd: list[str], delay: float, stdin_path: Path | None = None) -> int:
    """Start ``cmd``, SIGKILL it after ``delay`` seconds; return its exit status."""
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(cmd, env=env(), stdin=stdin, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        return proc.returncode
    finally:
        if stdin_path:
            stdin.close()  # type: ignore[union-attr]


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env(), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def crash_operation(name: str, root: Path, points: int, prepare: Callable[[int], tuple[list[str], str]],
                    tally: Tally) -> None:
    """Kill the command that ``prepare(i)`` returns at ``points`` moments over its run."""
    cmd0, target0 = prepare(-1)
    duration = timed(cmd0)
    for i in range(points):
        cmd, target = prepare(i)
        before = _complete_layers(root)
        delay = duration * 1.2 * (i + 0.5) / points
        rc = kill_at(cmd, delay)
        tally.kills += 1
        if rc == 0:
            tally.completed_anyway += 1
        run_cleanup_and_check(root, target, before, tally, f"{name} killed at {delay * 1000:.0f} ms")


def _complete_layers(root: Path) -> set[str]:
    out = subprocess.run(lamina_cmd(root, "--json", "ls"), env=env(), capture_output=True, check=True)
    import json

    return {item["id"] for item in json.loads(out.stdout)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=200, help="kill points per operation")
    ap.add_argument("--files", type=int, default=2000, help="files in the layer tar")
    ap.add_argument("--driver", default=None)
    ap.add_argument("--ops", default="apply,create-rw,rm", help="operations to crash")
    args = ap.parse_args(argv)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="lamina-crash-", dir="/var/tmp") as tmp:
        t = Path(tmp)
        root = t / "store"
        tar = t / "layer.tar"
        make_layer_tar(tar, args.files, 512, seed=1)
        base_args = ["--driver", args.driver] if args.driver else []
        subprocess.run(lamina_cmd(root, *base_args, "apply", "base", str(tar)), env=env(), check=True,
                       stdout=subprocess.DEVNULL)
        ops = args.ops.split(",")
        if "apply" in ops:
            crash_operation("apply", root, args.points,
                            lambda i: (lamina_cmd(root, "apply", f"a{i + 1}", "--parent", "base", str(tar)), f"a{i + 1}"),
                            tally)
        if "create-rw" in ops:
            crash_operation("create-rw", root, args.points,
                            lambda i: (lamina_cmd(root, "create-rw", f"c{i + 1}", "--parent", "base"), f"c{i + 1}"),
                            tally)
        if "rm" in ops:
            def prep_rm(i: int) -> tuple[list[str], str]:
                lid = f"r{i + 1}"
                subprocess.run(lamina_cmd(root, "apply", lid, "--parent", "base", str(tar)), env=env(),
                               check=True, stdout=subprocess.DEVNULL)
                return lamina_cmd(root, "rm", lid), lid
            crash_operation("rm", root, args.points, prep_rm, tally)
    print(f"kills: {tally.kills}, finished before the kill: {tally.completed_anyway}, "
          f"half-made layers dropped by cleanup: {tally.dropped}, problems: {len(tally.failures)}")
    for f in tally.failures[:20]:
        print("  " + f)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
