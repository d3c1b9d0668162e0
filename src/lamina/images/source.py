"""Random access to the files of an image archive: a tar file or a directory.

Why an index and not one pass over the tar: ``docker save`` writes ``manifest.json``
*after* the layers (its tar is made by walking a directory in name order), so the
loader cannot know which layer is the base until it has seen the end of the archive.
For a tar on disk we read only the headers first (seeking over the data, which costs
nothing), then read each layer straight from its offset in the file: the layer bytes
are read once, directly into the apply. Only a stream (stdin, a pipe) or a compressed
archive is first copied, decompressed, to a temporary file in the store's ``tmp/``;
``docker load`` copies every archive that way.

Names inside an archive are untrusted: lookups are by normalised name in the index, so
nothing a manifest says can reach a file outside the archive. Symlinks and hardlinks
between members (``docker save`` links a layer that occurs twice) are followed inside
the archive only.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from lamina import compression as compress
from lamina.errors import ImageError
from lamina.streams import CountingReader

#: the largest JSON document (manifest, config, index) read into memory
MAX_JSON = 64 << 20
_MAX_LINKS = 40
_SPOOL_CHUNK = 1 << 20


class Source(Protocol):
    """The files of one archive, by their names inside it."""

    #: how errors name the archive ("image.tar", "stdin", "layout/")
    label: str
    #: whether several members can be read at once, each from its own reader, so that
    #: layers can be unpacked side by side (taken as False where a source lacks it)
    concurrent: bool

    def has(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def open(self, name: str) -> IO[bytes]:
        """A raw reader of the member's bytes (``readinto`` works; close it)."""
        ...

    def names(self) -> list[str]: ...


def clean_name(name: str) -> str | None:
    """The normal form of a member name, or None if it points outside the archive."""
    name = name.replace("\\", "/").lstrip("/")
    norm = posixpath.normpath(name) if name else "."
    if norm == "." or norm == ".." or norm.startswith("../"):
        return None
    return norm


def explain_missing(src: Source, name: str, where: str = "archive") -> str:
    """Why ``src`` has no readable ``name`` (to follow the name in a message), as the
    source can tell: a link that leads outside it is not "missing"."""
    explain = getattr(src, "explain_missing", None)
    return explain(name) if explain is not None else f"missing from the {where}"


def read_json_bytes(src: Source, name: str, what: str) -> bytes:
    """The bytes of a small member (a JSON document), refusing absurd sizes."""
    if not src.has(name):
        raise ImageError(f"{src.label}: {what} {name} {explain_missing(src, name)}")
    size = src.size(name)
    if size > MAX_JSON:
        raise ImageError(f"{src.label}: {what} {name} is {size} bytes; refusing more than {MAX_JSON}")
    with src.open(name) as f:
        data = f.read()
    if len(data) != size:
        raise ImageError(f"{src.label}: {what} {name} is truncated")
    return data


class RegionReader(io.RawIOBase):
    """Reads ``length`` bytes at ``offset`` of an open file descriptor with pread.

    pread keeps no shared file position, so several regions of one archive can be read
    in any order. Reading past the end of the file before ``length`` bytes is an error:
    the archive was truncated.
    """

    def __init__(self, fd: int, offset: int, length: int, what: str) -> None:
        super().__init__()
        self._fd = fd
        self._pos = offset
        self._left = length
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        view = memoryview(b)
        if len(view) > self._left:
            view = view[: self._left]
        n = os.preadv(self._fd, [view], self._pos)
        if n == 0:
            raise ImageError(f"{self._what}: archive is truncated ({self._left} bytes missing)")
        self._pos += n
        self._left -= n
        return n


#: the target of a link member that climbs out of the archive (a name no member has)
_OUTSIDE = "\0outside"


@dataclass(frozen=True)
class _Member:
    offset: int
    size: int
    link: str | None = None  # normalised target of a symlink or hardlink


class TarSource:
    """An uncompressed tar file on disk (seekable), indexed by member name."""

    #: members are read with pread, no shared position: any number at once
    concurrent = True

    def __init__(self, f: IO[bytes], label: str) -> None:
        self.label = label
        self._f = f
        self._fd = f.fileno()
        self._members: dict[str, _Member] = {}
        self._index()

    def _index(self) -> None:
        file_size = os.fstat(self._fd).st_size
        self._f.seek(0)
        try:
            tf = tarfile.open(fileobj=self._f, mode="r:")  # type: ignore[arg-type]
        except tarfile.TarError as e:
            raise ImageError(f"{self.label}: not a tar archive ({e})") from e
        last = None
        try:
            for info in tf:
                name = clean_name(info.name)
                last = info.name
                if name is None:
                    continue
                if info.isreg():
                    if info.offset_data + info.size > file_size:
                        raise ImageError(f"{self.label}: archive is truncated inside {info.name}")
                    self._members[name] = _Member(info.offset_data, info.size)
                elif info.issym():
                    base = posixpath.dirname(name)
                    target = clean_name(posixpath.join(base, info.linkname)
                                        if not info.linkname.startswith("/") else info.linkname)
                    self._members[name] = _Member(0, 0, target if target is not None else _OUTSIDE)
                elif info.islnk():
                    target = clean_name(info.linkname)
                    self._members[name] = _Member(0, 0, target if target is not None else _OUTSIDE)
            end = tf.offset
        except tarfile.TarError as e:
            raise ImageError(f"{self.label}: archive is truncated or damaged after {last or 'its start'} ({e})") from e
        if not self._members and end == 0:
            raise ImageError(f"{self.label}: empty archive")
        # tarfile stops quietly at a header cut short; what follows the last member must
        # be the end-of-archive zeros (or nothing), else the file was truncated there
        tail = os.pread(self._fd, 4096, end)
        if tail.strip(b"\0"):
            raise ImageError(f"{self.label}: archive is truncated or damaged after {last or 'its start'}")

    def _resolve(self, name: str) -> _Member | None:
        norm = clean_name(name)
        for _ in range(_MAX_LINKS):
            if norm is None:
                return None
            m = self._members.get(norm)
            if m is None or m.link is None:
                return m
            norm = m.link
        return None

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def explain_missing(self, name: str) -> str:
        """Why ``name`` cannot be read: missing, or a link that climbs out of the archive."""
        norm = clean_name(name)
        for _ in range(_MAX_LINKS):
            m = self._members.get(norm) if norm is not None else None
            if m is None or m.link is None:
                break
            if m.link == _OUTSIDE:
                return "is a link that leads outside the archive; refusing to follow it"
            norm = m.link
        return "missing from the archive"

    def size(self, name: str) -> int:
        m = self._resolve(name)
        if m is None:
            raise ImageError(f"{self.label}: {name} {self.explain_missing(name)}")
        return m.size

    def open(self, name: str) -> IO[bytes]:
        m = self._resolve(name)
        if m is None:
            raise ImageError(f"{self.label}: {name} {self.explain_missing(name)}")
        return RegionReader(self._fd, m.offset, m.size, f"{self.label}: {name}")  # type: ignore[return-value]

    def names(self) -> list[str]:
        return sorted(self._members)


