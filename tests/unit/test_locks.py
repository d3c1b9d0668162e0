"""The store's locks: what they exclude, within a process and across processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from conftest import REPO
from lamina.fs.locks import FileLock, KeyLock


def test_key_locks_exclude_per_key(tmp_path: Path) -> None:
    path = tmp_path / "layers.lock"
    a, b, other = KeyLock(path, "x"), KeyLock(path, "x"), KeyLock(path, "y")
    assert a.acquire(blocking=False)
    assert not b.acquire(blocking=False), "same key, another open file: excluded"
    assert other.acquire(blocking=False), "another key is free"
    a.release()
    assert b.acquire(blocking=False)


def test_key_locks_exclude_threads_of_one_process(tmp_path: Path) -> None:
    """OFD locks belong to the open file, not the process (unlike POSIX lockf)."""
    path = tmp_path / "layers.lock"
    held = KeyLock(path, "x")
    assert held.acquire()
    seen: list[bool] = []
    t = threading.Thread(target=lambda: seen.append(KeyLock(path, "x").acquire(blocking=False)))
    t.start()
    t.join()
    assert seen == [False]


def test_shared_readers_exclude_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "layers.lock"
    r1, r2, w = KeyLock(path, "x"), KeyLock(path, "x"), KeyLock(path, "x")
    assert r1.acquire(shared=True, blocking=False)
    assert r2.acquire(shared=True, blocking=False)
    assert not w.acquire(blocking=False)
    r1.release()
    r2.release()
    assert w.acquire(blocking=False)


def test_a_killed_holder_releases_its_lock(tmp_path: Path) -> None:
    path = tmp_path / "layers.lock"
    code = ("import sys,time; from pathlib import Path; from lamina.fs.locks import KeyLock;"
            "KeyLock(Path(sys.argv[1]), 'x').acquire(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert child.stdout is not None and child.stdout.readline().strip() == b"held"
    assert not KeyLock(path, "x").acquire(blocking=False)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert KeyLock(path, "x").acquire(blocking=False)


def test_file_lock(tmp_path: Path) -> None:
    path = tmp_path / "f.lock"
    with FileLock(path):
        assert not FileLock(path).acquire(blocking=False)
    assert FileLock(path).acquire(blocking=False)
