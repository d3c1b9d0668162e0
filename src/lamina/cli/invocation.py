"""One run of the ``lamina`` command: :class:`Invocation` holds the parsed arguments,
the store (opened on first use, so ``--help`` and argument errors never touch a disk),
and the ways a verb reads its input and writes its answer.

Why verbs get an Invocation rather than arguments and a store: every verb, core or
extension, then gets ``--json``, progress bars, decompression of its input and the
never-a-tar-to-a-terminal rule in the same way, by calling ``inv.emit``,
``inv.open_input`` and ``inv.write_output``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lamina.cli.output import (
    UsageError,
    check_not_terminal,
    chunks,
    go_text,
    is_tty,
    json_default,
    regular_size,
    valid_utf8,
)
from lamina.errors import InvalidOption
from lamina.progress import Progress, counted
from lamina.streams import BackgroundHash, CountingReader

if TYPE_CHECKING:
    from lamina.store import Store

log = logging.getLogger("lamina.cli")

Handler = Callable[["Invocation"], "int | None"]


class Invocation:
    """One run of the CLI: parsed arguments, the store (opened on first use), output.

    The streams are parameters so tests and other faces can run verbs in-process.
    """

    def __init__(self, args: argparse.Namespace, *, stdin: IO[bytes] | None = None,
                 stdout: IO[bytes] | None = None, stderr: IO[str] | None = None) -> None:
        self.args = args
        self.json: bool = bool(getattr(args, "json", False))
        self.stdin: IO[bytes] = stdin if stdin is not None else sys.stdin.buffer
        self.stdout: IO[bytes] = stdout if stdout is not None else sys.stdout.buffer
        self.stderr: IO[str] = stderr if stderr is not None else sys.stderr
        self._store: Store | None = None

    # -- the store ----------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The store named by ``--root``/``--driver``/``--opt``, opened on first use."""
        if self._store is None:
            import lamina  # the package exports open(); imported late so --help is fast

            root = getattr(self.args, "root", None) or None
            driver = getattr(self.args, "driver", None) or None
            options = self.driver_options()
            log.debug("opening store root=%s driver=%s options=%s", root, driver, options)
            self._store = lamina.open(root=root, driver=driver, options=options or None)
        return self._store

    def driver_options(self) -> dict[str, str]:
        """``--opt`` pairs given before and after the verb, later ones winning."""
        pairs = [*(getattr(self.args, "opt", None) or []), *(getattr(self.args, "opt_after", None) or [])]
        return parse_options(pairs)

    def close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            store.close()

    # -- output -------------------------------------------------------------------

    def emit(self, data: Any, text: str | Iterable[str] | None = None) -> None:
        """Print ``data`` as JSON with ``--json``, else ``text`` (a line or lines)."""
        if self.json:
            plain = json.loads(json.dumps(data, default=json_default))
            self.stdout.write(json.dumps(valid_utf8(plain)).encode() + b"\n")
        elif text is not None:
            lines = [text] if isinstance(text, str) else list(text)
            if lines:
                self.stdout.write(go_text("\n".join(lines) + "\n").encode())
        self.stdout.flush()

    def progress(self, label: str, total: int | None = None) -> Progress:
        """A progress bar on stderr: drawn only on a terminal, never with ``--json``."""
        return Progress(label, total, stream=self.stderr, enabled=False if self.json else None)

    # -- tar streams in and out -----------------------------------------------------

    @contextlib.contextmanager
    def open_input(self, name: str, label: str = "reading") -> Iterator[IO[bytes]]:
        """Open a tar named on the command line (``-`` = stdin), decompressing if needed.

        Yields a readable stream with a progress bar attached, and closes what it opened
        (never stdin). A terminal on stdin is refused (the user forgot the pipe). gzip,
        zstd, bzip2 and xz are recognised by their first bytes, as ``docker load`` does;
        damage in the compressed stream is one error naming the input.
        """
        from lamina.compression import SNIFF_BYTES, decompressed, sniff

        with contextlib.ExitStack() as stack:
            if name == "-":
                if is_tty(self.stdin):
                    raise UsageError("refusing to read a tar from a terminal: pipe one in or name a file")
                raw: IO[bytes] = self.stdin
                if not hasattr(raw, "peek"):
                    raw = io.BufferedReader(raw)  # type: ignore[arg-type]
            else:
                try:
                    raw = stack.enter_context(open(name, "rb"))
                except OSError as e:
                    raise UsageError(f"cannot read {name}: {e.strerror}") from e
            kind = sniff(raw.peek(SNIFF_BYTES)[:SNIFF_BYTES])  # type: ignore[attr-defined]
            bar = stack.enter_context(self.progress(label, regular_size(raw)))
            stream: IO[bytes] = CountingReader(raw, bar.update)  # type: ignore[assignment]
            what = "stdin" if name == "-" else name
            if kind != "none":  # damage inside is reported as ImageError naming `what`
                stream = stack.enter_context(decompressed(stream, kind, what))  # type: ignore[arg-type]
            yield stream

    def write_output(self, source: IO[bytes] | Iterable[bytes], output: str | None,
                     label: str = "writing") -> tuple[int, str]:
        """Copy a tar to ``output`` (None or ``-`` = stdout); return (bytes, sha256 hex).

        A file is written beside its final name and renamed into place only when
        complete, so a failed export never leaves a truncated tar that looks whole.
        """
        to_stdout = output in (None, "-")
        if to_stdout:
            check_not_terminal(self.stdout)
        pieces = chunks(source)
        digest = BackgroundHash("sha256")  # on the other core, while this one writes
        try:
            return self._write_chunks(pieces, output, label, digest)
        finally:
            digest.stop()

    def _write_chunks(self, pieces: Iterable[bytes], output: str | None, label: str,
                      digest: BackgroundHash) -> tuple[int, str]:
        to_stdout = output in (None, "-")
        total = 0
        with self.progress(label) as bar:
            if to_stdout:
                for chunk in counted(pieces, bar):
                    self.stdout.write(chunk)
                    digest.update(_frozen(chunk))
                    total += len(chunk)
                self.stdout.flush()
                return total, digest.hexdigest()
            assert output is not None
            final = Path(output)
            if final.exists() and not final.is_file():
                tmp = final  # a device or fifo (/dev/null): write in place
            else:
                tmp = final.with_name(f".{final.name}.lamina-{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as f, _writeback(f, tmp != final):
                    for chunk in counted(pieces, bar):
                        f.write(chunk)
                        digest.update(_frozen(chunk))
                        total += len(chunk)
                    if tmp != final:
                        f.flush()
                        os.fsync(f.fileno())
                if tmp != final:
                    os.replace(tmp, final)
            except OSError as e:
                if tmp != final:
                    tmp.unlink(missing_ok=True)
                raise UsageError(f"cannot write {output}: {e.strerror or e}") from e
            except BaseException:
                if tmp != final:
                    tmp.unlink(missing_ok=True)
                raise
        return total, digest.hexdigest()


def _writeback(f: IO[bytes], durable: bool) -> contextlib.AbstractContextManager[object]:
    """Flushing a file that will be fsynced while it is written, so the fsync at the end
    waits only for the tail (lamina.fs.durable.FileWriteback); nothing for a device."""
    if not durable:
        return contextlib.nullcontext()
    from lamina.fs.durable import FileWriteback

    return FileWriteback(f.fileno())


def _frozen(chunk: bytes) -> bytes:
    """The chunk as bytes that cannot change before the hashing thread reads them."""
    return chunk if type(chunk) is bytes else bytes(chunk)


# -- helpers ---------------------------------------------------------------------------


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=x=y"]`` -> ``{"a": "1", "b": "x=y"}``; InvalidOption without ``=``."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidOption(f"invalid option {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


