"""tar-split: record a tar's non-content bytes so the exact tar can be rebuilt later.

Docker keeps, for every layer it imports, a ``tar-split`` file: the tar's headers and
padding verbatim, and for each file only its name, size and a CRC-64 of its content.
``diff`` of an unchanged imported layer then streams the recorded bytes and reads file
content back from the layer, giving the original tar, byte for byte, hence the same
sha256 (the image's DiffID). We write the same format Docker writes
(vbatts/tar-split ``tar/storage``), so a file made by either can be read by the other:

- one JSON object per line, keys in this order:
  ``{"type":2,"payload":"<base64 raw bytes>","position":N}`` for raw segments, and
  ``{"type":1,"name":"<tar name>","size":S,"payload":"<base64 crc>","position":N}``
  for each entry (every entry, not only regular files; ``size`` is left out when 0 and
  ``payload`` is ``null`` then). A name that is not valid UTF-8 goes base64-encoded in
  ``name_raw`` instead of ``name``. ``position`` counts lines from 0.
- segments: before each entry, everything since the previous entry's data (its
  padding, meta headers, the header); after the last entry, its padding and the
  end-of-archive blocks; then whatever follows them in the stream, in chunks of at most
  1 MiB. A tar ending without end blocks simply has no such segment.
- the checksum is CRC-64 with the ISO polynomial as Go's ``hash/crc64`` computes it
  (reflected, initial and final value all ones), stored big-endian in 8 bytes.
- names that repeat: the Go packer refuses every repeated name. We accept a repeat
  unless it shadows an earlier entry that had content (that content is gone from the
  layer, so the tar could never be rebuilt); :meth:`TarSplitWriter.finish` reports
  that case, at the end, so a hostile entry later in the tar is named first.

The file is written uncompressed here; the store gzips it. Reading it back (the tar
rebuilt) is :mod:`lamina.archive.tar.replay`.
"""

from __future__ import annotations

import json
import posixpath
import re
from binascii import b2a_base64
from collections.abc import Callable
from typing import IO

from lamina.archive.tar.crc64 import Crc64
from lamina.archive.tar.reader import DIR, TarEntry, TarReader
from lamina.archive.tar.replay import FILE, SEGMENT, ContentGetter, reassemble
from lamina.errors import InvalidArchive

__all__ = ["FILE", "SEGMENT", "ContentGetter", "RecordingReader", "TarSplitWriter", "reassemble"]

_CHUNK = 1 << 20

# -- writing ---------------------------------------------------------------------------


#: printable ASCII that JSON (Go's encoder) writes as is: not " \\ < > &
_PLAIN = re.compile(r"[ !#-%'-;=?-\[\]-~]*")


