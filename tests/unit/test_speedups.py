"""The C speedups and the pure-Python archive engine behave alike, byte for byte.

The C code (``lamina.archive._speedups``) takes only entries and tar-split lines it fully
understands and stops at anything else for the Python path to handle; so for any input,
apply must leave the same tree, return the same size or raise the same error, and
record the same tar-split, and replay must give the same bytes (or the same error after
the same bytes) in both modes. Here that is checked on crafted tars around every rule
the C code applies (each condition under which it must stop), on the hostile corpus,
on real-world shapes (GNU tar's posix format, ustar prefixes, "./" names) and on random
tars; and the CRC-64 both ways against the pure-Python reference.
"""

from __future__ import annotations

import io
import os
import random
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.corpus import cases  # noqa: E402

import tarmaker as tm  # noqa: E402
from conftest import REPO, skip_or_fail  # noqa: E402
from lamina.archive import native  # noqa: E402
from lamina.archive.apply import ApplyOptions, apply_tar  # noqa: E402
from lamina.archive.tar import crc64 as crc64_module  # noqa: E402
from lamina.archive.tar.replay import reassemble  # noqa: E402
from lamina.fs.getter import DirFileGetter  # noqa: E402


@pytest.fixture(autouse=True)
def _built() -> None:
    if not native.available():
        skip_or_fail("the C speedups (lamina.archive._speedups) are not built")


def _ext():  # type: ignore[no-untyped-def]
    from lamina.archive import _speedups

    return _speedups


# -- what a tree looks like -------------------------------------------------------------------


def tree(root: Path) -> list[tuple]:
    """Every entry under ``root``: its stat (atime included: each entry is stat'ed before
    its directory is listed, and file contents are read last), xattrs, link target and
    content."""
    entries: list[tuple] = []
    now = time.time_ns()

    def tar_time(ns: int) -> int | None:
        """A time the tar set, or None for one the clock set (a directory the tar did
        not list, or one filled after its own entry without one to set it again)."""
        return None if abs(ns - now) < 3600 * 10**9 else ns

    def visit(path: str, rel: str, fds: list[int]) -> None:
        st_ = os.lstat(path)
        xattrs = sorted((a, os.getxattr(path, a, follow_symlinks=False))
                        for a in os.listxattr(path, follow_symlinks=False))
        link = os.readlink(path) if stat.S_ISLNK(st_.st_mode) else None
        entries.append([rel, st_.st_mode, st_.st_uid, st_.st_gid, st_.st_size,
                        tar_time(st_.st_mtime_ns), tar_time(st_.st_atime_ns),
                        st_.st_rdev, xattrs, link, None])
        if stat.S_ISREG(st_.st_mode):
            with open(path, "rb") as f:  # read last, through an fd kept open till then
                fds.append(os.dup(f.fileno()))
            files.append((len(entries) - 1, fds[-1]))
        if stat.S_ISDIR(st_.st_mode):
            # reached through the directory's fd: a layer's paths may pass PATH_MAX
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            fds.append(fd)
            for name in sorted(os.listdir(fd)):
                visit(f"/proc/self/fd/{fd}/{name}", f"{rel}/{name}" if rel else name, fds)

    fds: list[int] = []
    files: list[tuple[int, int]] = []
    try:
        visit(str(root), "", fds)
        for i, fd in files:
            entries[i][-1] = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        for fd in fds:
            os.close(fd)
    return [tuple(e) for e in entries]


def outcome(data: bytes, where: Path, *, base: bytes | None = None,
            opts: Callable[[io.BytesIO], ApplyOptions] | None = None) -> tuple:
    """Apply ``data`` (after ``base``, if given) into a new directory: what came of it."""
    where.mkdir()
    if base is not None:
        apply_tar(where, io.BytesIO(base))
    record = io.BytesIO()
    options = opts(record) if opts else ApplyOptions(tarsplit=record)
    try:
        size = apply_tar(where, io.BytesIO(data), options)
        error = None
    except Exception as e:  # noqa: BLE001 - the comparison is the point
        size, error = None, (type(e).__name__, str(e))
    # a failed apply's record is thrown away (and its batching may differ): compare kept ones
    return size, error, record.getvalue() if error is None else None, tree(where)


