"""tar-split: Docker's JSON-lines format, CRC-64/ISO, and byte-identical reassembly."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import IO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tarmaker as tm
from conftest import skip_or_fail
from lamina.archive.apply import ApplyOptions, apply_tar
from lamina.archive.tar import crc64 as crc64_module
from lamina.archive.tar.crc64 import Crc64, crc64
from lamina.archive.tar.split import reassemble
from lamina.errors import InvalidArchive

# the C speedups and the pure-Python path must behave alike: every test runs in both
pytestmark = pytest.mark.usefixtures("native_mode")


def crc64_bitwise(data: bytes) -> bytes:
    """Go's crc64 ISO, one bit at a time: slow and obviously right."""
    crc = (1 << 64) - 1
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xD800000000000000 if crc & 1 else crc >> 1
    return (crc ^ ((1 << 64) - 1)).to_bytes(8, "big")


class PathGetter:
    """Opens layer files by tar name, as a driver's diff getter would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.asked: list[str] = []

    def get(self, name: str) -> IO[bytes]:
        self.asked.append(name)
        return open(os.path.join(self.root, name), "rb")


def apply_recording(root: Path, data: bytes, **opts: object) -> bytes:
    root.mkdir(exist_ok=True)
    split = io.BytesIO()
    apply_tar(root, io.BytesIO(data), ApplyOptions(tarsplit=split, **opts))  # type: ignore[arg-type]
    return split.getvalue()


def rebuild(split: bytes, root: Path) -> bytes:
    return b"".join(reassemble(io.BytesIO(split), PathGetter(root)))


# -- CRC-64 --------------------------------------------------------------------------


@pytest.fixture(params=["pure", "accelerated"])
def crc_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a CRC test with the pure-Python code and with anycrc (when installed)."""
    if request.param == "pure":
        monkeypatch.setattr(crc64_module, "_FAST", None)
    elif crc64_module._FAST is None:
        # a pinned dependency (pyproject.toml): missing, the fast path goes untested
        skip_or_fail("anycrc is not installed: only the pure-Python CRC is in use (pip install -e .)")
    return request.param


def test_crc64_check_value(crc_impl: str) -> None:
    # The published check value of CRC-64/GO-ISO for "123456789".
    assert crc64(b"123456789").hex() == "b90956c775a41001"


def test_crc64_of_nothing_is_zero(crc_impl: str) -> None:
    assert crc64(b"") == bytes(8)
    c = Crc64()
    c.update(b"")
    c.update(b"123456789")
    assert c.digest().hex() == "b90956c775a41001"


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000), cut=st.integers(min_value=0, max_value=3000))
def test_crc64_matches_bitwise_reference_in_any_split(crc_impl: str, data: bytes,
                                                      cut: int) -> None:
    c = Crc64()
    c.update(data[:cut])
    c.update(memoryview(data)[cut:])
    assert c.digest() == crc64_bitwise(data)


# -- the JSON format -----------------------------------------------------------------


def test_json_lines_match_the_go_packer(tmp_path: Path) -> None:
    data = tm.tar(tm.directory("d/"), tm.file("d/f", b"hello"))
    lines = [json.loads(line) for line in apply_recording(tmp_path / "r", data).splitlines()]
    assert [list(obj) for obj in lines] == [
        ["type", "payload", "position"],
        ["type", "name", "payload", "position"],
        ["type", "payload", "position"],
        ["type", "name", "size", "payload", "position"],
        ["type", "payload", "position"],
    ]
    assert [obj["position"] for obj in lines] == list(range(5))
    assert lines[1] == {"type": 1, "name": "d/", "payload": None, "position": 1}
    assert base64.b64decode(lines[0]["payload"]) == data[:512]
    assert lines[3]["size"] == 5
    assert base64.b64decode(lines[3]["payload"]) == crc64_bitwise(b"hello")
    # after the last file: its padding and both end blocks, in one segment
    assert base64.b64decode(lines[4]["payload"]) == bytes(507 + 1024)


def test_lines_are_compact_json(tmp_path: Path) -> None:
    split = apply_recording(tmp_path / "r", tm.tar(tm.file("a<b>&c", b"x")))
    assert b": " not in split and b", " not in split
    assert b'"name":"a\\u003cb\\u003e\\u0026c"' in split  # escaped as Go escapes them


def test_non_utf8_name_goes_in_name_raw(tmp_path: Path) -> None:
    data = tm.tar(tm.file(b"caf\xe9", b"latin-1 name"))  # type: ignore[arg-type]
    split = apply_recording(tmp_path / "r", data)
    entry = json.loads(split.splitlines()[1])
    assert "name" not in entry
    assert base64.b64decode(entry["name_raw"]) == b"caf\xe9"
    assert rebuild(split, tmp_path / "r") == data


