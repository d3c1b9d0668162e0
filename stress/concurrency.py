"""Concurrency: many processes doing mixed work on one store, then a consistency check.

Each worker loops until the deadline, picking at random among create-rw, apply,
mount+umount, changes, diff and rm, on a small pool of layer IDs so that workers collide
on purpose. Only the expected typed errors are allowed (the layer exists, is gone, is
busy, has children, its parent went away); anything else is a failure. At the end: no
mount references left, no leaked mounts, ``check`` finds nothing wrong.

Full run: ``python -m stress.concurrency --procs 8 --seconds 60`` (``make stress``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

EXPECTED = ("LayerExists", "LayerNotFound", "ParentNotFound", "LayerBusy", "LayerHasChildren")


def small_tar(seed: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(20):
            data = f"{seed}:{i}\n".encode() * 10
            info = tarfile.TarInfo(f"dir{i % 3}/file{i}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def worker(root: Path, wid: int, deadline: float) -> dict[str, object]:
    import lamina
    from lamina.errors import LaminaError

    store = lamina.open(root)
    rng = random.Random(wid)
    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    unexpected: list[str] = []
    pool = [f"L{i}" for i in range(6)]
    while time.time() < deadline:
        op = rng.choice(["create-rw", "apply", "mount", "changes", "diff", "rm"])
        lid = rng.choice(pool)
        parent = rng.choice([None, "base", *pool])
        if parent == lid:
            parent = "base"
        try:
            if op == "create-rw":
                store.create_rw(lid, parent)
            elif op == "apply":
                store.apply_diff(lid, parent, io.BytesIO(small_tar(rng.randrange(1000))))
            elif op == "mount":
                path = store.get(lid)
                try:
                    os.listdir(path)
                finally:
                    store.put(lid)
            elif op == "changes":
                store.changes(lid)
            elif op == "diff":
                with store.diff(lid) as f:
                    while f.read(1 << 16):
                        pass
            elif op == "rm":
                store.remove(lid)
            ops[op] += 1
        except LaminaError as e:
            name = type(e).__name__
            errors[name] += 1
            if name not in EXPECTED:
                unexpected.append(f"{op} {lid}: {name}: {e}")
        except Exception as e:  # noqa: BLE001 - the harness must report anything else
            unexpected.append(f"{op} {lid}: {type(e).__name__}: {e}")
    store.close()
    return {"ops": dict(ops), "errors": dict(errors), "unexpected": unexpected[:20]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--driver", default=None)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.root, args.worker, args.deadline)))
        return 0

    import lamina
    from lamina.check import check, leaked_mounts

    with tempfile.TemporaryDirectory(prefix="lamina-conc-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "store"
        store = lamina.open(root, driver=args.driver)
        store.apply_diff("base", None, io.BytesIO(small_tar(0)))
        store.close()
        deadline = time.time() + args.seconds
        env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + str(REPO))
        procs = [
            subprocess.Popen([sys.executable, "-m", "stress.concurrency", "--worker", str(i),
                              "--root", str(root), "--deadline", str(deadline)],
                             env=env, cwd=REPO, stdout=subprocess.PIPE)
            for i in range(args.procs)
        ]
        results = []
        failures: list[str] = []
        for p in procs:
            out, _ = p.communicate(timeout=args.seconds + 300)
            if p.returncode != 0:
                failures.append(f"worker exited {p.returncode}")
                continue
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        ops: Counter[str] = Counter()
        errs: Counter[str] = Counter()
        for r in results:
            ops.update(r["ops"])
            errs.update(r["errors"])
            failures += r["unexpected"]
        store = lamina.open(root)
        with store.records.read() as db:
            refs = db.execute("SELECT COUNT(*) FROM refs").fetchone()[0]
        if refs:
            failures.append(f"{refs} mount reference(s) left after every worker put what it got")
        problems, _ = check(store)
        failures += [f"check: {p}" for p in problems]
        own = {os.path.realpath(p) for p in store.driver.own_mounts()}
        leaks = [m for m in leaked_mounts(root) if m not in own]
        failures += [f"leaked mount {m}" for m in leaks]
        store.close()
        total = sum(ops.values())
        print(f"processes: {args.procs}, seconds: {args.seconds:g}, operations done: {total} "
              f"({', '.join(f'{k} {v}' for k, v in sorted(ops.items()))}); "
              f"expected refusals: {sum(errs.values())} ({', '.join(f'{k} {v}' for k, v in sorted(errs.items()))}); "
              f"problems: {len(failures)}")
        for f in failures[:20]:
            print("  " + f)
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