def _json_str(s: str) -> str:
    """A JSON string as Go's encoder writes it (UTF-8 kept, <, >, & escaped)."""
    if _PLAIN.fullmatch(s):
        return f'"{s}"'
    out = json.dumps(s, ensure_ascii=False)
    if "<" in out or ">" in out or "&" in out or "\u2028" in out or "\u2029" in out:
        out = (out.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
               .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    return out


def _clean_key(name: str) -> str:
    """The name as Go's ``filepath.Clean`` would compare it (for duplicate checks)."""
    if name.startswith(".") or name.endswith("/") or "//" in name or "/." in name:
        return posixpath.normpath(name or ".")
    return name


class TarSplitWriter:
    """Writes tar-split JSON lines to a binary stream, numbering them.

    With ``buffered=True`` lines are collected and written in batches of about 64 KiB
    (fewer calls into a gzip stream); then :meth:`flush` must be called at the end.
    """

    _BATCH = 64 << 10

    def __init__(self, out: IO[bytes], *, buffered: bool = False) -> None:
        self._out = out
        self._position = 0
        #: cleaned names of entries that had content, and the first name to repeat one
        self._with_content: set[str] = set()
        #: every directory above such an entry (a whiteout of one loses that content)
        self._content_dirs: set[str] = set()
        self._shadowed: str | None = None
        self._buffered = buffered
        self._pending: list[bytes] = []
        self._pending_size = 0

    def _emit(self, line: bytes) -> None:
        if not self._buffered:
            self._out.write(line)
            return
        self._pending.append(line)
        self._pending_size += len(line)
        if self._pending_size >= self._BATCH:
            self.flush()

    def flush(self) -> None:
        """Write what is batched (a no-op unless ``buffered``)."""
        if self._pending:
            self._out.write(b"".join(self._pending))
            self._pending.clear()
            self._pending_size = 0

    def finish(self) -> None:
        """Flush, and refuse the tar if a repeated name shadowed earlier content."""
        self.flush()
        if self._shadowed is not None:
            raise InvalidArchive(
                "this entry replaces or whites out content added earlier in the same tar: "
                "tar-split could never rebuild the tar", self._shadowed)

    def native_state(self) -> tuple[set[str], set[str], int]:
        """The sets and the line number the native fast path updates as :meth:`file` would."""
        return self._with_content, self._content_dirs, self._position

    def native_lines(self, lines: bytes, position: int, shadowed: str | None) -> None:
        """Lines the native fast path made (as :meth:`segment` and :meth:`file` would
        have), the next line number, and the first name it saw repeat one with content."""
        if shadowed is not None and self._shadowed is None:
            self._shadowed = shadowed
        self._position = position
        self._emit(lines)

    def segment(self, payload: bytes) -> None:
        if not payload:
            return
        self._emit(b'{"type":2,"payload":"' + b2a_base64(payload, newline=False)
                   + b'","position":' + str(self._position).encode() + b"}\n")
        self._position += 1

    def file(self, name: bytes, size: int, checksum: bytes | None, *, is_dir: bool = False) -> None:
        """Record an entry; ``checksum`` is the CRC-64 digest (None when size is 0).
        ``is_dir``: the entry is a directory, which merges with one already there;
        anything else put where a directory holding earlier content was removes that
        content, so the tar could never be rebuilt (refused as a shadowing repeat)."""
        try:
            text: str | None = name.decode("utf-8")
            shown = text
        except UnicodeDecodeError:
            text = None
            shown = name.decode("utf-8", "surrogateescape")
        key = _clean_key(shown)
        if self._shadowed is None and (key in self._with_content
                                       or (not is_dir and key in self._content_dirs)):
            self._shadowed = shown
        if size:
            self._with_content.add(key)
            parent = posixpath.dirname(key)
            while parent and parent not in self._content_dirs:  # amortised: siblings stop at once
                self._content_dirs.add(parent)
                parent = posixpath.dirname(parent)
        elif self._shadowed is None:
            base = posixpath.basename(key)
            if base.startswith(".wh.") and base != ".wh..wh..opq":
                gone = posixpath.join(posixpath.dirname(key), base[4:])
                if gone in self._with_content or gone in self._content_dirs:
                    self._shadowed = shown
        if text is None:
            head = b'{"type":1,"name_raw":"' + b2a_base64(name, newline=False) + b'"'
        elif text:
            head = b'{"type":1,"name":' + _json_str(text).encode("utf-8")
        else:
            head = b'{"type":1'
        if size:
            head += b',"size":' + str(size).encode()
        if checksum is None:
            head += b',"payload":null'
        else:
            head += b',"payload":"' + b2a_base64(checksum, newline=False) + b'"'
        self._emit(head + b',"position":' + str(self._position).encode() + b"}\n")
        self._position += 1


# -- reading a tar while recording it ---------------------------------------------------


class RecordingReader:
    """Reads a tar entry by entry while writing its tar-split to ``out`` (if given).

    For importers that take some entries' data and not others (the Windows layer
    importer): data copied out with :meth:`copy_data` is recorded by size and CRC-64,
    to be read back from the layer; data the caller leaves unread stays in the record as
    raw bytes, so the tar is rebuilt exactly either way. Adjacent raw bytes are joined
    into one segment, cut at 1 MiB. :func:`lamina.archive.apply.apply_tar`
    records inline instead, on its hot path.
    """

    def __init__(self, stream: IO[bytes], out: IO[bytes] | None = None) -> None:
        self._reader = TarReader(stream, record=out is not None)
        self._split = TarSplitWriter(out) if out is not None else None
        self._entries = iter(self._reader)
        self._pending = bytearray()  # raw bytes not yet written as a segment
        self._current: TarEntry | None = None
        self._filed = True  # whether the current entry's file record is written
        self.done = False

    def next(self) -> TarEntry | None:
        """The next entry, after what is left of the current one; None at the end."""
        if self.done:
            return None
        self._finish_current()
        entry = next(self._entries, None)
        if entry is None:
            self.done = True
            self._segment(self._reader.end_raw)
            for chunk in self._reader.trailing():
                self._segment(chunk)
            self._flush()
            return None
        self._segment(entry.raw or b"")
        self._current = entry
        self._filed = False
        return entry

    @property
    def data_size(self) -> int:
        """Bytes of data the current entry has left to read."""
        return self._reader.remaining

    def copy_data(self, write: Callable[[memoryview], object]) -> int:
        """Copy the current entry's data to ``write`` (slices valid during the call),
        recording it as content the layer will serve back. Returns the byte count."""
        crc = Crc64()
        total = 0
        for chunk in self._reader.data():
            crc.update(chunk)
            write(chunk)
            total += len(chunk)
        self._file(total, crc.digest() if total else None)
        return total

    def _finish_current(self) -> None:
        if self._current is None:
            return
        self._file(0, None)
        if self._split is None:
            self._reader.skip()
        else:
            for chunk in self._reader.data():
                self._segment(bytes(chunk))
        self._current = None

    def _file(self, size: int, checksum: bytes | None) -> None:
        if self._split is not None and self._current is not None and not self._filed:
            self._flush()
            self._split.file(self._current.name_bytes, size, checksum, is_dir=self._current.type == DIR)
        self._filed = True

    def _segment(self, raw: bytes) -> None:
        """Add raw bytes to the record, cut into segments of exactly 1 MiB."""
        if self._split is not None:
            pending = self._pending
            pending += raw
            while len(pending) >= _CHUNK:
                self._split.segment(bytes(pending[:_CHUNK]))
                del pending[:_CHUNK]

    def _flush(self) -> None:
        if self._split is not None and self._pending:
            self._split.segment(bytes(self._pending))
            self._pending.clear()