def test_reads_what_the_go_packer_writes(tmp_path: Path) -> None:
    # A record written the way Go's json.Encoder writes tar-split entries.
    hdr = tm.header("f", size=3)
    lines = [
        {"type": 2, "payload": base64.b64encode(hdr).decode(), "position": 0},
        {"type": 1, "name": "f", "size": 3,
         "payload": base64.b64encode(crc64_bitwise(b"abc")).decode(), "position": 1},
        {"type": 2, "payload": base64.b64encode(bytes(509) + tm.end()).decode(), "position": 2},
    ]
    (tmp_path / "f").write_bytes(b"abc")
    split = b"".join(json.dumps(obj).encode() + b"\n" for obj in lines)
    assert rebuild(split, tmp_path) == hdr + b"abc" + bytes(509) + tm.end()


# -- round trips ---------------------------------------------------------------------


def varied_tar() -> bytes:
    return tm.tar(
        tm.pax({"comment": "made by tests"}, type=b"g", name="pax_global_header"),
        tm.directory("./", mode=0o755),
        tm.directory("etc/", mode=0o755),
        tm.file("etc/hosts", b"127.0.0.1 localhost\n", mode=0o644),
        tm.pax({"path": "usr/share/" + "very-long-" * 20 + "name.txt", "mtime": "1600000000.5"}),
        tm.file("placeholder", b"long-named content" * 100),
        tm.gnu_long(b"L", "opt/" + "g" * 150),
        tm.file("gnu-short", b"gnu long name content"),
        tm.pax({"SCHILY.xattr.user.note": b"\x00\x01binary", "uid": "1000", "gid": "1000"}),
        tm.file("home/user/data.bin", os.urandom(70_000), mode=0o600),
        tm.hardlink("home/user/data.link", "home/user/data.bin"),
        tm.symlink("bin", "usr/bin"),
        tm.file("empty", b""),
        tm.file("lib/.wh.removed"),
        tm.directory("var/opaque/"),
        tm.file("var/opaque/.wh..wh..opq"),
        tm.file("var/opaque/kept", b"k"),
        tm.header("run/fifo", type=b"6", mode=0o600),
        tm.file("exact-block", b"b" * 512),
    ) + bytes(2048) + b"trailing bytes after the archive"


@pytest.mark.parametrize("whiteouts", ["delete", "overlay"])
def test_varied_tar_round_trips_byte_for_byte(tmp_path: Path, whiteouts: str) -> None:
    data = varied_tar()
    root = tmp_path / "layer"
    split = apply_recording(root, data, whiteouts=whiteouts, opaque_xattr="user.overlay.opaque")
    getter = PathGetter(root)
    out = b"".join(reassemble(io.BytesIO(split), getter))
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()
    # only files with content are read back; whiteouts and links never are
    assert sorted(getter.asked) == sorted([
        "etc/hosts", "usr/share/" + "very-long-" * 20 + "name.txt", "opt/" + "g" * 150,
        "home/user/data.bin", "var/opaque/kept", "exact-block"])


