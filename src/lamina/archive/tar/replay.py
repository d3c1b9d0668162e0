"""tar-split replay: a layer's tar rebuilt, byte for byte, from its record and its files.

The record's format is :mod:`lamina.archive.tar.split`'s (Docker's): raw segments
(headers, padding) verbatim, and for each file its name, size and CRC-64; the content
is read back from the layer by name through a getter, and checked.

Two paths, one behaviour. The Python path parses the record about 1 MiB at a time
(one ``json.loads`` per block) and reads each file through ``getter.get``. Where the C
speedups are built (:mod:`lamina.archive.native`) and the getter can hand out the fds
of its directories (``dir_fd``, as :class:`~lamina.fs.getter.DirFileGetter` does), the
lines in the exact form lamina and Docker write go through C instead: segments decoded,
small files read and checked by fd, many entries per call. Any other line -- or a file
that is big, missing, changed, not a regular file -- is stopped at and handed to the
Python path, which then does what it always does (and raises what it always raises).
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import IO, Protocol

from lamina.archive import native
from lamina.archive.tar.crc64 import Crc64
from lamina.errors import InvalidArchive

SEGMENT = 2
FILE = 1
_CHUNK = 1 << 20

#: replay_batch's answers
_END, _STOP, _NEED_DIR, _FULL = 0, 1, 2, 3


class ContentGetter(Protocol):
    """What reassembly needs from a layer: open a file by its tar name.

    (``lamina.drivers.base.FileGetter`` satisfies it; the archive engine does not
    import drivers, so it states the need as a protocol.) A getter may also offer
    ``dir_fd(parts)``: the fd of the layer's directory ``parts`` (a tuple of clean
    names, () for the root), resolved without following symlinks and kept by the
    getter; with it the C speedups read small files themselves.
    """

    def get(self, name: str) -> IO[bytes]: ...


def _blocks(tarsplit: IO[bytes], count: bool = True) -> Iterator[tuple[bytes, int, int]]:
    """The stream in blocks of whole lines (about 1 MiB): ``(block, end, number)``, the
    lines being ``block[:end]`` (the newline at ``end`` dropped; a last line without
    one comes alone, if it is not blank) and ``number`` the count of lines before them
    (0 throughout unless ``count``: the C path counts for itself)."""
    rest = b""
    number = 0
    while True:
        block = tarsplit.read(_CHUNK)
        if not block:
            break
        if rest:
            block = rest + block
        cut = block.rfind(b"\n")
        if cut < 0:
            rest = block
            continue
        rest = block[cut + 1 :]
        yield block, cut, number
        if count:
            number += block.count(b"\n", 0, cut + 1)
    if rest.strip():
        yield rest, len(rest), number


def _entries(tarsplit: IO[bytes]) -> Iterator[dict]:
    """The records of a tar-split stream, parsed about 1 MiB at a time.

    One ``json.loads`` over a block of lines joined as a JSON array costs a fraction of a
    call per line; only when a block fails to parse are its lines parsed one by one, to
    name the bad line.
    """
    for block, end, number in _blocks(tarsplit):
        lines = block[:end].split(b"\n") if end < len(block) else block.split(b"\n")
        yield from _parse_lines([line for line in lines if line.strip()], number)


def _parse_lines(lines: list[bytes], first: int) -> Iterator[dict]:
    try:
        objs = json.loads(b"[" + b",".join(lines) + b"]")
    except (UnicodeDecodeError, ValueError, RecursionError):
        objs = None
    if objs is not None and all(isinstance(o, dict) for o in objs):
        yield from objs
        return
    decoder = json.JSONDecoder()
    for offset, line in enumerate(lines, 1):
        try:
            obj, _ = decoder.raw_decode(line.strip().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InvalidArchive(f"tar-split record {first + offset} is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise InvalidArchive(f"tar-split record {first + offset} is not a JSON object")
        yield obj


def _b64(value: object, what: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise InvalidArchive(f"tar-split {what} is not base64 text")
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except binascii.Error:
        raise InvalidArchive(f"tar-split {what} is not base64") from None


def reassemble(tarsplit: IO[bytes], getter: ContentGetter) -> Iterator[bytes]:
    """Yield the original tar's bytes from its tar-split record and the layer's files.

    Each file's content is read from ``getter.get(name)`` and checked against the
    recorded size and CRC-64; a mismatch raises :class:`InvalidArchive` naming the file
    (after its bytes were yielded, as in Docker: the stream cannot be un-sent).
    """
    ext = native.ext
    dir_fd = getattr(getter, "dir_fd", None)
    if ext is not None and dir_fd is not None:
        items: Iterator[dict | bytes] = _native_items(tarsplit, ext, dir_fd)
    else:
        items = _entries(tarsplit)
    yield from _rebuild(items, getter)


def _rebuild(items: Iterator[dict | bytes], getter: ContentGetter) -> Iterator[bytes]:
    """The tar's bytes from parsed records (and, from the C path, bytes already rebuilt)."""
    pending: list[bytes] = []  # small pieces are joined: one yield per ~1 MiB, not two per entry
    pending_size = 0
    for obj in items:
        if isinstance(obj, bytes):  # rebuilt by the C path
            if len(obj) >= _CHUNK // 2:
                if pending:
                    yield b"".join(pending)
                    pending, pending_size = [], 0
                yield obj
            else:
                pending.append(obj)
                pending_size += len(obj)
            continue
        kind = obj.get("type")
        if kind == SEGMENT:
            payload = _b64(obj.get("payload"), "segment")
            if payload:
                pending.append(payload)
                pending_size += len(payload)
                if pending_size >= _CHUNK:
                    yield b"".join(pending)
                    pending, pending_size = [], 0
            continue
        if kind != FILE:
            raise InvalidArchive(f"tar-split entry of unknown type {kind!r}")
        if obj.get("name_raw"):
            name = _b64(obj["name_raw"], "name_raw").decode("utf-8", "surrogateescape")
        else:
            name = obj.get("name") or ""
            if not isinstance(name, str):
                raise InvalidArchive("tar-split entry name is not text")
        size = obj.get("size") or 0
        if not isinstance(size, int) or size < 0:
            raise InvalidArchive(f"tar-split size {size!r} is not a size", name)
        if not size:
            continue
        expected = _b64(obj.get("payload"), "checksum")
        crc = Crc64()
        got = 0
        with getter.get(name) as f:
            while True:
                want = min(_CHUNK, size + 1 - got)
                chunk = f.read(want)
                if not chunk:
                    break
                got += len(chunk)
                if got > size:
                    break
                last = len(chunk) < want and got == size  # a short read of a file: its end
                crc.update(chunk)
                if len(chunk) >= _CHUNK // 2:  # big: pass it on as it is, never copied
                    if pending:
                        yield b"".join(pending)
                        pending, pending_size = [], 0
                    yield chunk
                else:
                    pending.append(chunk)
                    pending_size += len(chunk)
                    if pending_size >= _CHUNK:
                        yield b"".join(pending)
                        pending, pending_size = [], 0
                if last:
                    break
        if got != size:
            raise InvalidArchive(
                f"layer file is {'longer' if got > size else 'shorter'} than the "
                f"{size} bytes tar-split recorded", name)
        if crc.digest() != expected:
            raise InvalidArchive("layer file content does not match its tar-split checksum",
                                 name)
    if pending:
        yield b"".join(pending)