def both(tmp: Path, data: bytes, **kw) -> tuple:  # type: ignore[no-untyped-def]
    """The outcome with the speedups, after checking it is the outcome without them."""
    saved = native.ext
    try:
        native.use(True)
        fast = outcome(data, tmp / f"n{len(list(tmp.iterdir()))}", **kw)
        native.use(False)
        slow = outcome(data, tmp / f"p{len(list(tmp.iterdir()))}", **kw)
    finally:
        native.ext = saved
    assert fast[:3] == slow[:3]
    assert fast[3] == slow[3]
    return fast


def replayed(record: bytes, root: Path) -> tuple[bytes, tuple | None]:
    """What replaying ``record`` from ``root`` yields, and the error it ends with."""
    out: list[bytes] = []
    getter = DirFileGetter(root)
    try:
        for chunk in reassemble(io.BytesIO(record), getter):
            out.append(chunk)
        error = None
    except Exception as e:  # noqa: BLE001
        # an OSError on a file object names its fd, whose number depends on what else is open
        error = (type(e).__name__, re.sub(r": \d+$", ": <fd>", str(e)))
    finally:
        getter.close()
    return b"".join(out), error


def replay_both(record: bytes, root: Path) -> tuple[bytes, tuple | None]:
    saved = native.ext
    try:
        native.use(True)
        fast = replayed(record, root)
        native.use(False)
        slow = replayed(record, root)
    finally:
        native.ext = saved
    assert fast == slow
    return fast


def round_trip(tmp: Path, data: bytes) -> None:
    """Applied alike both ways; if accepted, replayed alike, and byte for byte where the
    replay succeeds (a name with ``..`` inside is applied but not served back by the
    getter, in both modes)."""
    size, error, record, _ = both(tmp, data)
    if error is None:
        root = tmp / f"r{len(list(tmp.iterdir()))}"
        root.mkdir()
        apply_tar(root, io.BytesIO(data))
        out, err = replay_both(record, root)
        assert err is not None or out == data


# -- the tars ----------------------------------------------------------------------------------


def _pax_times(**times: str) -> bytes:
    return tm.pax({k: v for k, v in times.items()})


def _patched(block: bytes, at: int, value: bytes, *, signed: bool = False) -> bytes:
    """A header block with ``value`` at ``at`` and its checksum made again (the signed
    sum some old tars wrote, with ``signed``)."""
    b = bytearray(block[:512])
    b[at:at + len(value)] = value
    b[148:156] = b" " * 8
    total = sum(x - 256 if signed and x > 127 else x for x in b)
    b[148:156] = f"{total:06o}".encode() + b"\0 "
    return bytes(b) + block[512:]


PLAIN = [
    tm.file("a", b"x"),
    tm.file("empty"),
    tm.directory("d/"), tm.file("d/one", b"1" * 700), tm.file("d/two", b"2" * 512),
    tm.directory("d/e/"), tm.file("d/e/deep", b"deep"), tm.file("d/back", b"parent again"),
    tm.symlink("d/link", "one"), tm.symlink("d/abs", "/etc/passwd"),
    tm.file("d/setuid", b"s", mode=0o4755), tm.file("d/open", b"o", mode=0o777),
    tm.file("d/closed", b"c", mode=0o000), tm.file("d/owned", b"u", uid=1234, gid=5678),
    tm.file("d/old", b"t", mtime=0), tm.file("d/future", b"t", mtime=0o77777777777),
]

