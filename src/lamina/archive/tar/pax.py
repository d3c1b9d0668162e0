"""PAX extended headers: ``"LEN KEY=VALUE\\n"`` records, and the numbers and times in them.

Used by the tar reader and writer, and by the Windows layer code, which keeps each
file's Windows records in the same encoding (:mod:`lamina.drivers.windowsfilter_meta`).
Keys are text (UTF-8); values stay bytes, since xattr values are binary.

Times are decimal seconds with an optional sign and fraction, read with Go's rules (a
fraction is padded or cut to nine digits; a negative time is sign and magnitude) and
written exactly as Go writes them, so a time read and written again keeps its bytes.
All arithmetic is on integer nanoseconds: a float cannot hold 100 ns steps (Windows'
FILETIME) at today's dates.
"""

from __future__ import annotations

from collections.abc import Mapping

from lamina.errors import InvalidArchive

_NS = 1_000_000_000


def parse_records(data: bytes, name: str | None) -> dict[str, bytes]:
    """Split PAX extended-header data into records (a later key wins, as in Go).

    NUL padding after the last record, which some writers leave, is allowed.
    ``name`` only names the culprit in errors.
    """
    records: dict[str, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos] == 0 and not data[pos:].strip(b"\0"):
            break
        space = data.find(b" ", pos, pos + 24)
        if space < 0 or not data[pos:space].isdigit():
            raise InvalidArchive("malformed PAX record (no length)", name)
        length = int(data[pos:space])
        stop = pos + length
        if length <= space - pos + 1 or stop > end or data[stop - 1] != 0x0A:
            raise InvalidArchive("malformed PAX record (bad length)", name)
        key, eq, value = data[space + 1:stop - 1].partition(b"=")
        if not eq or not key:
            raise InvalidArchive("malformed PAX record (no key)", name)
        try:
            records[key.decode("utf-8")] = value
        except UnicodeDecodeError:
            raise InvalidArchive("malformed PAX record (key not UTF-8)", name) from None
        pos = stop
    return records


def record(key: bytes, value: bytes) -> bytes:
    """One ``"<len> <key>=<value>\\n"`` record; ``len`` counts the whole record itself."""
    body = b" %s=%s\n" % (key, value)
    n = len(body)
    total = n + len(str(n))
    if len(str(total)) != len(str(n)):
        total = n + len(str(total))
    return b"%d%s" % (total, body)


def encode_records(records: Mapping[bytes, bytes]) -> bytes:
    """Records sorted by key, as Go writes them (the same entry always gives the same
    bytes)."""
    return b"".join(record(k, records[k]) for k in sorted(records))


def encode_text_records(records: Mapping[str, str]) -> bytes:
    """:func:`encode_records` for text keys and values (kept bytes: surrogateescape)."""
    return encode_records({k.encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape")
                           for k, v in records.items()})


def decode_text(value: bytes) -> str:
    """A record value as text; bytes that are not UTF-8 survive as surrogates."""
    return value.decode("utf-8", "surrogateescape")


def parse_text_records(data: bytes, name: str | None) -> dict[str, str]:
    """:func:`parse_records` with the values as text (:func:`decode_text`)."""
    return {k: decode_text(v) for k, v in parse_records(data, name).items()}


def format_time(ns: int) -> str:
    """A PAX time string exactly as Go's archive/tar writes it."""
    secs, nsecs = divmod(ns, _NS)
    if nsecs == 0:
        return str(secs)
    sign = ""
    if secs < 0:
        sign, secs, nsecs = "-", -(secs + 1), _NS - nsecs
    return f"{sign}{secs}.{nsecs:09d}".rstrip("0")


def parse_time(value: bytes | str) -> int:
    """Nanoseconds from a PAX time string, with Go's rules; ValueError if it is not one.

    Go reads the seconds as a signed 64-bit decimal (so ``+1`` is allowed, and a value
    past 64 bits is not) and the fraction as digits, possibly none (``1.``).
    """
    if value.__class__ is str:
        value = value.encode("utf-8", "surrogateescape")  # type: ignore[union-attr]
    whole, _, frac = value.partition(b".")  # type: ignore[arg-type]
    if whole.isdigit() and len(whole) < 19:  # the common case, fast
        secs = int(whole)
    else:
        secs = parse_int(whole)
    if not frac:
        return secs * _NS
    if not frac.isdigit():
        raise ValueError(f"invalid PAX time {value!r}")
    nsecs = int(frac[:9].ljust(9, b"0"))
    if whole.startswith(b"-"):
        return secs * _NS - nsecs
    return secs * _NS + nsecs


def parse_int(value: bytes) -> int:
    """A PAX decimal number (``size``, ``uid``, ``gid``, a time's seconds), as Go reads
    it: a signed 64-bit decimal; ValueError if it is not one."""
    digits = value[1:] if value[:1] in (b"-", b"+") else value
    if not digits.isdigit():
        raise ValueError(f"invalid PAX number {value[:24]!r}")
    # the length test first: int() of a 100,000-digit string is slow, then refused
    if len(digits.lstrip(b"0")) > 19:
        raise ValueError(f"PAX number {value[:24]!r}... does not fit in 64 bits")
    number = int(value)
    if not -(1 << 63) <= number < 1 << 63:
        raise ValueError(f"PAX number {value!r} does not fit in 64 bits")
    return number