def _native_items(tarsplit: IO[bytes], ext: ModuleType,
                  dir_fd: Callable[[tuple[str, ...]], int]) -> Iterator[dict | bytes]:
    """Records for :func:`_rebuild`: runs of canonical lines rebuilt by the C code
    (bytes), every other line parsed here (dicts), in order.

    The directory fd handed to C is asked of the getter again after every record the
    Python path handled: its ``get`` may close the fds the getter keeps.
    """
    parts: tuple[str, ...] = ()
    replay = ext.replay_batch

    def fd_of(parts: tuple[str, ...]) -> int:
        try:
            return dir_fd(parts)
        except OSError:
            return -1  # every file stops in C then; the Python path says what is wrong

    number = 0
    for block, size, _ in _blocks(tarsplit, count=False):
        off = 0
        asked_at = -1  # where a directory was last looked up for C
        fd = fd_of(parts)
        prefix = _prefix(parts)
        while off < size:
            status, off, out, lines = replay(block, off, size, fd, prefix, _CHUNK)
            number += lines
            if out:
                yield out
            if status == _END:
                break
            if status == _FULL:
                continue
            end = block.find(b"\n", off, size)
            end = size if end < 0 else end
            line = block[off:end]
            if status == _NEED_DIR and off != asked_at:
                asked_at = off
                wanted = _dir_of(line)
                if wanted is not None:
                    fd = fd_of(wanted)
                    parts, prefix = wanted, _prefix(wanted)
                    continue
            # the Python path's line
            if line.strip():
                yield from _parse_lines([line], number)
                fd = fd_of(parts)
            number += 1
            off = end + 1
        if not size:
            number += 1  # an empty line alone


def _prefix(parts: tuple[str, ...]) -> bytes:
    return ("/".join(parts) + "/").encode("utf-8", "surrogateescape") if parts else b""


def _dir_of(line: bytes) -> tuple[str, ...] | None:
    """The directory of the file a canonical tar-split line names, as the getter's
    parts; None if the line is not that plain."""
    try:
        name = json.loads(line)["name"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(name, str):
        return None
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts or ".." in parts:
        return None
    return parts[:-1]
