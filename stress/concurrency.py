"""Concurrency: many processes doing mixed work on one store, then a consistency check.

Each worker process loops until the deadline, picking at random among create,
create-rw, apply, mount, umount, changes, diff and rm, on a small pool of layer IDs
shared by every worker, so that they collide on purpose (one removes what another
mounts, applies on a parent another is removing, ...). ``mount`` takes a reference and
keeps it; ``umount`` releases one this worker holds (so references pile up and are put
by other code paths than the one that took them). Only the expected typed refusals are
allowed (the layer exists, is gone, is busy, has children, its parent went away);
anything else, a traceback included, is a failure.

At the deadline each worker reports the references it still holds and exits without
releasing them, like a crashed client. Then the harness checks that:

* the store's mount references per layer are exactly what the workers said they held
  (no reference lost or doubled by the races);
* ``cleanup`` releases every one of them (their processes are gone) and unmounts;
* afterwards no reference and no mount is left, and ``check`` (content hashing
  included) finds nothing wrong.

Full run: ``python -m stress.concurrency --procs 8 --seconds 60`` (``make stress``); the
test suite runs 4 processes for 10 s (tests/stress/test_stress_short.py).
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
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

#: refusals a caller must expect when others change the same layers
EXPECTED = ("LayerExists", "LayerNotFound", "ParentNotFound", "LayerBusy", "LayerHasChildren")
#: operations and their weights: umount and rm outweigh mount and the creates, so that
#: layers come and go instead of piling up mounted (where every rm would be refused)
OPS = {"create": 1, "create-rw": 1, "apply": 2, "mount": 2, "umount": 3, "changes": 1, "diff": 1,
       "rm": 3}
POOL = 6


def small_tar(seed: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(seed % 2, 20):
            data = f"{seed}:{i}\n".encode() * 10
            info = tarfile.TarInfo(f"dir{i % 3}/file{i}")
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
        if seed % 2:
            wh = tarfile.TarInfo("dir0/.wh.file0")  # hides dir0/file0 of the layers below
            tf.addfile(wh)
    return buf.getvalue()


def worker(root: Path, wid: int, deadline: float) -> dict[str, object]:
    import lamina
    from lamina.errors import LaminaError

    store = lamina.open(root)
    rng = random.Random(wid)
    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    by_op: Counter[str] = Counter()  # refusals per "op kind"
    unexpected: list[str] = []
    held: Counter[str] = Counter()  # references this worker took and has not put
    pool = [f"L{i}" for i in range(POOL)]
    while time.time() < deadline:
        op = rng.choices(list(OPS), weights=list(OPS.values()))[0]
        lid = rng.choice(pool)
        if op == "umount" and held:
            lid = rng.choice(sorted(held))
        parent = rng.choice([None, "base", "base", *pool])
        if parent == lid:
            parent = "base"
        try:
            if op == "create":
                store.create(lid, parent)
            elif op == "create-rw":
                store.create_rw(lid, parent)
            elif op == "apply":
                store.apply_diff(lid, parent, io.BytesIO(small_tar(rng.randrange(1000))))
            elif op == "mount":
                path = store.get(lid)
                held[lid] += 1
                os.listdir(path)
            elif op == "umount":
                if not held[lid]:
                    continue
                if not store.put(lid):
                    unexpected.append(f"umount {lid}: put found none of this worker's references")
                held[lid] -= 1
                if not held[lid]:
                    del held[lid]
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
            by_op[f"{op} {name}"] += 1
            if name not in EXPECTED:
                unexpected.append(f"{op} {lid}: {name}: {e}")
        except Exception as e:  # noqa: BLE001 - the harness must report anything else
            unexpected.append(f"{op} {lid}: {type(e).__name__}: {e}")
    # exit holding what is held, as a client that dies would: cleanup must release it
    store.close()  # closes handles only; references stay in the records
    return {"ops": dict(ops), "errors": dict(errors), "by_op": dict(by_op),
            "unexpected": unexpected[:20], "held": dict(held)}


@dataclass
class Result:
    procs: int
    seconds: float
    ops: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    refusals_by_op: Counter[str] = field(default_factory=Counter)
    held_at_end: int = 0
    released_by_cleanup: int = 0
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"processes: {self.procs}, seconds: {self.seconds:g}, operations done: {sum(self.ops.values())} "
                f"({', '.join(f'{k} {v}' for k, v in sorted(self.ops.items()))}); "
                f"expected refusals: {sum(self.refusals.values())} "
                f"({', '.join(f'{k} {v}' for k, v in sorted(self.refusals.items()))}); "
                f"references held at the end {self.held_at_end}, released by cleanup "
                f"{self.released_by_cleanup}; problems: {len(self.failures)}")


def run(procs: int, seconds: float, driver: str | None, *, tmpdir: str | None = "/var/tmp") -> Result:
    import lamina
    from lamina.check import check, leaked_mounts

    result = Result(procs, seconds)
    with tempfile.TemporaryDirectory(prefix="lamina-conc-", dir=tmpdir) as tmp:
        root = Path(tmp) / "store"
        store = lamina.open(root, driver=driver)
        try:
            store.apply_diff("base", None, io.BytesIO(small_tar(0)))
            deadline = time.time() + seconds
            env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + str(REPO))
            workers = [
                subprocess.Popen([sys.executable, "-m", "stress.concurrency", "--worker", str(i),
                                  "--root", str(root), "--deadline", str(deadline)],
                                 env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for i in range(procs)
            ]
            held: Counter[str] = Counter()
            for p in workers:
                out, err = p.communicate(timeout=seconds + 300)
                if p.returncode != 0:
                    tail = err.decode(errors="replace").strip().splitlines()[-3:]
                    result.failures.append(f"worker exited {p.returncode}: {' | '.join(tail)}")
                    continue
                r = json.loads(out.decode().strip().splitlines()[-1])
                result.ops.update(r["ops"])
                result.refusals.update(r["errors"])
                result.refusals_by_op.update(r["by_op"])
                result.failures += r["unexpected"]
                held.update(r["held"])
            result.held_at_end = sum(held.values())
            with store.records.read() as db:
                refs = Counter(r.layer for r in db.refs())
            if refs != held:
                result.failures.append(f"mount references in the store {dict(refs)} are not what the "
                                       f"workers held {dict(held)}")
            for rec in store.layers():
                if rec.mount_count != held[rec.id]:
                    result.failures.append(f"layer {rec.id}: mount count {rec.mount_count}, "
                                           f"workers held {held[rec.id]}")
            mended = store.cleanup()
            result.released_by_cleanup = sum("released a mount reference" in m for m in mended)
            with store.records.read() as db:
                left = len(db.refs())
                mounts = len(db.mounts())
            if left or mounts:
                result.failures.append(f"after cleanup: {left} reference(s), {mounts} mount record(s) left")
            problems, _ = check(store)
            result.failures += [f"check: {p}" for p in problems]
            own = {os.path.realpath(p) for p in store.driver.own_mounts()}
            result.failures += [f"leaked mount {m}" for m in leaked_mounts(root) if m not in own]
        finally:
            store.cleanup(unmount_all=True)
            store.close()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--driver", default=None)
    ap.add_argument("-v", "--verbose", action="store_true", help="refusals per operation")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.root, args.worker, args.deadline)))
        return 0
    result = run(args.procs, args.seconds, args.driver)
    print(result.line())
    if args.verbose:
        print("refusals by operation: " + ", ".join(f"{k} {v}" for k, v in result.refusals_by_op.most_common()))
    for f in result.failures[:20]:
        print("  " + f)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
