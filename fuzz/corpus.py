"""The hostile-tar corpus: broken and malicious layer tars, each with what must happen.

``error``: applying must fail with InvalidArchive naming ``culprit`` (a substring of the
message), and leave no layer. ``contained``: applying may succeed or fail cleanly, but
nothing outside the layer may change and no half layer may stay. Every case also runs
with a canary file beside the store, which must stay untouched.

``python -m fuzz.corpus DIR`` writes the corpus as files (the fuzzer's seeds).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fuzz.rawtar import (
    BLK,
    CHR,
    DIR,
    FIFO,
    LNK,
    REG,
    SYM,
    end,
    entry,
    gnu_longname,
    header,
    pax,
    pax_record,
    tar,
)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expect: str  # "error" or "contained"
    culprit: str = ""
    needs_parent: bool = False  # apply over a parent layer holding /etc/passwd and /lib -> usr/lib


def cases() -> Iterator[Case]:
    ok = entry("ok.txt", b"fine\n")
    # -- traversal in names ----------------------------------------------------------
    yield Case("dotdot-name", tar(ok, entry("../escape.txt", b"x")), "error", "../escape.txt")
    yield Case("dotdot-deep", tar(entry("a/../../escape.txt", b"x")), "error", "escape.txt")
    yield Case("dotdot-dir", tar(entry("../evil", typeflag=DIR, mode=0o755)), "error", "../evil")
    yield Case("absolute-name", tar(entry("/etc/evil", b"x")), "error", "/etc/evil")
    yield Case("absolute-dir", tar(entry("/tmp/evil-dir", typeflag=DIR)), "error", "/tmp/evil-dir")
    yield Case("pax-path-dotdot", tar(pax(pax_record("path", "../pax-escape")), entry("innocent", b"x")),
               "error", "pax-escape")
    yield Case("pax-path-absolute", tar(pax(pax_record("path", "/pax-abs")), entry("innocent", b"x")),
               "error", "/pax-abs")
    yield Case("gnu-longname-dotdot", tar(gnu_longname(b"../" * 40 + b"longescape"), entry("short", b"x")),
               "error", "longescape")
    yield Case("prefix-field-dotdot", tar(header(b"a" * 50 + b"/" + b"../" * 30 + b"x" * 20, REG, 0) + end()[:0]),
               "error", "..")
    # -- symlinks --------------------------------------------------------------------
    yield Case("symlink-then-write", tar(entry("link", typeflag=SYM, linkname="/tmp/lamina-hostile-canary"), entry("link/etc-evil", b"x")),
               "error", "link/etc-evil")
    yield Case("symlink-dotdot-then-write",
               tar(entry("up", typeflag=SYM, linkname="../../.."), entry("up/evil", b"x")), "error", "up/evil")
    yield Case("symlink-dir-then-mkdir",
               tar(entry("d", typeflag=SYM, linkname="/tmp/lamina-hostile-canary"), entry("d/sub", typeflag=DIR)), "error", "d/sub")
    yield Case("symlink-then-hardlink-through",
               tar(entry("s", typeflag=SYM, linkname="/tmp/lamina-hostile-canary"), entry("h", typeflag=LNK, linkname="s/passwd")),
               "error", "h")
    yield Case("symlink-replaced-by-file-write", tar(entry("x", typeflag=SYM, linkname="/tmp/lamina-hostile-canary/passwd"),
                                                    entry("x", b"overwrite\n")), "contained")
    yield Case("symlink-in-parent-layer", tar(entry("lib/evil.so", b"x")), "error", "lib/evil.so",
               needs_parent=True)
    yield Case("symlink-target-absolute-ok", tar(entry("abs", typeflag=SYM, linkname="/tmp/lamina-hostile-canary/passwd")), "contained")
    yield Case("symlink-long-target", tar(pax(pax_record("linkpath", "../" * 500)),
                                          entry("lnk", typeflag=SYM)), "contained")
    # -- hardlinks --------------------------------------------------------------------
    yield Case("hardlink-dotdot", tar(entry("h", typeflag=LNK, linkname="../../etc/passwd")), "error", "h")
    yield Case("hardlink-absolute", tar(entry("h", typeflag=LNK, linkname="/tmp/lamina-hostile-canary/passwd")), "error", "h")
    yield Case("hardlink-missing", tar(entry("h", typeflag=LNK, linkname="nothere")), "error", "h")
    yield Case("hardlink-to-dir", tar(entry("d", typeflag=DIR), entry("h", typeflag=LNK, linkname="d")), "error", "h")
    yield Case("hardlink-pax-linkpath-escape",
               tar(pax(pax_record("linkpath", "../../../../tmp/lamina-hostile-canary/shadow")), entry("h", typeflag=LNK)), "error", "h")
    # -- whiteouts ---------------------------------------------------------------------
    yield Case("whiteout-dotdot", tar(entry(".wh...", b"")), "error", ".wh...")
    yield Case("whiteout-dotdot-nested", tar(entry("a/.wh...", b"")), "error", ".wh..")
    yield Case("whiteout-root", tar(entry(".wh.", b"")), "error", ".wh.")
    yield Case("whiteout-through-symlink", tar(entry("s", typeflag=SYM, linkname="/tmp/lamina-hostile-canary"), entry("s/.wh.passwd")),
               "error", "s/.wh.passwd")
    yield Case("opaque-through-symlink", tar(entry("s", typeflag=SYM, linkname="/tmp/lamina-hostile-canary"), entry("s/.wh..wh..opq")),
               "error", "s/.wh..wh..opq")
    yield Case("whiteout-of-parent-file", tar(entry(".wh.etc")), "contained", needs_parent=True)
    # -- special files ------------------------------------------------------------------
    yield Case("char-device", tar(entry("dev/null2", typeflag=CHR, devmajor=1, devminor=3)), "contained")
    yield Case("block-device-sda", tar(entry("sda", typeflag=BLK, devmajor=8, devminor=0)), "contained")
    yield Case("fifo", tar(entry("pipe", typeflag=FIFO)), "contained")
    yield Case("unknown-type", tar(entry("weird", typeflag=b"Z")), "error", "weird")
    # -- numbers and framing ------------------------------------------------------------
    yield Case("huge-size-octal", header("big", REG, size_field=b"77777777777\0") + b"x" * 512, "error", "big")
    yield Case("huge-size-base256", header("big256", REG, size_field=b"\x80" + b"\x7f" + b"\xff" * 10) + end(),
               "error", "big256")
    yield Case("negative-size-base256", header("neg", REG, size_field=b"\xff" * 12) + end(), "error", "neg")
    yield Case("garbage-size", header("gsize", REG, size_field=b"zzzzzzzzzzz\0") + end(), "error", "gsize")
    yield Case("truncated-data", header("trunc", REG, 4096) + b"x" * 1000, "error", "trunc")
    yield Case("truncated-header", ok + header("half", REG, 0)[:300], "error", "")
    yield Case("bad-checksum", tar(entry("ok2", b"x"), header("badsum", REG, 0, checksum_delta=7)), "error", "badsum")
    yield Case("no-end-blocks", ok, "contained")
    yield Case("empty-stream", b"", "contained")
    yield Case("only-zeros", b"\0" * 10240, "contained")
    yield Case("garbage", b"this is not a tar file at all" * 40, "error", "")
    # -- PAX ------------------------------------------------------------------------------
    yield Case("pax-bad-length", tar(pax(b"99 path=x\n"), entry("p1", b"x")), "error", "")
    yield Case("pax-no-equals", tar(pax(b"12 pathxxxx\n"), entry("p2", b"x")), "error", "")
    yield Case("pax-zero-length", tar(pax(b"0 path=x\n"), entry("p3", b"x")), "error", "")
    yield Case("pax-huge-size", tar(pax(pax_record("size", "999999999999999")), entry("p4", b"")), "error", "p4")
    yield Case("pax-negative-mtime", tar(pax(pax_record("mtime", "-1e30")), entry("p5", b"x")), "contained")
    yield Case("pax-nul-in-path", tar(pax(pax_record("path", "a\0b")), entry("p6", b"x")), "error", "")
    yield Case("pax-xattr-flood", tar(pax(b"".join(pax_record(f"SCHILY.xattr.user.k{i}", "v" * 200)
                                                   for i in range(2000))), entry("flood", b"x")), "contained")
    yield Case("pax-xattr-trusted-overlay",
               tar(pax(pax_record("SCHILY.xattr.trusted.overlay.opaque", "y")), entry("fake-opaque", typeflag=DIR)),
               "contained")
    yield Case("pax-xattr-unknown-namespace",  # found by the fuzzer: was UnsupportedFilesystem
               tar(pax(pax_record("SCHILY.xattr.t2usted.overlay.opaque", "y")), entry("nsdir", typeflag=DIR)),
               "error", "nsdir")
    yield Case("pax-xattr-bad-acl", tar(pax(pax_record("SCHILY.xattr.system.posix_acl_access", "garbage")),
                                        entry("acl", b"x")), "error", "acl")
    yield Case("pax-xattr-unknown-system", tar(pax(pax_record("SCHILY.xattr.system.lamina_nothing", "x")),
                                               entry("sys", b"x")), "error", "sys")
    yield Case("gnu-longname-chain", tar(gnu_longname(b"a" * 300), gnu_longname(b"b" * 300),
                                         gnu_longname(b"c" * 300), entry("x", b"y")), "contained")
    yield Case("gnu-longname-huge", header("././@LongLink", b"L", size_field=b"77777777777\0") + end(), "error", "")
    # -- what follows the end, and numbers past what Linux or Go hold ------------------------
    yield Case("trailing-record-padding", tar(entry("padded", b"x")) + bytes(9216), "contained")
    yield Case("trailing-data-past-a-record", tar(entry("f", b"x")) + b"\0" * (2 << 20), "error",
               "end-of-archive")
    yield Case("pax-uid-past-32-bits", tar(pax(pax_record("uid", str(2**40))), entry("bigowner", b"x")),
               "error", "bigowner")
    yield Case("pax-number-100000-digits", tar(pax(pax_record("mtime", "7" * 100_000)), entry("digits", b"x")),
               "error", "digits")
    dev = bytearray(header("bigdev", CHR, 0))
    dev[329:337] = b"\x80" + (2**40).to_bytes(7, "big")  # base-256 major past makedev
    dev[148:156] = b" " * 8
    dev[148:156] = f"{sum(dev):06o}".encode() + b"\0 "
    yield Case("base256-device-past-32-bits", bytes(dev) + end(), "error", "bigdev")
    # -- one entry, several names (tar readers differ on which wins: refused) ------------------
    gnu_name, pax_path = gnu_longname(b"gnu-says-this"), pax(pax_record("path", "pax-says-that"))
    yield Case("gnu-longname-then-pax-path", tar(gnu_name, pax_path, entry("short", b"x")), "error", "gnu-says-this")
    yield Case("pax-path-then-gnu-longname", tar(pax_path, gnu_name, entry("short", b"x")), "error", "gnu-says-this")
    gnu_link, pax_link = gnu_longname(b"gnu-target", link=True), pax(pax_record("linkpath", "pax-target"))
    yield Case("gnu-longlink-then-pax-linkpath", tar(entry("t", b"x"), gnu_link, pax_link, entry("l", typeflag=SYM)),
               "error", "l")
    yield Case("pax-linkpath-then-gnu-longlink", tar(entry("t", b"x"), pax_link, gnu_link, entry("h", typeflag=LNK)),
               "error", "h")
    yield Case("gnu-longname-agrees-with-pax-path",
               tar(gnu_longname(b"same-name"), pax(pax_record("path", "same-name")), entry("short", b"x")), "contained")
    yield Case("pax-path-empty", tar(pax(pax_record("path", "")), entry("keeps-ustar-name", b"x")),
               "error", "keeps-ustar-name")
    yield Case("gnu-longname-empty", tar(gnu_longname(b""), entry("keeps-header-name", b"x")),
               "error", "keeps-header-name")
    yield Case("pax-linkpath-empty", tar(pax(pax_record("linkpath", "")), entry("el", typeflag=SYM, linkname="t")),
               "error", "el")
    yield Case("two-pax-headers-disagree",
               tar(pax(pax_record("path", "first-pax")), pax(pax_record("path", "second-pax")), entry("e", b"x")),
               "error", "second-pax")
    yield Case("two-gnu-longnames-disagree", tar(gnu_longname(b"first-gnu"), gnu_longname(b"second-gnu"), entry("e", b"x")),
               "error", "second-gnu")
    yield Case("global-header-path", tar(pax(pax_record("path", "everything"), name="glob-path", global_=True),
                                         entry("a", b"x")), "error", "glob-path")
    yield Case("global-header-size", tar(pax(pax_record("size", "512"), name="glob-size", global_=True),
                                         entry("a", b"x")), "error", "glob-size")
    yield Case("global-header-between-meta-and-entry",
               tar(gnu_longname(b"lost-name"), pax(pax_record("comment", "c"), name="glob-mid", global_=True),
                   entry("a", b"x")), "error", "glob-mid")
    yield Case("global-header-comment", tar(pax(pax_record("comment", "git archive"), global_=True), entry("a", b"x")),
               "contained")
    v7 = bytearray(header("v7-with-prefix", REG, 0))
    v7[257:265] = bytes(8)  # no magic: Go ignores the prefix field, tarfile reads it
    v7[345:351] = b"hidden"
    v7[148:156] = b" " * 8
    v7[148:156] = f"{sum(v7):06o}".encode() + b"\0 "
    yield Case("v7-header-with-prefix", bytes(v7) + end(), "error", "v7-with-prefix")
    # -- overlayfs's own xattrs (issue 16): never from a tar on overlay, base layer or not ------
    for parent in (False, True):
        where = "child" if parent else "base"
        for key, value, entry_ in OVERLAY_XATTR_NEIGHBOURS:
            yield Case(f"pax-xattr-{key.replace('.', '-')}-on-{where}",
                       tar(pax(pax_record(f"SCHILY.xattr.{key}", value)), entry_), "contained",
                       needs_parent=parent)
    # -- modes an unprivileged owner cannot walk; paths past PATH_MAX (issue 16) -------------
    yield Case("dir-mode-0000", tar(entry("locked", typeflag=DIR, mode=0), entry("open.txt", b"x")), "contained")
    yield Case("dir-mode-0000-with-content",
               tar(entry("locked", typeflag=DIR, mode=0o755), entry("locked/inner", typeflag=DIR, mode=0o755),
                   entry("locked/inner/f", b"x", mode=0), entry("locked/inner", typeflag=DIR, mode=0),
                   entry("locked", typeflag=DIR, mode=0)), "contained")
    yield Case("dir-mode-0100-search-only", tar(entry("x", typeflag=DIR, mode=0o755), entry("x/f", b"y"),
                                                entry("x", typeflag=DIR, mode=0o100)), "contained")
    yield Case("path-over-path-max", long_path_tar(4509), "contained")
    yield Case("path-just-under-path-max", long_path_tar(4000), "contained")
    # -- type changes ------------------------------------------------------------------------
    # a non-directory where a directory held content from the same tar: that content is gone
    # from the layer, so tar-split could never rebuild the tar (check found it: issue 16)
    yield Case("dir-replaced-by-file", tar(entry("d", typeflag=DIR), entry("d/in", b"x"), entry("d", b"file")),
               "error", "replaces or whites out content")
    yield Case("dir-replaced-by-empty-file", tar(entry("dd", typeflag=DIR), entry("dd/in", b"x"), entry("dd", b"")),
               "error", "replaces or whites out content")
    yield Case("dir-replaced-by-symlink", tar(entry("ds/sub", typeflag=DIR), entry("ds/sub/in", b"x"),
                                              entry("ds", typeflag=SYM, linkname="elsewhere")),
               "error", "replaces or whites out content")
    yield Case("empty-dir-replaced-by-file", tar(entry("de", typeflag=DIR), entry("de/in", b""), entry("de", b"f")),
               "contained")
    yield Case("dir-repeated-as-dir", tar(entry("dr", typeflag=DIR), entry("dr/in", b"x"),
                                          entry("dr", typeflag=DIR, mode=0o700)), "contained")
    yield Case("file-replaced-by-dir", tar(entry("f", b"file"), entry("f", typeflag=DIR), entry("f/in", b"x")),
               "contained")
    yield Case("file-replaced-by-symlink-then-write",
               tar(entry("f", b"file"), entry("f", typeflag=SYM, linkname="/tmp/lamina-hostile-canary"), entry("f/passwd", b"x")),
               "error", "f/passwd")


#: a capability set of CAP_NET_ADMIN (VFS_CAP_REVISION_2, little-endian): a value the
#: kernel takes, so the xattr is set rather than refused as malformed
CAP_NET_ADMIN = (0x02000001).to_bytes(4, "little") + (1 << 12).to_bytes(4, "little") + bytes(12)

#: (xattr, value, the entry carrying it): overlayfs's own names (dropped on overlay) and
#: their neighbours (kept everywhere)
OVERLAY_XATTR_NEIGHBOURS: list[tuple[str, bytes, bytes]] = [
    ("trusted.overlay.redirect", b"/etc", entry("redirected", typeflag=DIR, mode=0o755)),
    ("trusted.overlay.metacopy", b"", entry("metacopied", b"x")),
    ("trusted.overlay.opaque", b"y", entry("opaqued", typeflag=DIR, mode=0o755)),
    ("user.overlay.redirect", b"/etc", entry("u-redirected", typeflag=DIR, mode=0o755)),
    ("user.overlay.metacopy", b"", entry("u-metacopied", b"x")),
    ("user.overlay.opaque", b"y", entry("u-opaqued", typeflag=DIR, mode=0o755)),
    ("trusted.overlayfoo", b"1", entry("not-overlay-trusted", b"x")),
    ("user.overlayfoo", b"1", entry("not-overlay-user", b"x")),
    ("security.capability", CAP_NET_ADMIN, entry("capable", b"x", mode=0o755)),
]


def long_path_tar(length: int) -> bytes:
    """A file whose path is ``length`` bytes (about), in directories of 200-byte names:
    past 4096 it is longer than any path a system call takes whole."""
    parts, total = [], 0
    while total + 201 < length:
        parts.append(chr(ord("a") + len(parts) % 26) * 200)
        total += 201
    last = "f" * max(1, length - total)

    def named(path: str, *args: object, **kw: object) -> bytes:  # the name in a PAX record
        return pax(pax_record("path", path)) + entry("placeholder", *args, **kw)  # type: ignore[arg-type]

    entries = [named("/".join(parts[:i + 1]), typeflag=DIR, mode=0o755) for i in range(len(parts))]
    return tar(*entries, named("/".join([*parts, last]), b"deep\n"))


def million_empty_entries(count: int = 1_000_000) -> Iterator[bytes]:
    """A stream of ``count`` empty-file entries (bounded time and memory to apply)."""
    h = header("same-empty-file", REG, 0)
    chunk = h * 2048
    full, rest = divmod(count, 2048)
    for _ in range(full):
        yield chunk
    yield h * rest
    yield end()


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "fuzz/corpus")
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for case in cases():
        (out / f"{case.name}.tar").write_bytes(case.data)
        n += 1
    print(f"wrote {n} tars to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
