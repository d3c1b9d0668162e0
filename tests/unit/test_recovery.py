"""The recovery engine on its own: scan and repair agree, work in progress is no problem,
and a repair does nothing where its problem has gone since the scan."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

import lamina
from lamina.liveness import boot_id
from lamina.records import LayerState
from lamina.recovery import Kind, repair, scan


def small_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("f")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"f\n"))
    return buf.getvalue()


@pytest.fixture
def store(tmp_path: Path):
    s = lamina.open(tmp_path / "store", driver="vfs")
    for lid, parent in (("base", None), ("mid", "base"), ("top", "mid")):
        s.apply_diff(lid, parent, io.BytesIO(small_tar()))
    yield s
    s.close()


def _damage(store) -> None:
    """One of each repairable kind, made as a crash would make it."""
    with store.records.write() as db:
        db.set_state("top", LayerState.CREATING)  # an apply that died
        db.add_ref("mid", pid=999999, pid_start="x", persistent=False, boot_id=boot_id())
        db.add_ref("base", pid=1, pid_start="y", persistent=True, boot_id="an-old-boot")
    (store.root / "tmp" / "gone~creating").mkdir()
    (store.driver.ctx.layers / "deadbeef").mkdir()
    (store.root / "tarsplit" / "nobody.json.gz").write_bytes(b"")
    store.tarsplits.path("base").unlink()


def test_cleanup_mends_every_repairable_problem_the_scan_finds(store) -> None:
    _damage(store)
    found = scan(store)
    assert {p.kind for p in found} == {
        Kind.HALF_MADE, Kind.DEAD_REFERENCE, Kind.EARLIER_BOOT, Kind.LEFTOVER,
        Kind.ORPHAN_DIRECTORY, Kind.ORPHAN_TARSPLIT, Kind.LOST_TARSPLIT}
    assert all(p.repairable for p in found)
    mended = store.cleanup()
    assert "dropped half-made layer top" in mended
    assert "released a mount reference of layer mid held by dead process 999999" in mended
    assert "reset 1 mount reference(s) from an earlier boot" in mended
    assert "removed leftover tmp/gone~creating" in mended
    assert "removed orphan layer directory deadbeef" in mended
    assert "removed orphan tar-split nobody.json.gz" in mended
    assert "layer base: diff will be computed from the files (tar-split was lost)" in mended
    assert scan(store, content=True) == []
    assert store.cleanup() == [], "a second cleanup has nothing left to mend"
    with store.diff("base") as d, tarfile.open(fileobj=d, mode="r|") as tf:
        assert [m.name for m in tf] == ["f"]


def test_work_in_progress_is_no_problem(store) -> None:
    """A creating record and a tmp/ entry whose layer's work lock is held belong to a
    process at work: neither scan nor cleanup may touch them."""
    with store.records.write() as db:
        db.set_state("top", LayerState.CREATING)
    (store.root / "tmp" / "top~tarsplit").write_bytes(b"partial")
    with store.work_locks.busy("top"):
        assert scan(store) == []
        assert store.cleanup() == []
        assert (store.root / "tmp" / "top~tarsplit").exists()
    assert {p.kind for p in scan(store)} == {Kind.HALF_MADE, Kind.LEFTOVER}


def test_a_repair_leaves_alone_what_has_gone_since_the_scan(store) -> None:
    _damage(store)
    found = scan(store)
    assert store.cleanup()  # someone else mended it all meanwhile
    assert repair(store, found) == []


def test_problems_that_lose_a_layer_are_not_repairable(store) -> None:
    with store.records.write() as db:
        db.delete_layer("base")
        db.set_diff_id("mid", "sha256:" + "0" * 64)
    found = scan(store, content=True)
    assert {(p.kind, p.layer) for p in found} == {(Kind.LOST_PARENT, "mid"), (Kind.CONTENT_MISMATCH, "mid")}
    assert not any(p.repairable for p in found)
    assert repair(store, found) == []
    assert store.exists("mid") and (store.driver.ctx.layers / "base").is_dir()