CRAFTED: dict[str, bytes] = {
    "plain": tm.tar(*PLAIN),
    "dot-slash names (GNU tar)": tm.tar(tm.directory("./"), tm.directory("./etc/"),
                                        tm.file("./etc/f", b"f"), tm.file("./g", b"g"),
                                        tm.file("././h", b"h"), tm.file(".//i", b"i")),
    "GNU magic": tm.tar(tm.file("g1", b"g", magic=b"ustar  \0"),
                        tm.file("g2", b"g", magic=b"ustar  \0", raw_fields={"mtime": b"00000000001\0"})),
    "old GNU atime": tm.tar(tm.header("ga", size=0, magic=b"ustar  \0", prefix=b"00000000001\0")),
    "V7 (no magic)": tm.tar(tm.file("v7", b"v", magic=bytes(8))),
    "star trailer": tm.tar(_patched(tm.file("st", b"s"), 508, b"tar\0"),
                           _patched(tm.file("st2", b"s", prefix=b"p"), 508, b"tar\0")),
    "ustar prefix": tm.tar(tm.directory("p/"), tm.file("name", b"n", prefix=b"p"),
                           tm.file("q", b"q", prefix=b"p/../p")),
    "names JSON escapes": tm.tar(*(tm.file(n, b"j") for n in ("amp&", "lt<", "gt>", 'quote"', "back\\slash",
                                                               "sp ace", "tab\t", "del\x7f"))),
    "non-ASCII names": tm.tar(tm.file("caf\u00e9", b"u"), tm.file(b"raw\xff", b"r")),
    "dot-dot inside": tm.tar(tm.file("a/../b", b"b"), tm.file("c/./d", b"d"), tm.file("e//f", b"f")),
    "the root as a file": tm.tar(tm.file(".", b"dot")),
    "climbing": tm.tar(tm.file("ok", b"o"), tm.file("../up", b"u")),
    "absolute": tm.tar(tm.file("ok", b"o"), tm.file("/abs", b"a")),
    "trailing slash on a file": tm.tar(tm.file("x/", b"slash")),
    "whiteouts": tm.tar(tm.file("w", b"w"), tm.file(".wh.w"), tm.directory("wd/"), tm.file("wd/k", b"k"),
                        tm.file("wd/.wh..wh..opq"), tm.file(".wh..wh.plnk/1", b"aufs")),
    "repeats": tm.tar(tm.file("r", b"1"), tm.file("r", b"2")),
    "repeat of empty": tm.tar(tm.file("r0"), tm.file("r0", b"now content")),
    "repeat with content lost": tm.tar(tm.file("r1", b"content"), tm.file("r1")),
    "dir over file, file over dir": tm.tar(tm.file("fd", b"f"), tm.directory("fd/"), tm.file("fd/in", b"i"),
                                           tm.directory("df/"), tm.file("df", b"now a file")),
    "through a symlink": tm.tar(tm.symlink("s", "/tmp"), tm.file("s/escape", b"no")),
    "symlink edge": tm.tar(tm.symlink("empty-target", ""), tm.symlink("long", "t" * 100),
                           tm.symlink("bin", b"\xff\xfe".decode("latin-1")),
                           tm.header("sized-link", type=b"2", linkname="x", size=1000)),
    "numbers": tm.tar(tm.file("lead", b"l", raw_fields={"mode": b"  644\0\0\0"}),
                      tm.file("trail", b"t", raw_fields={"mode": b"644     "}),
                      tm.file("nonul", b"n", raw_fields={"size": b"00000000001 ", "mtime": b"12345670123 "}),
                      tm.file("b256", b"b", raw_fields={"size": tm.base256(1, 12)}),
                      tm.file("plus", b"p", raw_fields={"uid": b"+000001\0"}),
                      tm.file("under", b"u", raw_fields={"gid": b"0_00001\0"}),
                      tm.file("8s", b"e", raw_fields={"mode": b"0000688\0"}),
                      tm.file("neg", b"n", raw_fields={"mtime": tm.base256(-5, 12)})),
    "checksums": tm.tar(tm.header("bad", checksum=1), tm.file("after", b"a")),
    "signed checksum": tm.tar(_patched(tm.file("hi", b"s"), 2, b"\xe9\xe9", signed=True),
                              tm.file("after", b"a")),
    "types": tm.tar(tm.header("nul-type", type=b"\0", size=1) + tm.pad(b"n"),
                    tm.header("nul-dir/", type=b"\0"),
                    tm.header("cont", type=b"7", size=1) + tm.pad(b"c"),
                    tm.header("fifo", type=b"6"), tm.header("chr", type=b"3", devmajor=1, devminor=3),
                    tm.hardlink("hard", "cont"), tm.hardlink("hard2", "a-missing")),
    "PAX times": tm.tar(
        _pax_times(mtime="1700000000.5", atime="1700000001.25", ctime="junk"), tm.file("t1", b"1"),
        _pax_times(atime="1600000000"), tm.file("t2", b"2"),
        _pax_times(mtime="1700000000.1234567891234", atime="1700000000."), tm.file("t3", b"3"),
        tm.pax(tm.pax_records({"mtime": "x"}) + tm.pax_records({"mtime": "5"})), tm.file("t4", b"4"),
        _pax_times(mtime="1", atime="99999999999"), tm.symlink("t5", "t1"),
        tm.pax(b""), tm.file("t6", b"6"),
        tm.pax(tm.pax_records({"atime": "5"}) + bytes(40)), tm.file("t7", b"7"),
    ),
    "PAX times malformed": tm.tar(
        _pax_times(mtime="-1"), tm.file("m1", b"1"),
        _pax_times(mtime="+1"), tm.file("m2", b"2"),
        _pax_times(mtime="1.x"), tm.file("m3", b"3"),
        _pax_times(mtime="99999999999999999999"), tm.file("m4", b"4"),
        _pax_times(mtime=""), tm.file("m5", b"5"),
    ),
    "PAX records the C code leaves": tm.tar(
        tm.pax({"path": "long/" * 30 + "name"}), tm.file("short", b"p"),
        tm.pax({"uid": "70000000"}), tm.file("bigid", b"u"),
        tm.pax({"SCHILY.xattr.user.k": "v"}), tm.file("xattr", b"x"),
        tm.pax({"size": "3"}), tm.file("psize", b"abc", size=0),
        tm.pax({"mtime": "1"}), tm.pax({"mtime": "2"}), tm.file("two-pax", b"2"),
        tm.pax({"mtime": "1"}), tm.directory("paxdir/"),
        tm.pax(b"9 mtime=1\n" + b"x"), tm.file("bad-pax", b"b"),
    ),
    "PAX before nothing": tm.pax({"mtime": "1"}) + tm.end(),
    "GNU long names": tm.tar(tm.gnu_long(b"L", "l" * 150), tm.file("x", b"l"),
                             tm.gnu_long(b"K", "t" * 150), tm.symlink("longlink", "t")),
    "global PAX": tm.tar(tm.pax({"comment": "hi"}, type=b"g"), tm.file("afterg", b"g")),
    "sizes around a block": tm.tar(*(tm.file(f"s{n}", bytes([n % 251]) * n)
                                     for n in (0, 1, 511, 512, 513, 1023, 1024, 1025))),
    "no end blocks": b"".join(PLAIN[:3]),
    "one end block": tm.file("one", b"1") + bytes(512),
    "trailing garbage": tm.tar(tm.file("t", b"t")) + b"junk",
    "trailing zeros": tm.tar(tm.file("t", b"t")) + bytes(10240),
    "truncated data": tm.file("cut", b"x" * 2000)[:1200],
    "truncated header": tm.file("ok", b"o") + tm.file("cut", b"x")[:300],
    "truncated PAX": tm.pax({"mtime": "1"})[:700],
    "header after zero block": tm.file("a", b"a") + bytes(512) + tm.file("b", b"b") + tm.end(),
    "not a tar": b"hello, world\n" * 100,
}


