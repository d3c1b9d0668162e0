"""The records module on its own: schema steps, states, and the reference operations the
store's mount counting rests on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lamina.errors import StoreCorrupt
from lamina.records import SCHEMA_VERSION, LayerState, Records, steps_after


@pytest.fixture
def records(tmp_path: Path):
    r = Records(tmp_path / "meta.db")
    yield r
    r.close()


def test_a_new_database_is_at_the_current_version(records: Records) -> None:
    assert records.version == SCHEMA_VERSION
    again = Records(records.path)  # reopening applies nothing and changes nothing
    assert again.version == SCHEMA_VERSION
    again.close()


def test_schema_steps_only_bring_older_databases_up() -> None:
    everything = steps_after(0)
    assert everything and all(s.lstrip().startswith("CREATE") for s in everything)
    assert steps_after(SCHEMA_VERSION) == []
    assert steps_after(SCHEMA_VERSION + 1) == [], "a newer database is left as it is"
    if SCHEMA_VERSION > 1:
        assert steps_after(1) == everything[len(steps_after(0)) - len(steps_after(1)):]


def test_states_round_trip_and_only_ready_is_complete(records: Records) -> None:
    with records.write() as db:
        db.insert_layer("a", None, rw=False)
        assert db.layer("a").state is LayerState.CREATING and not db.layer("a").complete
        db.mark_ready("a", size=3, has_tarsplit=True, diff_id="sha256:x")
    with records.read() as db:
        rec = db.layer("a")
    assert rec.state is LayerState.READY and rec.complete and rec.has_tarsplit and rec.size == 3
    assert rec.to_json()["state"] == "ready"
    with records.write() as db:
        db.delete_layer("a", unless_ready=True)
        assert db.layer("a") is not None, "unless_ready keeps a complete layer"
        db.set_state("a", LayerState.REMOVING)
        assert db.count(LayerState.REMOVING) == 1 and db.count(LayerState.READY) == 0
        db.delete_layer("a", unless_ready=True)
        assert db.layer("a") is None


def test_chain_reports_a_loop_and_a_gap(records: Records) -> None:
    with records.write() as db:
        db.insert_layer("a", "b", rw=False)
        db.insert_layer("b", "a", rw=False)
        db.insert_layer("c", "gone", rw=False)
    with records.read() as db, pytest.raises(StoreCorrupt, match="loop"):
        db.chain("a")
    with records.read() as db, pytest.raises(StoreCorrupt, match="ancestor gone has no record"):
        db.chain("c")


def test_a_put_picks_its_own_reference_first(records: Records) -> None:
    with records.write() as db:
        db.insert_layer("a", None, rw=True)
        db.add_ref("a", pid=1, pid_start="s1", persistent=False, boot_id="b")
        db.add_ref("a", pid=2, pid_start="s2", persistent=True, boot_id="b")
        db.add_ref("a", pid=3, pid_start="s3", persistent=False, boot_id="b")
        refs = {r.pid: r.ref for r in db.refs()}
        assert db.pick_ref("a", persistent=False, pid=3, pid_start="s3") == refs[3]
        assert db.pick_ref("a", persistent=False, pid=9, pid_start="s9") == refs[1]
        assert db.pick_ref("a", persistent=True, pid=9, pid_start="s9") == refs[2]
        assert db.drop_ref(refs[2]) and not db.drop_ref(refs[2])
        assert db.refcount("a") == 2 and db.layer("a").mount_count == 2


def test_references_and_mounts_of_other_boots_go(records: Records) -> None:
    with records.write() as db:
        db.insert_layer("a", None, rw=True)
        db.add_ref("a", pid=1, pid_start="s", persistent=True, boot_id="old")
        db.add_ref("a", pid=1, pid_start="s", persistent=True, boot_id="now")
        db.set_mount("a", "/x", "old")
        assert db.drop_refs_of_other_boots("now", "a") == 1
        assert db.drop_mounts_of_other_boots("now") == 1
        assert db.mount("a") is None and db.refcount("a") == 1


def test_readonly_records_see_but_cannot_change(records: Records) -> None:
    with records.write() as db:
        db.insert_layer("a", None, rw=False)
    watcher = Records(records.path, readonly=True)
    try:
        with watcher.read() as db:
            assert db.layer("a").state is LayerState.CREATING
        with pytest.raises(sqlite3.OperationalError), watcher.write() as db:
            db.set_state("a", LayerState.READY)
    finally:
        watcher.close()


def test_each_thread_reads_on_its_own_connection_and_ended_threads_let_go(records: Records) -> None:
    """A read never queues behind another thread's write (WAL readers do not wait), and
    the connections of threads that have ended are closed, not kept."""
    import threading

    with records.write() as db:
        db.insert_layer("a", None, rw=False)
        db.mark_ready("a", size=0, has_tarsplit=False, diff_id=None)
    seen: list[object] = []
    started, done = threading.Event(), threading.Event()

    def writer() -> None:
        with records.write():
            started.set()
            done.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    assert started.wait(30)
    try:
        reader = threading.Thread(target=lambda: seen.append(records.ready("a").id))
        reader.start()
        reader.join(5)
        assert seen == ["a"], "a read waited for another thread's write"
    finally:
        done.set()
        t.join()
    for _ in range(20):
        th = threading.Thread(target=lambda: records.ready("a"))
        th.start()
        th.join()
    assert len(records._readers) <= 2, "connections of ended threads are closed"