class DirSource:
    """An archive unpacked in a directory (an OCI image layout, usually)."""

    #: each member is a file of its own
    concurrent = True

    def __init__(self, root: Path, label: str | None = None) -> None:
        self.root = root.resolve()
        self.label = label or str(root)

    def _path(self, name: str) -> Path | None:
        norm = clean_name(name)
        if norm is None:
            return None
        path = Path(os.path.realpath(self.root / norm))
        if path != self.root and self.root not in path.parents:
            return None  # a symlink in the layout that leads out of it: never read
        try:
            st = path.stat()
        except OSError:
            return None
        return path if stat.S_ISREG(st.st_mode) else None

    def has(self, name: str) -> bool:
        return self._path(name) is not None

    def explain_missing(self, name: str) -> str:
        """Why ``name`` cannot be read: a symlink that leads out of the layout is there,
        and is where it must not be, so it is not called missing."""
        norm = clean_name(name)
        if norm is not None:
            path = Path(os.path.realpath(self.root / norm))
            if path != self.root and self.root not in path.parents:
                return f"is a symlink that leads outside the layout (to {path}); refusing to read it"
        return "missing from the layout"

    def size(self, name: str) -> int:
        path = self._path(name)
        if path is None:
            raise ImageError(f"{self.label}: {name} {self.explain_missing(name)}")
        return path.stat().st_size

    def open(self, name: str) -> IO[bytes]:
        path = self._path(name)
        if path is None:
            raise ImageError(f"{self.label}: {name} {self.explain_missing(name)}")
        return open(path, "rb", buffering=0)

    def names(self) -> list[str]:
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                out.append(os.path.relpath(os.path.join(dirpath, f), self.root))
        return sorted(out)


def _spool(src: IO[bytes], tmpdir: Path, label: str,
           progress: Callable[[int], None] | None) -> IO[bytes]:
    """Copy ``src`` (decompressed if it is compressed) into an anonymous temp file."""
    buffered = src if hasattr(src, "peek") else io.BufferedReader(src, _SPOOL_CHUNK)  # type: ignore[arg-type]
    head = buffered.peek(compress.SNIFF_BYTES)[: compress.SNIFF_BYTES]  # type: ignore[attr-defined]
    counted: IO[bytes] = CountingReader(buffered, progress) if progress else buffered  # type: ignore[assignment]
    stream = compress.decompressed(counted, compress.sniff(head), label)
    tmpdir.mkdir(parents=True, exist_ok=True)
    out = tempfile.TemporaryFile(dir=tmpdir, prefix="image-load-")
    try:
        buf = bytearray(_SPOOL_CHUNK)
        while True:
            n = stream.readinto(buf)  # type: ignore[attr-defined]
            if not n:
                break
            out.write(memoryview(buf)[:n])
        out.flush()
    except BaseException:
        out.close()
        raise
    return out


@contextlib.contextmanager
def open_source(path: str | Path | None, *, stdin: IO[bytes] | None = None, tmpdir: Path,
                progress: Callable[[int], None] | None = None) -> Iterator[Source]:
    """Open an archive given as a path (a tar or a directory) or as a stream.

    ``path`` ``None`` or ``"-"`` reads ``stdin``. A regular uncompressed tar is used in
    place; a stream or a compressed tar is spooled into ``tmpdir`` first (``progress``
    gets the bytes read while spooling).
    """
    with contextlib.ExitStack() as stack:
        if path is None or str(path) == "-":
            if stdin is None:
                raise ImageError("no archive given")
            label = "stdin"
            f: IO[bytes] = stdin
        else:
            label = str(path)
            p = Path(path)
            if p.is_dir():
                yield DirSource(p, label)
                return
            try:
                f = stack.enter_context(open(p, "rb"))
            except OSError as e:
                raise ImageError(f"cannot read {path}: {e.strerror}") from e
        seekable = False
        with contextlib.suppress(OSError, AttributeError, io.UnsupportedOperation, ValueError):
            st = os.fstat(f.fileno())
            seekable = stat.S_ISREG(st.st_mode)
        if seekable:
            head = os.pread(f.fileno(), compress.SNIFF_BYTES, 0)
            seekable = compress.sniff(head) == compress.NONE
        if not seekable:
            f = stack.enter_context(_spool(f, tmpdir, label, progress))
        yield TarSource(f, label)
