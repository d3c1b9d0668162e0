"""How the ``lamina`` command writes: one line per error, JSON that is always valid
UTF-8, Docker's spelling of names that are not UTF-8, tables, and the terminal rules.

Why a module of its own: every face's verbs (``lamina image``, ``lamina serve``,
``lamina win``) print through these, so they live where any verb module can import
them, public, rather than as private helpers of the core verbs.
"""

from __future__ import annotations

import codecs
import io
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import IO

from lamina.errors import LaminaError

#: how much of a tar is copied at a time from a stream to the output
COPY_CHUNK = 1 << 20


class UsageError(LaminaError):
    """A command line asking for something the CLI refuses (a tar to a terminal, ...)."""


def check_not_terminal(stream: IO[bytes]) -> None:
    """Refuse to pour a binary tar into a terminal, as ``docker save`` does."""
    if is_tty(stream):
        raise UsageError("refusing to write a tar to a terminal: redirect stdout or use -o FILE")


def is_tty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def regular_size(f: IO[bytes]) -> int | None:
    try:
        st = os.fstat(f.fileno())
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def chunks(source: IO[bytes] | Iterable[bytes]) -> Iterable[bytes]:
    if hasattr(source, "read"):
        reader: IO[bytes] = source  # type: ignore[assignment]
        return iter(lambda: reader.read(COPY_CHUNK), b"")
    return source  # type: ignore[return-value]


def _replace_per_byte(exc: UnicodeError) -> tuple[str, int]:
    assert isinstance(exc, UnicodeDecodeError)
    return "\ufffd" * (exc.end - exc.start), exc.end


codecs.register_error("lamina-per-byte", _replace_per_byte)


def go_text(text: str) -> str:
    """``text`` as Docker prints it: a name's bytes that are not UTF-8 (held here as
    surrogates) become U+FFFD, one per byte, which is what Go's JSON encoder sends
    ``docker diff`` (the daemon's answer is JSON). Lossy, as Docker's is, but always
    printable and valid UTF-8, where the raw surrogates could not be written at all."""
    if text.isascii():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no byte stands for
        return text.encode("utf-8", "replace").decode("utf-8")
    return raw.decode("utf-8", "lamina-per-byte")


def valid_utf8(obj: object) -> object:
    """Every string in a JSON value through :func:`go_text` (no lone surrogates)."""
    if isinstance(obj, str):
        return go_text(obj)
    if isinstance(obj, list):
        return [valid_utf8(v) for v in obj]
    if isinstance(obj, dict):
        return {go_text(k): valid_utf8(v) for k, v in obj.items()}
    return obj


def json_default(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Enum):
        return obj.value
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def one_line(err: BaseException) -> str:
    """The error as one line. A system error (OSError) names only a file, so the notes
    the code added on its way up (which tar entry, which layer) go with it."""
    text = " ".join(str(err).split()) or type(err).__name__
    notes = getattr(err, "__notes__", None) if isinstance(err, OSError) else None
    if notes:
        text += " (" + "; ".join(" ".join(str(n).split()) for n in notes) + ")"
    return text


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*r).rstrip() for r in [header, *rows]]

