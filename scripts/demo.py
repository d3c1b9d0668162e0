#!/usr/bin/env python3
"""The main job of lamina, end to end, on the embedded default driver.

It builds a small image of its own (two layers; the second deletes a file with a
whiteout and replaces a directory with an opaque one), applies the layers, puts a
container layer on top, mounts it, writes and deletes files, prints the changes,
exports the container's diff, applies that diff as a new layer in a second store, and
checks that the two views are equal. It also checks that exporting an imported layer
gives back the exact bytes it was imported from (the same DiffID).

Runs unprivileged (the default is then vfs) and as root (overlay). Exit status 0 only
if every check holds.

    python scripts/demo.py [--driver NAME] [--tmp DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import time
from pathlib import Path

try:
    import lamina
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import lamina

from lamina.errors import LaminaError

MTIME = 1_700_000_000  # fixed, so the example tars are byte-for-byte reproducible


# -- building the example image --------------------------------------------------------


def _tar(entries: list[tuple[str, str, bytes | str | None, int]]) -> bytes:
    """A layer tar from (name, type, data, mode) tuples.

    type: d directory, l symlink (data = target), f regular file, w whiteout marker
    (an empty regular file whose name says what it deletes).
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            info.mode = mode
            info.uname = info.gname = "root"
            if kind == "d":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "l":
                info.type = tarfile.SYMTYPE
                info.linkname = str(data)
                tar.addfile(info)
            else:  # "f" or "w"
                body = data.encode() if isinstance(data, str) else (data or b"")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def base_layer() -> bytes:
    return _tar([
        ("etc", "d", None, 0o755),
        ("etc/os-release", "f", 'NAME="Lamina Demo"\nVERSION_ID="1"\n', 0o644),
        ("etc/motd", "f", "welcome to the base layer\n", 0o644),
        ("bin", "d", None, 0o755),
        ("bin/hello", "f", "#!/bin/sh\necho hello from lamina\n", 0o755),
        ("bin/hi", "l", "hello", 0o777),
        ("var", "d", None, 0o755),
        ("var/cache", "d", None, 0o755),
        ("var/cache/old-1.bin", "f", b"\x00" * 4096, 0o644),
        ("var/cache/old-2.bin", "f", b"stale\n" * 100, 0o644),
        ("app", "d", None, 0o755),
        ("app/config.ini", "f", "[app]\nmode = base\n", 0o640),
    ])


def app_layer() -> bytes:
    return _tar([
        ("etc", "d", None, 0o755),
        ("etc/.wh.motd", "w", None, 0o644),                   # delete /etc/motd
        ("var", "d", None, 0o755),
        ("var/cache", "d", None, 0o755),
        ("var/cache/.wh..wh..opq", "w", None, 0o644),         # hide all of the old cache
        ("var/cache/fresh.txt", "f", "new cache\n", 0o644),
        ("app", "d", None, 0o755),
        ("app/config.ini", "f", "[app]\nmode = production\n", 0o640),
        ("app/main.py", "f", "print('the app')\n", 0o644),
    ])


