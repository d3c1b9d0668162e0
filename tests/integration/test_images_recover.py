"""A killed ``image load`` leaves no layer of its image: the journal and its recovery.

The kill is real (SIGKILL of a child process running a load on a real store, stalled
inside its second layer so the timing is certain); the other cases write a journal by
hand, naming this very process with a wrong start time (a reused pid: the owner is
dead) or an earlier boot, or naming it truly (a live load, left alone).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
from conftest import REPO, run_cli
from images_support import Image, MemoryStore, docker_save, layer_tar, sha
from lamina import liveness
from lamina.images import chain_ids, images, load, recover
from lamina.images.digest import layer_id
from lamina.images.journal import LoadJournal, read_journals
from lamina.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = lamina.open(tmp_path / "store", driver="vfs")
    yield s
    s.close()


def _image(name: str = "app:1", seed: str = "") -> Image:
    base = layer_tar({"etc/os": f"base{seed}\n".encode(), "bin/sh": b"#!sh\n" * 2000}, dirs=["etc", "bin"])
    mid = layer_tar({"etc/app": f"app{seed}\n".encode(), "srv/blob": bytes(range(256)) * 400}, dirs=["srv"])
    top = layer_tar({"etc/top": b"top\n"})
    return Image([base, mid, top], [name])


def _ids(img: Image) -> list[str]:
    return [layer_id(c) for c in chain_ids([sha(t) for t in img.layers])]


def _journals(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "images").iterdir() if ".load-" in p.name)


def _write_journal(root: Path, layers: list[str], *, pid: int | None = None, start: str | None = None,
                   boot: str | None = None) -> Path:
    """A journal as a load writes it; by default one of this (live) process."""
    my_pid, my_start = liveness.me()
    pid = my_pid if pid is None else pid
    start = my_start if start is None else start
    (root / "images").mkdir(exist_ok=True)
    path = root / "images" / f".load-{pid}-{start}-0123abcd.json"
    path.write_text(json.dumps({"version": 1, "pid": pid, "start": start,
                                "boot": liveness.boot_id() if boot is None else boot, "layers": layers}))
    return path


def _stack(store: Store, n: int = 3, prefix: str = "j") -> list[str]:
    """``n`` layers, each on the one before (what a load of n new layers makes)."""
    ids, parent = [], None
    for i in range(n):
        lid = f"{prefix}{i}"
        store.apply_diff(lid, parent, io.BytesIO(layer_tar({f"f{i}": b"x"})))
        ids.append(lid)
        parent = lid
    return ids


_STALLED_LOAD = textwrap.dedent("""
    import sys, time
    import lamina
    from lamina.images import load

    root, archive, marker = sys.argv[1:]
    store = lamina.open(root)
    real = store.apply_diff
    calls = []

    class Stall:
        # hands out the layer a little at a time, then stops for good: the load is
        # now inside its second layer, with the first one complete
        def __init__(self, raw):
            self.raw, self.given = raw, 0
        def read(self, n=-1):
            if self.given >= 8192:
                open(marker, "w").close()
                time.sleep(600)
            data = self.raw.read(4096)
            self.given += len(data)
            return data

    def apply_diff(lid, parent, stream, **kw):
        calls.append(lid)
        return real(lid, parent, Stall(stream) if len(calls) == 2 else stream, **kw)

    store.apply_diff = apply_diff
    load(store, archive)
