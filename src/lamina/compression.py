"""Recognise a compressed layer by its first bytes and decompress it as a stream.

A module of its own, not of :mod:`lamina.images`: ``lamina apply`` sniffs its input
too, and should not import the image loader to do it.

Why sniff and not trust the media type: docker-save archives carry no media types at
all, and OCI layouts written by hand or by older tools label gzip layers as plain tars
(and the reverse). ``docker load`` sniffs too (``archive.DecompressStream``), so lamina
accepts what Docker accepts: plain tar, gzip, zstd, and the bzip2 and xz that the
standard library reads for free.

gzip goes through ISA-L (:func:`gzip_reader`), the fastest here by 2.5x. Every
decompressor here works in bounded memory and reads concatenated streams (pigz and
zstd write several members/frames), and every one is followed by a digest check, so a
truncated or corrupted blob is always caught: if the decompressor does not notice,
the DiffID comparison does.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from typing import IO, Any

from lamina.errors import ImageError

NONE = "none"
GZIP = "gzip"
ZSTD = "zstd"
BZIP2 = "bzip2"
XZ = "xz"

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b\x08", GZIP),
    (b"\x28\xb5\x2f\xfd", ZSTD),
    (b"BZh", BZIP2),
    (b"\xfd7zXZ\x00", XZ),
)

#: how many leading bytes :func:`sniff` needs
SNIFF_BYTES = 6


def sniff(head: bytes) -> str:
    """The compression of a stream that starts with ``head``; ``"none"`` for anything else."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return NONE


def zstd_available() -> bool:
    """Whether zstd layers can be read here (the ``zstandard`` package is installed)."""
    try:
        import zstandard  # noqa: F401
    except ImportError:
        return False
    return True


def gzip_reader(src: IO[bytes]) -> IO[bytes]:
    """A reader of gzip stream ``src`` decompressed (every member, as pigz writes them).

    Through ISA-L's igzip (``isal``, pinned) where it is installed, else the standard
    library's zlib. Measured on bench_images' layers (327 MB of tar, gzip -6), CPU
    seconds per byte: igzip 800-860 MB/s, zlib-ng (``zlib-ng`` package) 620-650 MB/s,
    zlib 320-360 MB/s (bench/README.md; bench_images prints the figures of each run).
    Both readers check each member's CRC and length and refuse what follows that is no
    gzip member.
    """
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - isal is a pinned dependency
        return gzip.GzipFile(fileobj=src, mode="rb")  # type: ignore[return-value]
    return igzip.IGzipFile(fileobj=src, mode="rb")  # type: ignore[return-value]


def gzip_library() -> str:
    """Which library :func:`gzip_reader` decompresses with (the bench prints it)."""
    try:
        import isal
    except ImportError:  # pragma: no cover
        return "zlib (standard library)"
    return f"ISA-L igzip (isal {isal.__version__})"


def decompressed(src: IO[bytes], kind: str, what: str) -> IO[bytes]:
    """A raw reader of ``src`` decompressed according to ``kind`` (from :func:`sniff`).

    Damaged compressed data raises :class:`ImageError` naming ``what`` ("layer 2
    (abc/layer.tar)"); errors of ``src`` itself (a read failing) pass through unchanged.
    """
    if kind == NONE:
        return src
    if kind == GZIP:
        return _Guarded(gzip_reader(src), kind, what)  # type: ignore[return-value]
    if kind == BZIP2:
        return _Guarded(bz2.BZ2File(src, "rb"), kind, what)  # type: ignore[return-value]
    if kind == XZ:
        return _Guarded(lzma.LZMAFile(src, "rb"), kind, what)  # type: ignore[return-value]
    if kind == ZSTD:
        try:
            import zstandard
        except ImportError as e:
            raise ImageError(f"{what}: zstd-compressed, and the zstandard package is not installed") from e
        if not hasattr(src, "peek"):
            src = io.BufferedReader(src)  # type: ignore[arg-type]
        _check_zstd_window(src.peek(_ZSTD_HEADER)[:_ZSTD_HEADER], what)  # type: ignore[attr-defined]
        # read_across_frames: zstd -T writes several frames; closefd=False: the caller owns src
        reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
            src, read_size=1 << 20, read_across_frames=True, closefd=False)
        return _Guarded(reader, kind, what)  # type: ignore[return-value]
    raise ImageError(f"{what}: unknown compression {kind}")


