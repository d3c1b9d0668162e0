"""Durability helpers: atomic small files, syncfs, and early writeback during long work."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lamina.fs import durable


def test_atomic_write_replaces_whole(tmp_path: Path) -> None:
    p = tmp_path / "cfg.json"
    durable.atomic_write(p, b"one")
    durable.atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["cfg.json"], "no temp file left"


def test_syncfs_reports_the_path(tmp_path: Path) -> None:
    durable.syncfs(tmp_path)
    with pytest.raises(OSError):
        durable.syncfs(tmp_path / "missing")


def test_early_writeback_flushes_during_the_work_and_stops(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(durable, "syncfs", lambda p: calls.append(p))
    with durable.EarlyWriteback(tmp_path, interval=0.01):
        time.sleep(0.2)
    seen = len(calls)
    assert seen >= 3 and set(calls) == {tmp_path}
    time.sleep(0.05)
    assert len(calls) == seen, "no flush after the block"
    assert not any(t.name == "lamina-writeback" for t in threading.enumerate())
