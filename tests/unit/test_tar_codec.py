"""The one tar codec (lamina.archive.tar): its pieces on their own, against tarfile and
hand-made bytes (tests/tarmaker.py), independent of the apply path."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tarmaker as tm
from lamina.archive.tar import pax
from lamina.archive.tar.format import REGTYPE, SYMTYPE
from lamina.archive.tar.reader import TarReader
from lamina.archive.tar.split import RecordingReader, reassemble
from lamina.archive.tar.writer import gnu_header
from lamina.streams import CountingReader, HashingReader

# the C speedups and the pure-Python path must behave alike: every test runs in both
pytestmark = pytest.mark.usefixtures("native_mode")

# -- GNU headers (image archives) ------------------------------------------------------


@given(
    name=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=100),
    size=st.integers(min_value=0, max_value=1 << 50),
    mtime=st.integers(min_value=0, max_value=8**11 - 1),
    mode=st.integers(min_value=0, max_value=0o7777),
)
def test_gnu_header_is_what_tarfile_writes(name: str, size: int, mtime: int, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    assert gnu_header(name.encode(), size=size, mtime=mtime, mode=mode) == info.tobuf(format=tarfile.GNU_FORMAT)


def test_gnu_header_of_a_symlink_and_a_too_long_name() -> None:
    info = tarfile.TarInfo("l")
    info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, "../t", 0o777, 3
    info.uname = info.gname = ""
    assert gnu_header(b"l", size=0, mtime=3, typeflag=SYMTYPE, mode=0o777, linkname=b"../t") == \
        info.tobuf(format=tarfile.GNU_FORMAT)
    with pytest.raises(ValueError, match="too long"):
        gnu_header(b"n" * 101, size=0, mtime=0, typeflag=REGTYPE)


# -- PAX numbers and times, Go's rules ---------------------------------------------------


@pytest.mark.parametrize("text, ns", [
    ("1.", 1_000_000_000),  # Go: a dot with no digits is whole seconds
    ("+2", 2_000_000_000),  # Go's ParseInt takes a sign
    ("-0.5", -500_000_000),
    ("9223372036854775807", 9223372036854775807 * 10**9),
])
def test_pax_time_accepts_what_go_accepts(text: str, ns: int) -> None:
    assert pax.parse_time(text) == ns


@pytest.mark.parametrize("text", [".5", "-", "1.-5", "1e9", "9223372036854775808", "٣"])
def test_pax_time_refuses_what_go_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        pax.parse_time(text)


def test_a_100000_digit_number_is_refused_at_once() -> None:
    t = time.process_time()
    with pytest.raises(ValueError, match="64 bits"):
        pax.parse_int(b"9" * 100_000)
    with pytest.raises(ValueError, match="64 bits"):
        pax.parse_time(b"1" * 100_000)
    assert time.process_time() - t < 0.5


def test_text_records_round_trip() -> None:
    records = {"MSWINDOWS.rawsd": "AQAE", "b": "x" * 200, "é": "\udcff"}
    assert pax.parse_text_records(pax.encode_text_records(records), None) == records


# -- the reader passes every entry type on -------------------------------------------------


def test_reader_hands_on_unknown_types_with_their_data() -> None:
    data = tm.tar(tm.entry("odd", b"payload", type=b"Z"), tm.file("next", b"n"))
    reader = TarReader(io.BytesIO(data))
    entries = []
    for e in reader:
        entries.append((e.name, chr(e.type), bytes(b"".join(bytes(c) for c in reader.data()))))
    assert entries == [("odd", "Z", b"payload"), ("next", "0", b"n")]


# -- RecordingReader: what the Windows importer reads through -----------------------------


class _Kept:
    def __init__(self, kept: dict[str, bytes]) -> None:
        self.kept = kept

    def get(self, name: str) -> io.BytesIO:
        return io.BytesIO(self.kept[name])


def test_recording_reader_keeps_unread_data_in_the_record() -> None:
    big = os.urandom(3 << 20)
    raw = tm.tar(tm.file("taken", b"t" * 5000), tm.file("left", big), tm.file("small", b"s")) + bytes(8192)
    record = io.BytesIO()
    reader = RecordingReader(io.BytesIO(raw), record)
    kept: dict[str, bytes] = {}
    while (e := reader.next()) is not None:
        if e.name != "left":
            buf = bytearray()
            assert reader.copy_data(buf.extend) == e.size
            kept[e.name] = bytes(buf)
    lines = [json.loads(line) for line in record.getvalue().splitlines()]
    files = {o["name"]: o.get("size", 0) for o in lines if o["type"] == 1}
    assert files == {"taken": 5000, "left": 0, "small": 1}  # "left" is raw, not content
    segments = [len(base64.b64decode(o["payload"])) for o in lines if o["type"] == 2]
    assert max(segments) <= 1 << 20  # raw bytes are cut at 1 MiB
    record.seek(0)
    assert b"".join(reassemble(record, _Kept(kept))) == raw


def test_recording_reader_without_a_record_reads_the_same_entries() -> None:
    raw = tm.tar(tm.file("a", b"1"), tm.file("b", b"22"))
    reader = RecordingReader(io.BytesIO(raw))
    names = []
    while (e := reader.next()) is not None:
        names.append(e.name)
    assert names == ["a", "b"] and reader.next() is None


# -- the two stream watchers ---------------------------------------------------------------


def test_counting_reader_counts_and_reports_each_read() -> None:
    seen: list[int] = []
    r = CountingReader(io.BytesIO(b"x" * 5000), seen.append)
    assert r.read(3000) == b"x" * 3000
    assert r.read() == b"x" * 2000
    assert r.count == 5000 and sum(seen) == 5000


def test_hashing_reader_takes_any_algorithm_and_reports_reads() -> None:
    data = os.urandom(3 << 20)  # past one batch: the helper thread hashes
    seen: list[int] = []
    r = HashingReader(io.BytesIO(data), "sha512", seen.append)
    assert r.read(10) == data[:10]
    assert r.drain() == len(data) - 10
    assert r.digest() == "sha512:" + hashlib.sha512(data).hexdigest()
    assert sum(seen) == len(data) == r.count