# -- comparing two views -----------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """What a view shows, path by path: type, permissions, owner, content or target.

    Timestamps are left out on purpose: directory mtimes move as entries are applied.
    """
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            rel = "/" + str(p.relative_to(root))
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                out[rel] = ("file", mode, st.st_uid, st.st_gid, st.st_size, body)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", st.st_uid, st.st_gid, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, st.st_uid, st.st_gid)
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode), mode, st.st_rdev)
    return out


def compare(a: dict[str, tuple], b: dict[str, tuple]) -> list[str]:
    problems = []
    for path in sorted(set(a) | set(b)):
        if path not in b:
            problems.append(f"only in the container's view: {path}")
        elif path not in a:
            problems.append(f"only in the copy: {path}")
        elif a[path] != b[path]:
            problems.append(f"differs: {path}: {a[path]} != {b[path]}")
    return problems


# -- the story ---------------------------------------------------------------------------


class Steps:
    def __init__(self) -> None:
        self.n = 0
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        self.n += 1
        print(f"\n[{self.n}] {text}", flush=True)

    @staticmethod
    def say(text: str) -> None:
        print(f"    {text}", flush=True)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def run(work: Path, driver: str | None) -> int:
    step = Steps()
    say = step.say
    failures: list[str] = []

    step("build an example image of two layers")
    base, app = base_layer(), app_layer()
    say(f"base: {len(base):6d} bytes  {sha256(base)[:19]}…  /etc, /bin, /var/cache, /app")
    say(f"app:  {len(app):6d} bytes  {sha256(app)[:19]}…  deletes /etc/motd (whiteout),")
    say("                                        replaces /var/cache (opaque dir), edits /app")

    store = lamina.open(root=work / "store", driver=driver)
    step(f"open a store at {store.root} (driver: {store.driver.name})")

    step("apply the image's layers")
    say(f"demo-base: {store.apply_diff('demo-base', None, io.BytesIO(base))} bytes of content")
    say(f"demo-app:  {store.apply_diff('demo-app', 'demo-base', io.BytesIO(app))} bytes of content"
        " (parent demo-base)")

    step("create a container layer on top and mount it")
    store.create_rw("demo-ctr", "demo-app")
    with store.mounted("demo-ctr") as view:
        say(f"view at {view}")
        motd_gone = not (view / "etc/motd").exists()
        cache = sorted(p.name for p in (view / "var/cache").iterdir())
        say(f"/etc/motd hidden by the whiteout: {motd_gone}; /var/cache holds {cache}")
        if not motd_gone or cache != ["fresh.txt"]:
            failures.append("the image's whiteouts are not honoured in the view")

        step("write and delete files in the container")
        (view / "app/data").mkdir()
        (view / "app/data/state.json").write_text('{"visits": 1}\n')
        (view / "etc/os-release").write_text('NAME="Lamina Demo"\nVERSION_ID="2"\n')
        (view / "app/main.py").unlink()
        shutil.rmtree(view / "var/cache")
        (view / "bin/hi").unlink()
        os.symlink("/bin/hello", view / "bin/greet")
        say("added /app/data/state.json and /bin/greet, edited /etc/os-release,")
        say("removed /app/main.py, /var/cache and /bin/hi")

        step("the container's changes (as `docker diff` prints them)")
        changes = store.changes("demo-ctr")
        for change in changes:
            say(str(change))
        want = {"A /app/data", "A /app/data/state.json", "D /app/main.py", "C /etc/os-release",
                "D /var/cache", "D /bin/hi", "A /bin/greet"}
        missing = want - {str(c) for c in changes}
        if missing:
            failures.append(f"changes lack {sorted(missing)}")
        container_view = snapshot(view)

    step("export the container's diff")
    diff_file = work / "demo-ctr.tar"
    with store.diff("demo-ctr") as stream, open(diff_file, "wb") as out:
        shutil.copyfileobj(stream, out, 1 << 20)
    exported = diff_file.read_bytes()
    say(f"{diff_file}: {len(exported)} bytes, {sha256(exported)[:19]}…")

    step("apply it as a new layer in a second store")
    other = lamina.open(root=work / "elsewhere", driver=driver)
    other.apply_diff("demo-base", None, io.BytesIO(base))
    other.apply_diff("demo-app", "demo-base", io.BytesIO(app))
    with open(diff_file, "rb") as f:
        size = other.apply_diff("demo-copy", "demo-app", f)
    say(f"{other.root}: demo-copy over demo-app, {size} bytes of content")

    step("compare the two views")
    with other.mounted("demo-copy") as copy_view:
        problems = compare(container_view, snapshot(copy_view))
    if problems:
        failures += problems
        for p in problems:
            say(p)
    else:
        say(f"equal: {len(container_view)} paths with the same type, mode, owner and content")

    step("export an imported layer again: the same bytes, the same DiffID")
    with other.diff("demo-app") as stream:
        again = stream.read()
    same = again == app
    say(f"{sha256(again)[:19]}… {'==' if same else '!='} {sha256(app)[:19]}…")
    if not same:
        failures.append("diff of demo-app is not the tar it was imported from")

    store.close()
    other.close()

    print()
    if failures:
        for f in failures:
            print(f"FAIL: {f}")
        return 1
    print(f"OK: every check held ({time.monotonic() - step.t0:.2f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--driver", default=os.environ.get("LAMINA_DRIVER") or None,
                    help="driver to use (default: the store's default: overlay where it works, else vfs)")
    ap.add_argument("--tmp", type=Path, default=None,
                    help="make the demo's scratch directory here (to try another filesystem)")
    ap.add_argument("--keep", action="store_true", help="keep the two stores afterwards")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lamina-demo-", dir=args.tmp))
    try:
        return run(work, args.driver)
    except LaminaError as e:
        print(f"\nFAIL: lamina: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            _discard(work)


def _discard(work: Path) -> None:
    """Unmount what the demo left mounted (after a failure), then delete it all.

    Unmounting comes first so that deleting can never reach through a mount.
    """
    for name in ("store", "elsewhere"):
        if (work / name / "lamina.json").exists():
            try:
                with contextlib.closing(lamina.open(root=work / name)) as s:
                    s.cleanup(unmount_all=True)
            except Exception as e:  # noqa: BLE001 - best effort; say so and go on
                print(f"note: cleanup of {work / name}: {e}", file=sys.stderr)
    from lamina.fs.mount import mounts_under, umount

    try:
        for point in mounts_under(work):
            umount(point)
    except OSError as e:
        print(f"note: {e}; leaving {work} in place", file=sys.stderr)
        return
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
