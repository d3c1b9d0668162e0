"""The tar block: its size, its fields, its type flags, and how numbers sit in it.

One place for the facts both directions need, so the reader and the writer cannot drift
apart: a header is one 512-byte block (POSIX ustar, with GNU's and star's variants of
the last 155 bytes); numeric fields are octal text or, with the top bit set, GNU
base-256; every entry's data is padded with zeros to a whole block; two zero blocks end
the archive.
"""

from __future__ import annotations

import struct

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
#: what ends an archive: two zero blocks
END_OF_ARCHIVE = bytes(2 * BLOCK)

#: PADDING[size % 512]: the zero bytes that complete the last block of file data
PADDING = tuple(bytes(-i % BLOCK) for i in range(BLOCK))


def padding(size: int) -> bytes:
    """The zero bytes that complete the last block of ``size`` bytes of file data."""
    return PADDING[size % BLOCK]


# -- type flags: as the byte the writer puts in a header, and as its int value (the
# reader compares ints, which is cheaper than slicing a byte out of the block) --------

REGTYPE = b"0"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
XHDTYPE = b"x"
XGLTYPE = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"
GNU_SPARSE = b"S"

REG = REGTYPE[0]
LNK = LNKTYPE[0]
SYM = SYMTYPE[0]
CHR = CHRTYPE[0]
BLK = BLKTYPE[0]
DIR = DIRTYPE[0]
FIFO = FIFOTYPE[0]
CONT = CONTTYPE[0]
#: a PAX global header; the reader hands it out as an entry of its own (as Go does)
GLOBAL = XGLTYPE[0]
PAX = XHDTYPE[0]
LONGNAME = GNU_LONGNAME[0]
LONGLINK = GNU_LONGLINK[0]
SPARSE = GNU_SPARSE[0]
#: a NUL type flag: a regular file, or a directory if the name ends in "/" (pre-POSIX)
OLD_REG = 0

#: types that never carry data, whatever their size field says (as in Go)
HEADER_ONLY = frozenset({LNK, SYM, CHR, BLK, DIR, FIFO})
#: headers that only describe the next header
META = frozenset({PAX, GLOBAL, LONGNAME, LONGLINK})

# -- fields -----------------------------------------------------------------------------

#: name mode uid gid size mtime chksum type linkname magic(6) version(2) uname gname
#: devmajor devminor prefix(155) [12 unused]
HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
CHECKSUM_FIELD = slice(148, 156)
#: ustar's magic; POSIX puts version "00" after it, but readers (Go's too) go by the
#: magic alone
USTAR_MAGIC = b"ustar\x00"
USTAR_VERSION = b"00"
#: old GNU tar's magic and version, one 8-byte run: no prefix field, atime/ctime there
GNU_MAGIC = b"ustar "
GNU_VERSION = b" \x00"
#: star writes this at offset 508; its prefix field is then 131 bytes, times after it
STAR_TRAILER = b"tar\x00"
STAR_PREFIX_SIZE = 131
NAME_SIZE = 100
PREFIX_SIZE = 155

#: PAX and GNU long-name data larger than this is refused (Go's limit too)
MAX_META_SIZE = 1 << 20
#: Go reads every number into an int64; a value past it is refused there, and here
MAX_INT64 = (1 << 63) - 1
#: a size no real entry can have; larger ones are hostile
MAX_ENTRY_SIZE = MAX_INT64

#: what ends a numeric field's digits: strip it, then read octal (the fast path)
NUM_PAD = b" \0"


def signed_sum(block: bytes | bytearray) -> int:
    """The header sum with bytes read as signed, as some old tars computed it."""
    total = 256
    for i, b in enumerate(block):
        if not 148 <= i < 156:
            total += b - 256 if b > 127 else b
    return total


def unsigned_sum(block: bytes | bytearray) -> int:
    """The header sum POSIX defines: every byte, the checksum field counted as spaces."""
    return sum(block) - sum(block[CHECKSUM_FIELD]) + 256


def number(field: bytes) -> int:
    """A numeric field: octal text (NULs and spaces around it), or GNU base-256 when the
    top bit is set (two's complement). ValueError if it is neither, or if it does not
    fit the int64 Go reads every number into (a tar Docker refuses is refused here)."""
    if field[0] & 0x80:
        bits = 8 * len(field) - 1
        value = int.from_bytes(field, "big") & ((1 << bits) - 1)
        if value >> (bits - 1):  # two's complement sign bit
            value -= 1 << bits
        if not -MAX_INT64 - 1 <= value <= MAX_INT64:
            raise ValueError("base-256 number past 64 bits")
        return value
    text = field.strip(b" \x00")
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError("not an octal number")
    return int(text, 8)  # ValueError for 8 and 9
