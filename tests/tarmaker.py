"""A tiny tar writer for tests, built from raw bytes so tests can also make broken tars.

Independent of lamina's reader on purpose: a test that made its tar with the code under
test could not catch that code's mistakes. Every field can be overridden (a wrong
checksum, a size that lies, a base-256 number), and meta headers (PAX, GNU long names)
are separate calls so they can be malformed too.
"""

from __future__ import annotations

BLOCK = 512


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def base256(value: int, width: int) -> bytes:
    """A numeric field in GNU base-256 (top bit set, two's complement)."""
    raw = (value % (1 << (8 * width - 1))).to_bytes(width, "big")
    return bytes([raw[0] | 0x80]) + raw[1:]


def _field(value: bytes, width: int) -> bytes:
    assert len(value) <= width, (value, width)
    return value + bytes(width - len(value))


def header(name: str | bytes, *, type: bytes = b"0", size: int = 0, mode: int = 0o644,
           uid: int = 0, gid: int = 0, mtime: int = 1_600_000_000,
           linkname: str | bytes = b"", magic: bytes = b"ustar\x0000",
           uname: bytes = b"", gname: bytes = b"", devmajor: int = 0, devminor: int = 0,
           prefix: bytes = b"", raw_fields: dict[str, bytes] | None = None,
           checksum: int | None = None) -> bytes:
    """One 512-byte header. ``raw_fields`` replaces a numeric field's bytes verbatim
    (``{"size": base256(...)}``); ``checksum`` forces a (wrong) checksum."""
    if isinstance(name, str):
        name = name.encode()
    if isinstance(linkname, str):
        linkname = linkname.encode()
    raw = raw_fields or {}
    fields = [
        _field(name, 100),
        raw.get("mode", _octal(mode, 8)),
        raw.get("uid", _octal(uid, 8)),
        raw.get("gid", _octal(gid, 8)),
        raw.get("size", _octal(size, 12)),
        raw.get("mtime", _octal(mtime, 12)),
        b" " * 8,
        type,
        _field(linkname, 100),
        magic,
        _field(uname, 32),
        _field(gname, 32),
        raw.get("devmajor", _octal(devmajor, 8)),
        raw.get("devminor", _octal(devminor, 8)),
        _field(prefix, 155),
        bytes(12),
    ]
    block = bytearray(b"".join(fields))
    assert len(block) == BLOCK
    total = sum(block) if checksum is None else checksum
    block[148:156] = f"{total:06o}".encode() + b"\0 "
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def entry(name: str | bytes, data: bytes = b"", **kw: object) -> bytes:
    """A header (size from ``data`` unless given) followed by the padded data."""
    kw.setdefault("size", len(data))
    return header(name, **kw) + pad(data)  # type: ignore[arg-type]


def pax_records(records: dict[str, bytes | str]) -> bytes:
    """PAX extended-header data: ``"LEN KEY=VALUE\\n"`` records, LEN counting itself."""
    out = b""
    for key, value in records.items():
        if isinstance(value, str):
            value = value.encode()
        body = b" " + key.encode() + b"=" + value + b"\n"
        length = len(body) + 1
        while len(str(length)) + len(body) != length:
            length += 1
        out += str(length).encode() + body
    return out


def pax(records: dict[str, bytes | str] | bytes, *, name: str = "PaxHeaders/x",
        type: bytes = b"x") -> bytes:
    """A PAX header (``type=b"g"`` for a global one) with its padded data; pass bytes
    to write malformed data verbatim."""
    data = records if isinstance(records, bytes) else pax_records(records)
    return header(name, type=type, size=len(data)) + pad(data)


def gnu_long(kind: bytes, value: str | bytes) -> bytes:
    """A GNU ``L`` (long name) or ``K`` (long link name) meta entry."""
    if isinstance(value, str):
        value = value.encode()
    data = value + b"\0"
    return header("././@LongLink", type=kind, size=len(data), magic=b"ustar  \0") + pad(data)


def end() -> bytes:
    """The two zero blocks that end an archive."""
    return bytes(2 * BLOCK)


def file(name: str, data: bytes = b"", **kw: object) -> bytes:
    return entry(name, data, **kw)


def directory(name: str, mode: int = 0o755, **kw: object) -> bytes:
    return header(name, type=b"5", mode=mode, **kw)  # type: ignore[arg-type]


def symlink(name: str, target: str, **kw: object) -> bytes:
    return header(name, type=b"2", linkname=target, mode=0o777, **kw)  # type: ignore[arg-type]


def hardlink(name: str, target: str, **kw: object) -> bytes:
    return header(name, type=b"1", linkname=target, **kw)  # type: ignore[arg-type]


def tar(*parts: bytes) -> bytes:
    """Entries joined and ended with the two zero blocks."""
    return b"".join(parts) + end()
