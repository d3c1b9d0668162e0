"""Progress bars for long CLI work, drawn on stderr only when stderr is a terminal.

Why so shy: the CLI's stdout often carries a tar stream or JSON for another program, and
its stderr is often a log file. A bar is for a person watching a terminal; anywhere else
it would be noise (or, worse, bytes inside a pipe), so :class:`Progress` draws nothing
unless its stream is a TTY. It also redraws at most a few times a second, so counting
every chunk of a multi-gigabyte tar costs nothing measurable.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import IO, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, as Docker's sizes and ``parse_size`` use."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A one-line byte counter with an optional bar (when the total is known).

    Use as a context manager; :meth:`update` after each chunk. When ``enabled`` is None
    the bar shows only if ``stream`` is a terminal.
    """

    #: seconds between redraws; the last state is always drawn on close
    interval = 0.1

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        width: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total if total and total > 0 else None
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_tty(self.stream) if enabled is None else enabled
        self.width = width
        self.done = 0
        self._clock = clock
        self._start = clock()
        self._last_draw = float("-inf")
        self._drawn = False

    def update(self, n: int) -> None:
        """Count ``n`` more bytes; redraw if enough time has passed."""
        self.done += n
        if not self.enabled:
            return
        now = self._clock()
        if now - self._last_draw >= self.interval:
            self._last_draw = now
            self._draw(now)

    def render(self, now: float | None = None) -> str:
        """The line as it would be drawn now (without the carriage return)."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = f"{human_bytes(self.done / elapsed)}/s"
        if self.total is None:
            return f"{self.label} {human_bytes(self.done)} {rate}"
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        return (f"{self.label} [{bar}] {frac * 100:3.0f}% "
                f"{human_bytes(self.done)}/{human_bytes(self.total)} {rate}")

    def _draw(self, now: float) -> None:
        # \r back to column 0, \x1b[K clears what a longer previous line left behind
        self.stream.write("\r" + self.render(now) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Draw the final state and end the line (only if anything was drawn)."""
        if self.enabled and (self._drawn or self.done):
            self._draw(self._clock())
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def counted(chunks: Iterable[bytes], progress: Progress) -> Iterator[bytes]:
    """Yield ``chunks`` unchanged, counting each into ``progress``."""
    for chunk in chunks:
        progress.update(len(chunk))
        yield chunk


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class MultiProgress:
    """Several byte counters drawn as a block of lines: one per item and a total.

    For work made of parallel parts (a pull's layers): each item has a state word
    ("waiting", "downloading", "done" ...) and a byte count; the last line sums them.
    Like :class:`Progress` it draws only on a terminal, at most every ``interval`` s,
    and redraws the block in place (cursor up, clear line).
    """

    interval = 0.2

    def __init__(self, title: str, *, stream: TextIO | None = None, enabled: bool | None = None,
                 width: int = 24, clock: Callable[[], float] = time.monotonic) -> None:
        self.title = title
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_tty(self.stream) if enabled is None else enabled
        self.width = width
        self._clock = clock
        self._start = clock()
        self._last = float("-inf")
        self._lines_drawn = 0
        self._lock = threading.Lock()  # items change from several threads (downloads)
        self.items: dict[str, list] = {}  # key -> [label, state, done, total]

    def add(self, key: str, label: str, total: int | None, state: str = "waiting") -> None:
        with self._lock:
            self.items[key] = [label, state, 0, total]
            self._maybe_draw(force=True)

    def state(self, key: str, state: str) -> None:
        with self._lock:
            if key in self.items:
                self.items[key][1] = state
                self._maybe_draw(force=True)

    def update(self, key: str, n: int) -> None:
        with self._lock:
            if key in self.items:
                self.items[key][2] += n
                self._maybe_draw()

    def _bar(self, done: int, total: int | None) -> str:
        if not total:
            return human_bytes(done)
        frac = min(done / total, 1.0)
        filled = int(frac * self.width)
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {human_bytes(done)}/{human_bytes(total)}"

    def render(self, now: float | None = None) -> list[str]:
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        lines = [f"{label} {state:<11} {self._bar(done, total)}"
                 for label, state, done, total in self.items.values()]
        done = sum(i[2] for i in self.items.values())
        total = sum(i[3] or 0 for i in self.items.values() if i[1] != "exists")
        lines.append(f"{self.title}: {self._bar(done, total or None)} "
                     f"{human_bytes(done / elapsed)}/s")
        return lines

    def _maybe_draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if force or now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        out = "\x1b[F" * self._lines_drawn if self._lines_drawn else ""
        lines = self.render(now)
        out += "".join(f"\r{line}\x1b[K\n" for line in lines)
        self.stream.write(out)
        self.stream.flush()
        self._lines_drawn = len(lines)

    def close(self) -> None:
        with self._lock:
            if self.enabled and self.items:
                self._draw(self._clock())
            self.enabled = False

    def __enter__(self) -> MultiProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
