"""``lamina check [--repair]`` as a user runs it, against each kind of damage it knows.

For every kind: ``check`` prints exactly one ``problem:`` line for it, naming the layer
(or the path) at fault, and exits 1; ``check --repair`` mends what is marked repairable
(printing ``repaired:`` lines), never deletes a complete layer, and exits 0 only when
nothing is left; a second ``check`` then tells whether the repair really worked. The
damage is made the way a crash, a reboot or a careless hand would make it: a record left
``creating`` or ``removing``, a process that died holding a mount, a file edited inside
a layer, a directory or tar-split deleted behind the store's back.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, require_overlay, run_cli
from lamina.records import LayerState, Records, Writer

MTIME = 1_700_000_000


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Store:
    """A store made through the CLI: ``base`` and its child ``top``, both applied."""

    def __init__(self, root: Path, driver: str) -> None:
        self.root, self.driver = root, driver
        tmp = root.parent
        (tmp / "base.tar").write_bytes(layer_tar({"a.txt": b"alpha\n", "b.txt": b"bravo\n"}))
        (tmp / "top.tar").write_bytes(layer_tar({"c.txt": b"charlie\n"}))
        self.ok("apply", "base", str(tmp / "base.tar"))
        self.ok("apply", "top", "--parent", "base", str(tmp / "top.tar"))

    def __call__(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return run_cli("--driver", self.driver, *args, root=self.root)

    def ok(self, *args: str) -> str:
        r = self(*args)
        assert r.returncode == 0, f"lamina {' '.join(args)}: {r.returncode} {r.stderr.decode()}"
        return r.stdout.decode()

    def check(self, *args: str) -> tuple[int, list[str]]:
        """``lamina check``: (exit status, stdout lines); stderr must be empty."""
        r = self("check", *args)
        assert r.stderr == b"", r.stderr.decode()
        return r.returncode, r.stdout.decode().splitlines()

    @contextlib.contextmanager
    def damage(self) -> Iterator[Writer]:
        """Change the records behind the store's back, as a crash or a hand would."""
        records = Records(self.root / "meta.db")
        try:
            with records.write() as db:
                yield db
        finally:
            records.close()

    def content_file(self, layer: str, name: str) -> Path:
        """Where the driver keeps a layer's own copy of ``name``."""
        d = self.root / "layers" / layer
        return d / "diff" / name if self.driver == "overlay" else d / name


@pytest.fixture(params=["vfs", "overlay"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "overlay":
        require_overlay()
    s = Store(tmp_path / "store", request.param)
    yield s
    run_cli("--driver", s.driver, "cleanup", "--unmount-all", root=s.root)


def problems(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("problem: ")]


def test_whole_store_is_ok(store: Store) -> None:
    assert store.check() == (0, ["ok"])
    assert store.check("--repair") == (0, ["ok"])
    report = json.loads(store.ok("--json", "check"))
    assert report == {"problems": [], "repaired": [], "ok": True}


def test_half_made_layer_is_reported_then_dropped(store: Store) -> None:
    # an apply into `top` that died after marking it half-made (its lock is free)
    with store.damage() as db:
        db.set_state("top", LayerState.CREATING)
    rc, lines = store.check()
    assert rc == 1
    assert lines == ["problem: layer top: half-made (an import or create was interrupted)"]
    rc, lines = store.check("--repair")
    assert rc == 0, lines
    assert problems(lines) == ["problem: layer top: half-made (an import or create was interrupted)"]
    assert "repaired: dropped half-made layer top" in lines
    assert store.check() == (0, ["ok"])
    assert "top" not in store.ok("ls") and "base" in store.ok("ls")


def test_interrupted_removal_is_finished(store: Store) -> None:
    with store.damage() as db:
        db.set_state("top", LayerState.REMOVING)
    rc, lines = store.check()
    assert (rc, lines) == (1, ["problem: layer top: removal was interrupted"])
    rc, lines = store.check("--repair")
    assert rc == 0 and "repaired: finished removing layer top" in lines, lines
    assert store.check() == (0, ["ok"])
    assert not (store.root / "layers" / "top").exists()


def test_reference_of_a_dead_process_is_released(store: Store) -> None:
    # a process takes a mount reference and dies without putting it
    code = ("import sys, lamina; s = lamina.open(sys.argv[1]); print(s.get('top')); "
            "import os; os._exit(0)")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-c", code, str(store.root)], env=env, capture_output=True,
                         check=True)
    merged = out.stdout.decode().strip()
    rc, lines = store.check()
    assert rc == 1
    assert len(problems(lines)) == 1 and lines[0].startswith("problem: layer top: mount reference held by dead process")
    rc, lines = store.check("--repair")
    assert rc == 0, lines
    assert any(r.startswith("repaired: released a mount reference of layer top") for r in lines), lines
    assert store.check() == (0, ["ok"])
    assert not os.path.ismount(merged) or store.driver == "vfs"
    store.ok("rm", "top")  # no reference is left to make it busy


def test_orphan_directory_is_removed(store: Store) -> None:
    orphan = store.root / "layers" / "deadbeef"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "sub" / "junk").write_bytes(b"x")
    rc, lines = store.check()
    assert (rc, lines) == (1, [f"problem: orphan directory {orphan} has no record"])
    rc, lines = store.check("--repair")
    assert rc == 0 and "repaired: removed orphan layer directory deadbeef" in lines, lines
    assert not orphan.exists()
    assert store.check() == (0, ["ok"])


