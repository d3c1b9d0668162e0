"""Raw tar blocks, written by hand so that tests can express what no honest writer would:
wrong checksums, lying size fields, malformed PAX records, traversal in every field.

Independent of lamina's own reader and writer on purpose: a bug shared by the code under
test and the code that makes its test input would hide itself.
"""

from __future__ import annotations

BLOCK = 512
REG, LNK, SYM, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
PAX, GLOBAL_PAX, GNU_LONGNAME, GNU_LONGLINK = b"x", b"g", b"L", b"K"


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def header(name: str | bytes, typeflag: bytes = REG, size: int = 0, *, linkname: str | bytes = b"",
           mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 1_700_000_000,
           devmajor: int = 0, devminor: int = 0, checksum_delta: int = 0,
           size_field: bytes | None = None) -> bytes:
    """One ustar header block. ``checksum_delta`` corrupts the checksum on purpose;
    ``size_field`` replaces the 12-byte size field verbatim (e.g. base-256 or garbage)."""
    name_b = name.encode() if isinstance(name, str) else name
    link_b = linkname.encode() if isinstance(linkname, str) else linkname
    prefix = b""
    if len(name_b) > 100 and b"/" in name_b[:156]:
        cut = name_b.rfind(b"/", 0, 156)
        prefix, name_b = name_b[:cut], name_b[cut + 1 :]
    h = bytearray(BLOCK)
    h[0:100] = name_b[:100].ljust(100, b"\0")
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(uid, 8)
    h[116:124] = _octal(gid, 8)
    h[124:136] = size_field if size_field is not None else _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:257] = link_b[:100].ljust(100, b"\0")
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[329:337] = _octal(devmajor, 8)
    h[337:345] = _octal(devminor, 8)
    h[345:500] = prefix[:155].ljust(155, b"\0")
    chk = sum(h) + checksum_delta
    h[148:156] = f"{chk:06o}".encode() + b"\0 "
    return bytes(h)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def entry(name: str | bytes, data: bytes = b"", typeflag: bytes = REG, **kw: object) -> bytes:
    return header(name, typeflag, len(data) if typeflag == REG else 0, **kw) + pad(data)  # type: ignore[arg-type]


def pax_record(key: str | bytes, value: str | bytes) -> bytes:
    k = key.encode() if isinstance(key, str) else key
    v = value.encode() if isinstance(value, str) else value
    body = b" " + k + b"=" + v + b"\n"
    n = len(body)
    while True:
        line = str(n + len(str(n))).encode() + body
        if len(line) == n + len(str(n)):
            return line
        n += 1


def pax(records: bytes, name: str = "PaxHeader", global_: bool = False) -> bytes:
    return header(name, GLOBAL_PAX if global_ else PAX, len(records)) + pad(records)


def gnu_longname(name: bytes, link: bool = False) -> bytes:
    data = name + b"\0"
    return header("././@LongLink", GNU_LONGLINK if link else GNU_LONGNAME, len(data)) + pad(data)


def end() -> bytes:
    return b"\0" * (2 * BLOCK)


def tar(*entries: bytes) -> bytes:
    return b"".join(entries) + end()
