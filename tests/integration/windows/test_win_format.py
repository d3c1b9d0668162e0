"""The Windows layer tar format (lamina.archive.wintar, on the codec lamina.archive.tar) and security descriptors
(lamina.archive.winsd), checked against tarfile, hand-packed structs and the values
the reference note quotes from ko, crane and BuildKit."""

from __future__ import annotations

import base64
import io
import struct
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wintarmaker import BA, BU, DIR_SD, KO_SD, SY, SYSTEM_FILE_SD, LayerTar, Meta, decode_sd

from lamina.archive import winsd, wintar
from lamina.archive.tar import format as fmt
from lamina.archive.tar import pax
from lamina.archive.tar.split import RecordingReader, reassemble
from lamina.errors import InvalidArchive

# -- times ----------------------------------------------------------------------------


@pytest.mark.parametrize("ns, text", [
    (0, "0"),
    (1_500_000_000, "1.5"),
    (-1_500_000_000, "-1.5"),
    (1_700_000_000_123_456_700, "1700000000.1234567"),
    (5, "0.000000005"),
])
def test_pax_time_matches_go(ns: int, text: str) -> None:
    assert pax.format_time(ns) == text
    assert pax.parse_time(text) == ns


def test_pax_time_parse_pads_and_cuts_the_fraction_to_nanoseconds() -> None:
    assert pax.parse_time("1.5") == 1_500_000_000
    assert pax.parse_time("1.1234567891") == 1_123_456_789
    with pytest.raises(ValueError):
        pax.parse_time("1.2.3")


@given(st.integers(min_value=-(10**19), max_value=10**19))
def test_pax_time_round_trips(ns: int) -> None:
    assert pax.parse_time(pax.format_time(ns)) == ns


def test_filetime_conversion_uses_100ns_ticks_from_1601() -> None:
    assert wintar.ns_to_filetime(0) == 116444736000000000
    assert wintar.filetime_to_ns(116444736000000001) == 100
    assert wintar.ns_to_filetime(-150) == 116444736000000000 - 1  # truncates toward zero


# -- names and attributes ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "Files/../../etc", "/Files/x", "C:\\Windows", "Files\\..\\..\\x"])
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArchive):
        wintar.split_name(name)


def test_backslashes_separate_as_on_windows() -> None:
    assert wintar.split_name("Files\\Windows\\System32/") == ["Files", "Windows", "System32"]
    assert wintar.split_name("./Files/x") == ["Files", "x"]


def test_attribute_names() -> None:
    assert wintar.attribute_names(0x410) == ["FILE_ATTRIBUTE_DIRECTORY", "FILE_ATTRIBUTE_REPARSE_POINT"]
    assert wintar.attribute_names(0x20 | 0x8000000) == ["FILE_ATTRIBUTE_ARCHIVE", "0x8000000"]


def test_fileattr_must_be_unsigned_decimal() -> None:
    assert wintar.parse_fileattr("16", "x") == 16
    for bad in ("0x10", "-1", "4294967296", ""):
        with pytest.raises(InvalidArchive):
            wintar.parse_fileattr(bad, "x")


# -- headers ---------------------------------------------------------------------------


def test_encoded_headers_read_back_with_tarfile() -> None:
    long_name = "Files/" + "deep/" * 30 + "file.txt"
    out = io.BytesIO()
    out.write(wintar.encode_header("Files", fmt.DIRTYPE, mode=wintar.MODE_DIR,
                                   mtime_ns=1_700_000_000_123_456_700,
                                   records={"MSWINDOWS.fileattr": "16", "LIBARCHIVE.creationtime": "5.5"}))
    out.write(wintar.encode_header(long_name, fmt.REGTYPE, size=3, mode=wintar.MODE_REG, mtime_ns=7 * 10**9))
    out.write(b"abc" + fmt.padding(3))
    out.write(wintar.whiteout_header("Files/.wh.gone"))
    out.write(fmt.END_OF_ARCHIVE)
    members = tarfile.open(fileobj=io.BytesIO(out.getvalue())).getmembers()
    assert [m.name for m in members] == ["Files", long_name, "Files/.wh.gone"]
    assert members[0].pax_headers["mtime"] == "1700000000.1234567"
    assert members[0].pax_headers["MSWINDOWS.fileattr"] == "16"
    assert members[1].size == 3 and members[1].mtime == 7
    assert members[2].pax_headers == {} and members[2].size == 0 and members[2].mtime == 0


def test_pax_records_are_sorted_and_self_sized() -> None:
    payload = pax.encode_text_records({"b": "2", "a": "x" * 95})
    # " a=" + 95 + "\n" is 99 bytes; the length field's own 3 digits make it 102
    assert payload.startswith(b"102 a=") and payload[102:] == b"6 b=2\n"
    assert pax.parse_text_records(payload, None) == {"a": "x" * 95, "b": "2"}


