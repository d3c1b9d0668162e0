"""The per-layer work locks: work refuses work, but never fails because cleanup looked
at a layer or tidied it for a moment (:mod:`lamina.worklocks`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lamina.errors import LayerBusy
from lamina.worklocks import WorkLocks


def test_work_refuses_work_at_once(tmp_path: Path) -> None:
    locks = WorkLocks(tmp_path)
    with locks.busy("x"):
        t = time.monotonic()
        with pytest.raises(LayerBusy, match="layer x is in use by another operation"):
            locks.take("x")
        with pytest.raises(LayerBusy, match="being changed"):
            locks.take("x", shared=True, culprit="layer x is being changed")
        assert time.monotonic() - t < 0.5
        assert not locks.is_idle("x") and locks.is_idle("y")
    reader = locks.take("x", shared=True)
    try:
        assert not locks.is_idle("x"), "a reader is at work too"
        locks.take("x", shared=True).release()  # readers share
    finally:
        reader.release()
    assert locks.is_idle("x")


def test_looking_takes_nothing(tmp_path: Path) -> None:
    """is_idle asks the kernel; a try-and-release probe made work fail when it landed
    between the probe's take and its release (what failed a Commit beside containerd's
    Cleanup)."""
    locks = WorkLocks(tmp_path)
    stop = threading.Event()

    def look() -> None:
        while not stop.is_set():
            locks.is_idle("x")

    lookers = [threading.Thread(target=look) for _ in range(2)]
    for t in lookers:
        t.start()
    try:
        for _ in range(2000):
            locks.take("x").release()
    finally:
        stop.set()
        for t in lookers:
            t.join()


def test_work_waits_for_cleanups_tidying(tmp_path: Path) -> None:
    locks = WorkLocks(tmp_path)
    holding, done = threading.Event(), threading.Event()

    def tidy() -> None:
        with locks.idle("x") as free:
            assert free
            holding.set()
            time.sleep(0.3)
        done.set()

    t = threading.Thread(target=tidy)
    t.start()
    holding.wait()
    start = time.monotonic()
    for shared in (False, True):
        lock = locks.take("x", shared=shared)
        assert done.is_set() and time.monotonic() - start >= 0.25
        lock.release()
    t.join()


def test_tidying_is_not_waited_for_forever(tmp_path: Path) -> None:
    locks = WorkLocks(tmp_path, tidy_wait=0.2)
    with locks.idle("x") as free:
        assert free
        with pytest.raises(LayerBusy, match="layer x is being tidied by a cleanup that took over 0.2 s"):
            locks.take("x")


def test_cleanup_does_not_take_what_work_or_another_cleanup_holds(tmp_path: Path) -> None:
    locks = WorkLocks(tmp_path)
    with locks.busy("x"), locks.idle("x") as free:
        assert not free
    with locks.idle("x") as first:
        assert first
        got: list[bool] = []

        def second() -> None:
            with locks.idle("x") as free:
                got.append(free)

        t = threading.Thread(target=second)
        t.start()
        t.join()
        assert got == [False]
    with locks.idle("x") as again:
        assert again, "a cleanup's hold ends with its block, the tidy mark included"