def test_lost_tar_split_falls_back_to_the_files(store: Store) -> None:
    before = store("diff", "top").stdout
    (store.root / "tarsplit" / "top.json.gz").unlink()
    rc, lines = store.check()
    assert (rc, lines) == (1, ["problem: layer top: tar-split record is missing (diff will not be byte-exact)"])
    rc, lines = store.check("--repair")
    assert rc == 0, lines
    assert "repaired: layer top: diff will be computed from the files (tar-split was lost)" in lines
    assert store.check() == (0, ["ok"])
    after = store("diff", "top")
    assert after.returncode == 0
    with tarfile.open(fileobj=io.BytesIO(after.stdout)) as tf:
        assert tf.extractfile("c.txt").read() == b"charlie\n"
    assert before  # the byte-exact diff existed before the loss


@pytest.mark.parametrize(("tamper", "says"), [
    (b"ALPHA\n", "content cannot be rebuilt from its tar-split: a.txt: layer file content does "
                 "not match its tar-split checksum"),  # same size: only the checksum tells
    (b"tampered\n", "content cannot be rebuilt from its tar-split: a.txt: layer file is longer"),
])
def test_tampered_content_is_reported_and_kept(store: Store, tamper: bytes, says: str) -> None:
    store.content_file("base", "a.txt").write_bytes(tamper)
    rc, lines = store.check()
    assert rc == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"problem: layer base: {says}"), lines
    assert lines[0].endswith("(not repairable)")
    rc, lines = store.check("--repair")
    assert rc == 1, "a layer that cannot be mended must keep check failing"
    assert not any(line.startswith("repaired:") for line in lines)
    assert "base" in store.ok("ls"), "repair must never delete a complete layer"
    assert store.content_file("base", "a.txt").read_bytes() == tamper
    assert store.check("--fast") == (0, ["ok"])  # --fast does not hash content


def test_record_with_another_diff_id_is_reported(store: Store) -> None:
    wrong = "sha256:" + "0" * 64
    with store.damage() as db:
        db.set_diff_id("top", wrong)
    rc, lines = store.check()
    assert (rc, lines) == (1, [f"problem: layer top: content does not match its DiffID {wrong} (not repairable)"])
    assert store.check("--repair")[0] == 1
    assert "top" in store.ok("ls")


def test_missing_content_is_not_repairable(store: Store) -> None:
    import shutil

    shutil.rmtree(store.root / "layers" / "top")
    rc, lines = store.check("--fast")
    assert (rc, lines) == (1, [f"problem: layer top: content directory {store.root / 'layers' / 'top'} "
                               "is missing (not repairable)"])
    rc, lines = store.check("--repair", "--fast")
    assert rc == 1, lines
    assert "top" in store.ok("ls"), "repair must not drop the record: the user decides"


def test_lost_parent_record_keeps_the_child_whole(store: Store) -> None:
    """The parent's record is lost but its directory is what the child is built on:
    repair must not delete it as an orphan, or the child (a complete layer) goes too."""
    with store.damage() as db:
        db.delete_layer("base")
    rc, lines = store.check("--fast")
    assert rc == 1
    assert "problem: layer top: parent base has no record (not repairable)" in lines
    rc, lines = store.check("--repair", "--fast")
    assert rc == 1, lines
    assert "top" in store.ok("ls")
    assert store.content_file("base", "a.txt").read_bytes() == b"alpha\n"


def test_each_problem_is_one_line_and_json_agrees(store: Store) -> None:
    with store.damage() as db:
        db.set_state("top", LayerState.CREATING)
    (store.root / "layers" / "cafe").mkdir()
    store.content_file("base", "b.txt").write_bytes(b"changed\n")
    rc, lines = store.check()
    assert rc == 1
    assert len(lines) == 3 and all(line.startswith("problem: ") for line in lines), lines
    r = store("--json", "check")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["ok"] is False
    assert sorted((p["layer"] or "", p["repairable"]) for p in report["problems"]) == \
        [("", True), ("base", False), ("top", True)]
    # repair mends two of the three; the tampered layer keeps the exit status at 1
    r = store("--json", "check", "--repair")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["ok"] is False
    assert len(report["repaired"]) >= 2
    rc, lines = store.check()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("problem: layer base: content"), lines


def test_leaked_mount_is_reported_and_unmounted(store: Store) -> None:
    """A mount under the root that no record knows (a crash between mount(2) and the
    record, or a hand-made one in a layer's directory) is a leak; repair unmounts it."""
    from conftest import require_root

    require_root()
    point = store.root / "layers" / "top" / ("merged" if store.driver == "overlay" else "leak")
    point.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "lamina-test-leak", str(point)], check=True)
    try:
        rc, lines = store.check("--fast")
        assert (rc, lines) == (1, [f"problem: mount at {point} is not recorded (leaked mount)"])
        rc, lines = store.check("--repair", "--fast")
        if os.path.ismount(point):
            assert rc == 1, "check --repair exited 0 with the leaked mount still there"
        assert store.check("--fast") == (0, ["ok"]), lines
        assert not os.path.ismount(point)
    finally:
        if os.path.ismount(point):
            subprocess.run(["umount", "-l", str(point)])
