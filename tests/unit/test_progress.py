"""Progress bars: drawn on a terminal only, never into a pipe or a log file."""

from __future__ import annotations

import io

from lamina.progress import Progress, counted, human_bytes
from lamina.streams import CountingReader


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_human_bytes_uses_binary_units() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(20 * 1024**3) == "20.0 GiB"


def test_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    with Progress("copy", 100, stream=out) as bar:
        bar.update(50)
        bar.update(50)
    assert out.getvalue() == ""
    assert bar.done == 100


def test_draws_bar_on_a_terminal_and_ends_the_line() -> None:
    out, clock = FakeTTY(), Clock()
    with Progress("copy", 1000, stream=out, clock=clock, width=10) as bar:
        clock.t = 1.0
        bar.update(500)
    text = out.getvalue()
    assert "\r" in text and text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("copy [#####.....]  50%")
    assert "500 B/1000 B" in last


def test_redraws_are_rate_limited() -> None:
    out, clock = FakeTTY(), Clock()
    bar = Progress("x", None, stream=out, clock=clock)
    for _ in range(1000):
        bar.update(1)  # the clock does not move: one draw only
    clock.t = 1.0
    bar.update(1)
    assert out.getvalue().count("\r") == 2
    assert bar.render(2.0).startswith("x 1001 B")


def test_reader_and_iterator_count_bytes() -> None:
    bar = Progress("r", enabled=False)
    reader = CountingReader(io.BytesIO(b"a" * 10_000), bar.update)
    assert len(reader.read(4096)) == 4096
    buf = bytearray(10_000)
    assert reader.readinto(buf) == 5904
    assert bar.done == 10_000
    bar2 = Progress("w", enabled=False)
    assert b"".join(counted([b"ab", b"cde"], bar2)) == b"abcde"
    assert bar2.done == 5