""")


def _killed_load(root: Path, archive: Path, tmp_path: Path) -> None:
    """Run a load in a child, SIGKILL it inside its second layer."""
    marker = tmp_path / "stalled"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _STALLED_LOAD, str(root), str(archive), str(marker)],
                            env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the load never reached its second layer"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_killed_load_leaves_layers_that_cleanup_removes(store: Store, tmp_path: Path) -> None:
    img = _image()
    ids = _ids(img)
    archive = docker_save(tmp_path / "a.tar", [img])
    _killed_load(store.root, archive, tmp_path)
    # the harm the journal repairs: a complete layer that no image owns
    assert store.exists(ids[0]) and images(store) == []
    assert [j.layers for j in read_journals(store.root / "images")] == [ids[:2]]

    out = run_cli("cleanup", root=store.root)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert f"dropped half-made layer {ids[1]}" in lines  # the store's own cleanup
    dropped = [ln for ln in lines if ln.startswith("dropped layer ")]
    assert len(dropped) == 1 and dropped[0].startswith(f"dropped layer {ids[0]} of an interrupted image load")
    assert not any(store.exists(i) for i in ids)
    assert _journals(store.root) == []

    again = run_cli("cleanup", root=store.root)
    assert again.stdout.decode().strip() == ""  # nothing left to do
    assert load(store, archive).layers_loaded == 3


def test_next_load_recovers_first_even_past_a_half_made_child(store: Store, tmp_path: Path) -> None:
    img = _image()
    ids = _ids(img)
    archive = docker_save(tmp_path / "a.tar", [img])
    _killed_load(store.root, archive, tmp_path)
    other = _image("other:1", seed="o")
    # no `lamina cleanup` in between: the half-made second layer is still recorded
    result = load(store, docker_save(tmp_path / "o.tar", [other]))
    assert [ln.split(" of ")[0] for ln in result.recovered] == [
        f"dropped half-made layer {ids[1]}", f"dropped layer {ids[0]}"]
    assert not any(store.exists(i) for i in ids)
    assert {r.id for r in store.layers()} == set(_ids(other))
    assert _journals(store.root) == []


def test_journal_of_a_dead_pid_is_recovered(store: Store) -> None:
    ids = _stack(store)
    _write_journal(store.root, ids, start="1")  # this pid, another start time: a reused pid
    lines = recover(store)
    assert lines == [f"dropped layer {lid} of an interrupted image load (pid {os.getpid()})"
                     for lid in reversed(ids)]
    assert store.layers() == [] and _journals(store.root) == []


def test_journal_of_an_earlier_boot_is_recovered(store: Store) -> None:
    ids = _stack(store, 1)
    _write_journal(store.root, ids, boot="an-earlier-boot")  # same pid and start, but not this boot
    assert len(recover(store)) == 1 and not store.exists(ids[0])


def test_journal_of_a_live_load_is_left_alone(store: Store) -> None:
    ids = _stack(store)
    path = _write_journal(store.root, ids)
    out = run_cli("cleanup", root=store.root)
    assert out.returncode == 0 and out.stdout.decode().strip() == ""
    assert all(store.exists(i) for i in ids)
    assert path.exists()


def test_layers_an_image_or_a_container_uses_are_kept(store: Store, tmp_path: Path) -> None:
    img = _image()
    ids = _ids(img)
    load(store, docker_save(tmp_path / "a.tar", [img]))  # an image owns ids[0..2]
    extra = _stack(store, 2, prefix="x")
    store.apply_diff("onbase", ids[0], io.BytesIO(layer_tar({"g": b"1"})))
    store.create_rw("container", extra[0])
    # a dead load that had made ids[0] (later reused by the image), then x0 and x1, then onbase
    _write_journal(store.root, [ids[0], *extra, "onbase"], start="1")
    lines = recover(store)
    what = f"of an interrupted image load (pid {os.getpid()})"
    assert lines == [f"dropped layer onbase {what}", f"dropped layer x1 {what}",
                     f"kept layer x0 {what}: layer(s) container build on it"]
    assert all(store.exists(i) for i in ids) and store.exists("x0") and store.exists("container")
    assert not store.exists("x1") and not store.exists("onbase")
    assert _journals(store.root) == []
    assert [r.id for r in images(store)] == [img.id]


def test_mounted_layer_is_kept(store: Store) -> None:
    ids = _stack(store, 1)
    store.get(ids[0])
    try:
        _write_journal(store.root, ids, start="1")
        lines = recover(store)
        assert len(lines) == 1 and lines[0].startswith(f"kept layer {ids[0]} of an interrupted image load")
        assert store.exists(ids[0])
    finally:
        store.put(ids[0])


def test_unreadable_journal_and_half_written_temp_are_removed(store: Store) -> None:
    ids = _stack(store, 1)
    images_dir = store.root / "images"
    images_dir.mkdir(exist_ok=True)
    (images_dir / f".load-{os.getpid()}-1-00ff.json").write_text("{not json")
    # atomic_write's temp file of a journal whose writer died mid-rewrite
    (images_dir / f"..load-{os.getpid()}-1-00fe.json.tmp.{os.getpid()}").write_text("{")
    lines = recover(store)
    assert len(lines) == 2
    assert any(ln.startswith("removed the half-written image-load journal") for ln in lines)
    assert any(ln.startswith("removed the unreadable image-load journal") for ln in lines)
    assert _journals(store.root) == [] and store.exists(ids[0])


def test_store_without_images_is_left_as_it_is(store: Store) -> None:
    assert recover(store) == []
    assert not (store.root / "images").exists()


def test_each_layer_is_journalled_before_it_is_made(tmp_path: Path) -> None:
    mem = MemoryStore(tmp_path / "mem")
    img = _image()
    ids = _ids(img)
    seen: list[tuple[str, list[list[str]]]] = []
    real = mem.apply_diff

    def apply_diff(lid: str, parent: str | None, stream, **kw):  # type: ignore[no-untyped-def]
        seen.append((lid, [j.layers for j in read_journals(mem.root / "images")]))
        return real(lid, parent, stream, **kw)

    mem.apply_diff = apply_diff  # type: ignore[method-assign]
    load(mem, docker_save(tmp_path / "a.tar", [img]))  # type: ignore[arg-type]
    assert seen == [(ids[0], [ids[:1]]), (ids[1], [ids[:2]]), (ids[2], [ids[:3]])]
    assert _journals(mem.root) == []  # committed: the journal is gone
    seen.clear()
    load(mem, docker_save(tmp_path / "a.tar", [img]))  # type: ignore[arg-type]
    assert seen == [] and _journals(mem.root) == []  # nothing made, nothing journalled


def test_failed_load_whose_rollback_is_stuck_keeps_its_journal(tmp_path: Path) -> None:
    mem = MemoryStore(tmp_path / "mem")
    img = _image()
    ids = _ids(img)
    bad = Image(img.layers, ["app:1"], config=img.config.replace(  # type: ignore[union-attr]
        sha(img.layers[2]).encode(), sha(b"wrong").encode()))
    real_remove = mem.remove

    def stuck(lid: str) -> None:
        raise lamina.errors.LayerBusy(f"layer {lid} is mounted")

    mem.remove = stuck  # type: ignore[method-assign]
    with pytest.raises(lamina.errors.ImageError):
        load(mem, docker_save(tmp_path / "bad.tar", [bad]))  # type: ignore[arg-type]
    journals = read_journals(mem.root / "images")
    assert len(journals) == 1 and journals[0].owner_alive()
    assert journals[0].layers[:2] == ids[:2] and len(journals[0].layers) == 3  # the top: another chain ID
    mem.remove = real_remove  # type: ignore[method-assign]
    assert recover(mem) == []  # type: ignore[arg-type]  # this process lives: not yet

    journal = LoadJournal(mem.root / "images")
    assert journal.path.name.startswith(f".load-{os.getpid()}-")  # a second load: its own file
    assert journal.path != journals[0].path
