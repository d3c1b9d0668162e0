"""The pull pipeline's pipes and their shared memory budget, without a registry.

Each download thread reserves memory before it reads its (here: fake) socket, so a
download ahead of its turn stops reading once the budget is full and reads on when the
apply frees memory or its turn comes; the head never waits for the budget.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from lamina.registry.prefetch import BlobPipe, Budget, RegistrySource, _Cancelled


class FakeSocket:
    """A blob's bytes, read like BlobReader reads a socket; counts what was asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def readinto(self, b: bytearray) -> int:
        n = min(len(b), len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def _download(pipe: BlobPipe, sock: FakeSocket) -> threading.Thread:
    def run() -> None:
        try:
            RegistrySource._download(pipe, sock)  # type: ignore[arg-type]
            pipe.finish()
        except _Cancelled:
            pipe.finish()
        except BaseException as e:  # noqa: BLE001 - handed to the reader, as the worker does
            pipe.finish(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _read_all(pipe: BlobPipe) -> bytes:
    out = bytearray()
    buf = bytearray(100_000)
    while n := pipe.read_live(memoryview(buf)):
        out += buf[:n]
    return bytes(out)


def _wait(cond: object, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_a_pipe_ahead_of_its_turn_stops_reading_at_the_budget() -> None:
    budget = Budget(256 << 10)
    head = BlobPipe("sha256:h", 1 << 20, budget)
    head.make_head()
    later = BlobPipe("sha256:l", 2 << 20, budget)
    data = os.urandom(2 << 20)
    sock = FakeSocket(data)
    t = _download(later, sock)
    _wait(lambda: later.pauses == 1)
    # it read no more than the budget from its socket: the rest is still "in the registry"
    assert sock.pos <= budget.limit and later.received == sock.pos and budget.ahead <= budget.limit
    # its turn comes: it reads on (as the head, within the head's own allowance)
    later.make_head()
    assert _read_all(later) == data
    t.join(5)
    assert budget.held == 0 and budget.peak <= budget.limit + budget.head_limit


def test_the_head_is_never_held_up_by_pipes_that_filled_the_budget() -> None:
    budget = Budget(128 << 10)
    later = BlobPipe("sha256:l", 1 << 20, budget)
    t_later = _download(later, FakeSocket(os.urandom(1 << 20)))
    _wait(lambda: later.pauses == 1)
    head = BlobPipe("sha256:h", 3 << 20, budget)
    head.make_head()
    data = os.urandom(3 << 20)
    t_head = _download(head, FakeSocket(data))
    assert _read_all(head) == data  # while the budget stays full of the other pipe
    assert later.pauses == 1 and later.received <= budget.limit
    t_head.join(5)
    later.cancel()  # the loader is past it: its memory comes back, its download stops
    t_later.join(5)
    assert not t_later.is_alive() and budget.held == 0
    with pytest.raises(Exception, match="cancelled"):
        later.read_live(memoryview(bytearray(10)))


def test_a_turn_moves_memory_to_the_head_so_the_next_blob_reads_on() -> None:
    """Two pipes ahead of their turn: the first fills the budget, the second waits
    before it has read anything; when the first becomes the head, what it holds counts
    against the head's allowance instead, and the second reads on."""
    budget = Budget(192 << 10, head_limit=1 << 20)
    second = BlobPipe("sha256:2", 1 << 20, budget)
    second_data = os.urandom(1 << 20)
    t2 = _download(second, FakeSocket(second_data))
    _wait(lambda: second.pauses == 1)
    assert second.received == 192 << 10 and budget.ahead == 192 << 10
    third = BlobPipe("sha256:3", 1 << 20, budget)
    sock3 = FakeSocket(os.urandom(1 << 20))
    t3 = _download(third, sock3)
    _wait(lambda: third.pauses == 1)
    assert sock3.pos == 0  # not a byte read: the whole budget is the second's
    second.make_head()
    _wait(lambda: sock3.pos > 0)
    assert _read_all(second) == second_data
    assert budget.ahead <= budget.limit and budget.peak <= budget.limit + budget.head_limit
    third.cancel()
    t2.join(5)
    t3.join(5)
    assert budget.held == 0 and budget.ahead == 0


def test_a_failed_read_gives_its_reservation_back() -> None:
    class Broken(FakeSocket):
        def readinto(self, b: bytearray) -> int:
            raise ConnectionResetError("gone")

    budget = Budget(1 << 20)
    pipe = BlobPipe("sha256:x", 10, budget)
    _download(pipe, Broken(b"")).join(5)
    assert budget.held == 0
    with pytest.raises(ConnectionResetError):
        pipe.read_live(memoryview(bytearray(10)))


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Budget(0)