def big_files() -> bytes:
    """Files straddling the reader's 1 MiB buffer, and one larger than it."""
    rng = random.Random(11)
    parts = [tm.directory("big/")]
    for i, n in enumerate((300_000, 400_000, 500_000, 1_048_000, 2_000_000, 70_000)):
        parts.append(tm.file(f"big/f{i}", rng.randbytes(n)))
    for i in range(600):
        parts.append(tm.file(f"big/small{i:03d}", rng.randbytes(rng.randint(0, 3000))))
    return tm.tar(*parts)


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_tars_apply_and_replay_alike(tmp_path: Path, name: str) -> None:
    round_trip(tmp_path, CRAFTED[name])


def test_runs_across_the_buffer_apply_and_replay_alike(tmp_path: Path) -> None:
    round_trip(tmp_path, big_files())


@pytest.mark.parametrize("case", list(cases()), ids=lambda c: c.name)
def test_hostile_corpus_is_refused_alike(tmp_path: Path, case) -> None:  # type: ignore[no-untyped-def]
    both(tmp_path, case.data)


def test_opaque_directory_keeps_what_the_fast_path_unpacked(tmp_path: Path) -> None:
    base = tm.tar(tm.directory("o/"), tm.file("o/old1", b"1"), tm.file("o/old2", b"2"))
    layer = tm.tar(tm.directory("o/"), tm.file("o/new1", b"n"), tm.file("o/new2", b"m"),
                   tm.file("o/.wh..wh..opq"))
    _, error, _, result = both(tmp_path, layer, base=base)
    assert error is None
    assert [e[0] for e in result] == ["", "o", "o/new1", "o/new2"]