#: the largest window a zstd frame may ask for: libzstd's own default limit (2^27), which
#: keeps a hostile frame from making each decompressor allocate gigabytes; ``zstd
#: --long=27`` and every level without ``--long`` stay under it
ZSTD_MAX_WINDOW = 1 << 27
_ZSTD_HEADER = 18  # the longest frame header


def _window_error(what: str, needs: int | None) -> ImageError:
    asked = f"a {_mib(needs)} window" if needs else "a window"
    return ImageError(f"{what}: a zstd frame needs {asked}, over the {_mib(ZSTD_MAX_WINDOW)} "
                      "limit of this decoder (compressed with zstd --long past 27?)")


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def _check_zstd_window(head: bytes, what: str) -> None:
    """Refuse, before decoding, a first frame whose window is over the limit: libzstd
    reports it only as 'too much memory', which reads like damage."""
    import zstandard

    try:
        window = zstandard.get_frame_parameters(head).window_size
    except zstandard.ZstdError:
        return  # too short or damaged: the decoder will say so
    if window > ZSTD_MAX_WINDOW:
        raise _window_error(what, window)


class _Guarded(io.RawIOBase):
    """Turns a decompressor's own errors into one-line :class:`ImageError`."""

    def __init__(self, reader: IO[bytes], kind: str, what: str) -> None:
        super().__init__()
        self._reader = reader
        self._kind = kind
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            return self._reader.readinto(b) or 0  # type: ignore[attr-defined]
        except ImageError:
            raise
        except _DECOMPRESS_ERRORS as e:
            if self._kind == ZSTD and "too much memory" in str(e):  # a later frame's window
                raise _window_error(self._what, None) from e
            raise ImageError(f"{self._what}: damaged {self._kind} data ({e or type(e).__name__})") from e


#: what the decompressors raise on damaged input
_DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (
    EOFError, OSError, lzma.LZMAError, zlib.error, ValueError)
try:  # pragma: no branch
    import zstandard as _zstd

    _DECOMPRESS_ERRORS += (_zstd.ZstdError,)
except ImportError:  # pragma: no cover
    pass
try:  # pragma: no branch
    from isal import isal_zlib as _isal_zlib

    _DECOMPRESS_ERRORS += (_isal_zlib.error,)
except ImportError:  # pragma: no cover
    pass

#: public name for code that drives a decompressor itself (the CLI's ``apply``); readers
#: from :func:`decompressed` already turn these into ImageError
DECOMPRESS_ERRORS = _DECOMPRESS_ERRORS


#: gzip level for layers lamina compresses (image push): ISA-L's igzip at its level 1
#: makes gzip at ~350 MB/s a core here, 12x zlib's default level, for 15% larger blobs
GZIP_LEVEL = 1


def compressor(kind: str, level: int | None = None) -> Any:
    """An object with ``compress(data) -> bytes`` and ``flush() -> bytes`` writing ``kind``.

    gzip through ISA-L (``isal``) where it is installed, else zlib; zstd through
    ``zstandard``. Both release the GIL while they work, so layers compress side by side.
    """
    if kind == GZIP:
        try:
            from isal import isal_zlib

            lvl = min(GZIP_LEVEL if level is None else level, isal_zlib.ISAL_BEST_COMPRESSION)
            return isal_zlib.compressobj(lvl, isal_zlib.DEFLATED, 31)
        except ImportError:
            return zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)
    if kind == ZSTD:
        import zstandard

        return zstandard.ZstdCompressor(level=3 if level is None else level).compressobj()
    raise ImageError(f"cannot compress to {kind}")