def test_tarfile_pax_archive_round_trips(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(20):
            ti = tarfile.TarInfo(f"dir{i % 3}/" + "ü" * (i * 6) + f"-{i}")
            content = os.urandom(i * 1000)
            ti.size = len(content)
            ti.mtime = 1_600_000_000 + i
            ti.pax_headers = {"SCHILY.xattr.user.i": str(i)}
            tf.addfile(ti, io.BytesIO(content))
    data = buf.getvalue()
    split = apply_recording(tmp_path / "r", data)
    assert rebuild(split, tmp_path / "r") == data


def test_large_trailing_data_is_kept_in_bounded_segments(tmp_path: Path) -> None:
    data = tm.tar(tm.file("f", b"x")) + os.urandom(1 << 20)  # the most a record pads to
    split = apply_recording(tmp_path / "r", data)
    sizes = [len(base64.b64decode(json.loads(line)["payload"]))
             for line in split.splitlines() if json.loads(line)["type"] == 2]
    assert max(sizes) <= 1 << 20
    assert rebuild(split, tmp_path / "r") == data


def test_trailing_data_past_a_record_is_refused(tmp_path: Path) -> None:
    """Issue 16: what follows the end blocks was read without bound into the tar-split."""
    data = tm.tar(tm.file("f", b"x")) + os.urandom(2_500_000)
    with pytest.raises(InvalidArchive, match="follow the end-of-archive blocks"):
        apply_recording(tmp_path / "r", data)


def test_empty_stream_has_an_empty_record(tmp_path: Path) -> None:
    split = apply_recording(tmp_path / "r", b"")
    assert split == b""
    assert rebuild(split, tmp_path / "r") == b""


# -- refusals --------------------------------------------------------------------------


def test_changed_content_is_caught_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "r"
    split = apply_recording(root, tm.tar(tm.file("a/f", b"original")))
    (root / "a/f").write_bytes(b"tampered")
    with pytest.raises(InvalidArchive, match="checksum") as err:
        rebuild(split, root)
    assert err.value.entry == "a/f"


@pytest.mark.parametrize("content,word", [(b"short", "shorter"), (b"much longer!", "longer")])
def test_changed_size_is_caught_naming_the_file(tmp_path: Path, content: bytes, word: str) -> None:
    root = tmp_path / "r"
    split = apply_recording(root, tm.tar(tm.file("f", b"original")))
    (root / "f").write_bytes(content)
    with pytest.raises(InvalidArchive, match=word) as err:
        rebuild(split, root)
    assert err.value.entry == "f"


def test_repeated_name_shadowing_content_cannot_be_recorded(tmp_path: Path) -> None:
    with pytest.raises(InvalidArchive, match="replaces or whites out content") as err:
        apply_recording(tmp_path / "r", tm.tar(tm.file("a", b"1"), tm.file("./a", b"2"),
                                               tm.file("later", b"x")))
    assert err.value.entry == "./a"


@pytest.mark.parametrize("whiteout", ["d/.wh.f", "./d/.wh.f", ".wh.d"])
def test_whiteout_of_content_added_earlier_cannot_be_recorded(tmp_path: Path, whiteout: str) -> None:
    """Docker would apply it, but no tar-split could give the tar back: its content is gone."""
    with pytest.raises(InvalidArchive, match="whites out content added earlier") as err:
        apply_recording(tmp_path / "r", tm.tar(tm.directory("d"), tm.file("d/f", b"gone"),
                                               tm.file(whiteout, b""), tm.file("later", b"x")))
    assert err.value.entry == whiteout


def test_whiteouts_before_new_content_round_trip(tmp_path: Path) -> None:
    """A layer that deletes a lower file and adds one of the same name is ordinary."""
    data = tm.tar(tm.file(".wh.f", b""), tm.file("f", b"new"), tm.directory("d"),
                  tm.file("d/.wh..wh..opq", b""), tm.file("d/g", b"g"), tm.file("d/.wh.other", b""))
    split = apply_recording(tmp_path / "r", data)
    assert rebuild(split, tmp_path / "r") == data


def test_hostile_entry_is_named_before_a_repeated_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidArchive, match="symlink") as err:
        apply_recording(tmp_path / "r", tm.tar(tm.file("f", b"1"), tm.symlink("f", "/"),
                                               tm.file("f/etc", b"x")))
    assert err.value.entry == "f/etc"


def test_repeated_names_without_lost_content_round_trip(tmp_path: Path) -> None:
    data = tm.tar(tm.directory("d"), tm.directory("d/"), tm.file("e", b""), tm.file("e", b""),
                  tm.file("e", b"last one has content"), tm.symlink("s", "x"),
                  tm.symlink("./s", "y"))
    split = apply_recording(tmp_path / "r", data)
    assert rebuild(split, tmp_path / "r") == data


def test_garbage_record_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArchive, match="not JSON"):
        rebuild(b'{"type":2,"payload":\n', tmp_path)
    with pytest.raises(InvalidArchive, match="base64"):
        rebuild(b'{"type":2,"payload":"***","position":0}\n', tmp_path)


_names = st.text(alphabet="abcxyz-_.ü", min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..") and not n.startswith(".wh."))


@st.composite
def random_tars(draw: st.DrawFn) -> bytes:
    """A tar of a random small tree, written by Python's tarfile in a random format."""
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    buf = io.BytesIO()
    files: list[str] = []
    used: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for d in draw(st.lists(_names, max_size=3, unique=True)):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tf.addfile(ti)
            used.add(d)
        dirs = sorted(used)
        for name, content, kind in draw(st.lists(
                st.tuples(_names, st.binary(max_size=1500),
                          st.sampled_from(["file", "file", "symlink", "hardlink"])),
                max_size=8)):
            path = f"{draw(st.sampled_from(dirs))}/{name}" if dirs and draw(st.booleans()) else name
            if path in used:
                continue
            used.add(path)
            ti = tarfile.TarInfo(path)
            ti.mtime = draw(st.integers(min_value=0, max_value=8**11 - 1))
            if kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, name
                tf.addfile(ti)
            elif kind == "hardlink" and files:
                ti.type, ti.linkname = tarfile.LNKTYPE, draw(st.sampled_from(files))
                tf.addfile(ti)
            else:
                ti.size = len(content)
                tf.addfile(ti, io.BytesIO(content))
                files.append(path)
    return buf.getvalue()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=random_tars())
def test_any_tarfile_archive_round_trips(tmp_path_factory: pytest.TempPathFactory,
                                         data: bytes) -> None:
    root = tmp_path_factory.mktemp("rt")
    split = apply_recording(root, data)
    assert rebuild(split, root) == data