@pytest.mark.parametrize("kind", ["unprivileged", "uid map", "overlay whiteouts"])
def test_apply_options_alike(tmp_path: Path, kind: str) -> None:
    opts = {
        "unprivileged": lambda r: ApplyOptions(tarsplit=r, privileged=False),
        "uid map": lambda r: ApplyOptions(tarsplit=r, uid_map=[(0, 100000, 65536)],
                                          gid_map=[(0, 100000, 65536)]),
        "overlay whiteouts": lambda r: ApplyOptions(tarsplit=r, whiteouts="overlay"),
    }[kind]
    data = tm.tar(*PLAIN, tm.file(".wh.a"), tm.file("d/.wh..wh..opq"))
    both(tmp_path, data, opts=opts)


def test_no_tarsplit_applies_alike(tmp_path: Path) -> None:
    both(tmp_path, CRAFTED["plain"], opts=lambda r: ApplyOptions())


# -- replay of changed layers and of records in other shapes -----------------------------------


def _applied(tmp: Path, data: bytes) -> tuple[Path, bytes]:
    root = tmp / "layer"
    root.mkdir()
    record = io.BytesIO()
    apply_tar(root, io.BytesIO(data), ApplyOptions(tarsplit=record))
    return root, record.getvalue()


TAMPER: dict[str, Callable[[Path], None]] = {
    "content": lambda r: (r / "d/one").write_bytes(b"X" * 700),
    "longer": lambda r: (r / "d/one").write_bytes(b"1" * 701),
    "shorter": lambda r: (r / "d/one").write_bytes(b"1" * 699),
    "missing": lambda r: (r / "d/one").unlink(),
    "symlink": lambda r: ((r / "d/one").unlink(), (r / "d/one").symlink_to("two")),
    "directory": lambda r: ((r / "d/one").unlink(), (r / "d/one").mkdir()),
    "dir is a symlink": lambda r: (os.rename(r / "d/e", r / "e-moved"), (r / "d/e").symlink_to("../e-moved")),
}


@pytest.mark.parametrize("how", sorted(TAMPER))
def test_changed_layer_replays_alike(tmp_path: Path, how: str) -> None:
    root, record = _applied(tmp_path, CRAFTED["plain"])
    TAMPER[how](root)
    _, error = replay_both(record, root)
    assert error is not None


def _reshaped(record: bytes, change: Callable[[bytes], bytes]) -> bytes:
    return b"\n".join(change(line) for line in record.split(b"\n"))