def test_reader_keeps_every_record_of_a_maker_tar() -> None:
    t = LayerTar.diff_layer()
    t.file("Files/a.txt", b"data", meta=Meta(0x21, sd=SYSTEM_FILE_SD, eas={"$KERNEL.PURGE.X": b"\x01\x02"},
                                            extra={"MSWINDOWS.future": "kept"}))
    reader = RecordingReader(io.BytesIO(t.bytes()))
    entries = []
    while (e := reader.next()) is not None:
        entries.append(e)
    a = entries[2]
    assert a.name == "Files/a.txt" and a.size == 4
    assert wintar.windows_records(a.pax) == {
        "MSWINDOWS.fileattr": "33",
        "LIBARCHIVE.creationtime": "1600000000.0000001",
        "MSWINDOWS.rawsd": base64.b64encode(SYSTEM_FILE_SD).decode(),
        "MSWINDOWS.xattr.$KERNEL.PURGE.X": base64.b64encode(b"\x01\x02").decode(),
        "MSWINDOWS.future": "kept",
    }
    assert a.mtime_ns == 1_700_000_000_123_456_700
    assert wintar.time_record(a, "ctime") == 1_700_000_200_000_000_500


def test_reader_records_a_tar_split_that_rebuilds_it_exactly() -> None:
    t = LayerTar.diff_layer()
    t.file("Files/a.txt", b"alpha" * 300, streams={"s": b"stream"})
    t.whiteout("Files/gone")
    raw = t.bytes() + bytes(4096)  # a writer that pads to a record size
    record = io.BytesIO()
    reader = RecordingReader(io.BytesIO(raw), record)
    kept: dict[str, bytes] = {}
    while (e := reader.next()) is not None:
        if e.name == "Files/a.txt":  # one file's data stored, the others left in the record
            buf = bytearray()
            reader.copy_data(buf.extend)
            kept[e.name] = bytes(buf)

    class Getter:
        def get(self, name: str) -> io.BytesIO:
            return io.BytesIO(kept[name])

    record.seek(0)
    assert b"".join(reassemble(record, Getter())) == raw


def test_truncated_tar_is_an_error_naming_the_entry() -> None:
    t = LayerTar.diff_layer()
    t.file("Files/a.txt", b"x" * 2000)
    full = t.bytes()
    a = tarfile.open(fileobj=io.BytesIO(full)).getmember("Files/a.txt")
    raw = full[: a.offset_data + 1000]  # cut in the middle of a.txt's data
    reader = RecordingReader(io.BytesIO(raw))
    with pytest.raises(InvalidArchive, match="Files/a.txt"):
        while (e := reader.next()) is not None:
            reader.copy_data(lambda b: None)
            assert e


# -- security descriptors ----------------------------------------------------------------


def test_ko_descriptor_decodes_as_the_note_says() -> None:
    sd = winsd.decode(KO_SD)
    assert sd.to_sddl() == "O:BUG:BU"
    assert sd.dacl is None and sd.control == 0x8000
    assert winsd.encode(sd) == KO_SD
    assert winsd.sddl_to_bytes("O:BUG:BU") == KO_SD


def test_defaults_match_buildkit_sizes_and_layout() -> None:
    f = winsd.sddl_to_bytes(winsd.DEFAULT_FILE_SDDL)
    d = winsd.sddl_to_bytes(winsd.DEFAULT_DIR_SDDL)
    assert (len(f), len(d)) == (124, 216)
    assert base64.b64encode(f).startswith(b"AQAEgBQAAAAk") and base64.b64encode(d).startswith(b"AQAEgBQAAAAk")
    owner, group, aces = decode_sd(f)
    assert (owner, group) == (BA, SY)
    assert aces == [(0, 0, 0x1F01FF, BA), (0, 0, 0x1F01FF, SY), (0, 0, 0x1200A9, BU)]


def test_hand_packed_descriptor_decodes_and_reencodes_byte_for_byte() -> None:
    sd = winsd.decode(DIR_SD)
    assert sd.owner == BA and sd.group == SY
    assert [(a.type, a.flags, a.mask, a.sid) for a in sd.dacl.aces] == decode_sd(DIR_SD)[2]
    assert sd.to_sddl() == "O:BAG:SYD:(A;OICI;FA;;;BA)(A;OICI;FA;;;SY)(A;OICI;FX;;;BU)"
    assert winsd.encode(sd) == DIR_SD
    assert winsd.sddl_to_bytes(sd.to_sddl()) == DIR_SD


def test_sddl_round_trip_keeps_flags_and_hex_rights() -> None:
    text = "O:SYG:SYD:PAI(A;OICIIO;GA;;;CO)(D;;0x1234;;;S-1-5-21-1-2-3-500)"
    raw = winsd.sddl_to_bytes(text)
    assert winsd.decode(raw).to_sddl() == text


@pytest.mark.parametrize("raw", [
    b"",                                                           # too short
    struct.pack("<BBHIIII", 1, 0, 0x8000, 20, 0, 0, 0) + b"\x01",   # owner SID cut off
    struct.pack("<BBHIIII", 1, 0, 0x8004, 0, 0, 0, 20) + struct.pack("<BBHHH", 2, 0, 64, 1, 0),  # ACL overruns
    b"\x02" + bytes(19),                                           # revision 2
    b"\x01\x00\x00\x00" + bytes(16),                                # not self-relative
])
def test_malformed_descriptors_are_invalid_archive(raw: bytes) -> None:
    with pytest.raises(InvalidArchive):
        winsd.decode(raw)