RESHAPE: dict[str, Callable[[bytes], bytes]] = {
    "spaces": lambda line: line.replace(b'":', b'": ').replace(b',"', b', "'),
    "keys reordered": lambda line: line.replace(b'{"type":1,', b'{').replace(b',"position"', b',"type":1,"position"')
    if line.startswith(b'{"type":1,') else line,
    "escaped name": lambda line: line.replace(b'"name":"d/', b'"name":"d\\u002f'),
    "CRLF": lambda line: line + b"\r" if line else line,
    "blank lines": lambda line: line + b"\n\n" if line else line,
    "payload null": lambda line: line.replace(b'"payload":"', b'"payload":null,"x":"')
    if b'"size"' in line else line,
    "segment null": lambda line: line.replace(b'{"type":2,"payload":"', b'{"type":2,"payload":null,"p":"'),
    "bad base64": lambda line: line.replace(b'"payload":"', b'"payload":"!') if b'"size"' in line else line,
    "padding bits": lambda line: line.replace(b'A=","position"', b'B=","position"'),
    "unknown type": lambda line: line.replace(b'{"type":2,', b'{"type":3,'),
    "leading zero": lambda line: line.replace(b'"size":7', b'"size":07'),
    "not JSON": lambda line: line[:-3] if b"d/two" in line else line,
    "no final newline": lambda line: line,
}


@pytest.mark.parametrize("how", sorted(RESHAPE))
def test_reshaped_records_replay_alike(tmp_path: Path, how: str) -> None:
    root, record = _applied(tmp_path, CRAFTED["plain"])
    reshaped = _reshaped(record, RESHAPE[how])
    if how == "no final newline":
        reshaped = reshaped.rstrip(b"\n")
    replay_both(reshaped, root)


# -- random tars --------------------------------------------------------------------------------

_names = st.sampled_from(["a", "b", "d/a", "d/b", "d/e/a", "./d/c", "e/f", ".wh.a", "d/.wh.b",
                          "d/.wh..wh..opq", "x y", "q&"])
_entries = st.one_of(
    st.tuples(st.just("file"), _names, st.binary(max_size=1500), st.sampled_from([0o644, 0o4755, 0o600])),
    st.tuples(st.just("dir"), _names, st.just(b""), st.just(0o755)),
    st.tuples(st.just("symlink"), _names, st.sampled_from([b"a", b"../x", b""]), st.just(0o777)),
    st.tuples(st.just("paxfile"), _names, st.binary(max_size=600), st.just(0o644)),
)


def _build(entries: list[tuple]) -> bytes:
    parts = []
    for kind, name, data, mode in entries:
        if kind == "file":
            parts.append(tm.file(name, data, mode=mode))
        elif kind == "dir":
            parts.append(tm.directory(name.rstrip("/") + "/"))
        elif kind == "symlink":
            parts.append(tm.symlink(name, data.decode()))
        else:
            parts.append(_pax_times(mtime=f"1700000000.{len(data)}", atime="1800000000") + tm.file(name, data))
    return tm.tar(*parts)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_entries, max_size=25))
def test_random_tars_apply_and_replay_alike(tmp_path_factory: pytest.TempPathFactory,
                                            entries: list[tuple]) -> None:
    round_trip(tmp_path_factory.mktemp("random"), _build(entries))


# -- CRC-64 ----------------------------------------------------------------------------------------


def _reference(data: bytes) -> int:
    """The pure-Python CRC (no anycrc), as an int."""
    c = crc64_module.Crc64()
    c._fast = None
    c.update(data)
    return int.from_bytes(c.digest(), "big")


@pytest.mark.parametrize("folding", [True, False], ids=["folding", "table"])
def test_crc64_matches_the_reference(folding: bool) -> None:
    ext = _ext()
    old = ext.crc64_folding(folding)
    try:
        rng = random.Random(3)
        for n in [*range(0, 300), 1000, 4096, 65537, 1 << 20]:
            data = rng.randbytes(n)
            assert ext.crc64(data) == _reference(data), n
            k = rng.randint(0, n)
            assert ext.crc64(data[k:], ext.crc64(data[:k])) == _reference(data), (n, k)
    finally:
        ext.crc64_folding(old)


def test_crc64_check_value() -> None:
    assert _ext().crc64(b"123456789") == 0xB90956C775A41001


# -- switching --------------------------------------------------------------------------------------


def test_no_native_env_turns_the_speedups_off() -> None:
    code = "from lamina.archive import native; print(native.ext is None, native.available())"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), LAMINA_NO_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["True", "True"]
    env["LAMINA_NO_NATIVE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == ["False", "True"]
