"""Hostile layer tars: each is refused with InvalidArchive naming the entry, and nothing
beside the layer root changes (the canary file, the directory around the root)."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import tarmaker as tm
from lamina.archive.apply import ApplyOptions, apply_tar
from lamina.errors import InvalidArchive

# the C speedups and the pure-Python path must behave alike: every test runs in both
pytestmark = pytest.mark.usefixtures("native_mode")


def _snapshot(top: Path, skip: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Everything under ``top`` except ``skip``: mode, size, link count, content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p == skip:
                continue
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[str(p)] = (st.st_mode, st.st_size, st.st_nlink, data)
    return out


@pytest.fixture
def box(tmp_path: Path, canary: Path) -> Iterator[tuple[Path, Path]]:
    """(root, outside dir): a layer root with a canary and an outside directory beside
    it; after the test, everything outside the root must be exactly as before."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    before = _snapshot(tmp_path, root)
    yield root, outside
    assert _snapshot(tmp_path, root) == before
    assert canary.read_text() == "untouched\n"


def refused(root: Path, data: bytes, entry: str, match: str | None = None,
            **opts: object) -> InvalidArchive:
    with pytest.raises(InvalidArchive, match=match) as err:
        apply_tar(root, io.BytesIO(data), ApplyOptions(**opts))  # type: ignore[arg-type]
    assert err.value.entry == entry, str(err.value)
    assert entry in str(err.value)
    return err.value


# -- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../canary.txt", "a/../../canary.txt", "./../x", ".."])
def test_dotdot_names_are_refused(box: tuple[Path, Path], name: str) -> None:
    root, _ = box
    refused(root, tm.tar(tm.file(name, b"evil")), name, match="climbs")


@pytest.mark.parametrize("name", ["/etc/evil", "/canary.txt", "//x"])
def test_absolute_names_are_refused(box: tuple[Path, Path], name: str) -> None:
    root, _ = box
    refused(root, tm.tar(tm.file(name, b"evil")), name, match="absolute")


def test_dotdot_that_stays_inside_is_cleaned_like_docker(box: tuple[Path, Path]) -> None:
    root, _ = box
    apply_tar(root, io.BytesIO(tm.tar(tm.file("a/../b", b"ok"))), ApplyOptions())
    assert (root / "b").read_bytes() == b"ok"


def test_pax_path_with_a_nul_byte_is_refused(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.pax({"path": b"a\0b"}), tm.file("x", b"1")), "a\0b", match="NUL")


def test_non_directory_entry_naming_the_root_is_refused(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.symlink("./", "/")), "./", match="root")


# -- symlinks --------------------------------------------------------------------------


def test_write_through_a_symlink_planted_in_the_tar(box: tuple[Path, Path]) -> None:
    root, outside = box
    refused(root, tm.tar(tm.symlink("link", str(outside)), tm.file("link/evil", b"x")),
            "link/evil", match="symlink")


def test_write_through_a_relative_symlink_planted_in_the_tar(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.symlink("up", ".."), tm.file("up/canary.txt", b"x")),
            "up/canary.txt", match="symlink")


def test_symlink_dir_then_entries_under_it(box: tuple[Path, Path]) -> None:
    root, outside = box
    refused(root, tm.tar(tm.directory("d"), tm.symlink("d/l", str(outside)),
                         tm.directory("d/l/sub")), "d/l/sub", match="symlink")


def test_symlink_already_in_the_root_is_not_followed(box: tuple[Path, Path]) -> None:
    root, outside = box
    (root / "etc").symlink_to(outside)
    refused(root, tm.tar(tm.file("etc/secret", b"overwritten")), "etc/secret", match="symlink")


def test_symlink_to_a_directory_inside_the_root_is_not_followed_either(
        box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.directory("real"), tm.symlink("alias", "real"),
                         tm.file("alias/f", b"x")), "alias/f", match="symlink")


def test_overlay_refuses_a_path_through_a_symlink_in_a_lower_layer(
        box: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    root, _ = box
    lower = tmp_path_factory.mktemp("lower")  # the layer below, as overlay sees it
    (lower / "usr/lib").mkdir(parents=True)
    (lower / "lib").symlink_to("usr/lib")
    (lower / "etcfile").write_text("a file")
    for name in ("lib/evil.so", "lib/deeper/evil.so", "lib/.wh.x", "etcfile/x"):
        refused(root, tm.tar(tm.file(name, b"x")), name, match="lower layer",
                whiteouts="overlay", lower_roots=[lower])
    assert not (lower / "usr/lib/evil.so").exists()


def test_overlay_path_through_a_lower_directory_is_fine(
        box: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    root, _ = box
    lower = tmp_path_factory.mktemp("lower")
    (lower / "usr/lib").mkdir(parents=True)
    apply_tar(root, io.BytesIO(tm.tar(tm.file("usr/lib/new.so", b"x"))),
              ApplyOptions(whiteouts="overlay", lower_roots=[lower]))
    assert (root / "usr/lib/new.so").read_bytes() == b"x"


def test_directory_entry_over_a_symlink_replaces_the_link(box: tuple[Path, Path]) -> None:
    root, outside = box
    (root / "d").symlink_to(outside)
    apply_tar(root, io.BytesIO(tm.tar(tm.directory("d", mode=0o777))), ApplyOptions())
    assert (root / "d").is_dir() and not (root / "d").is_symlink()


def test_file_under_a_regular_file_is_refused(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.file("f", b"x"), tm.file("f/g", b"y")), "f/g", match="not a directory")


# -- hardlinks -------------------------------------------------------------------------


def test_hardlink_escaping_the_root(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.hardlink("h", "../canary.txt")), "h", match="climbs")


def test_hardlink_to_an_absolute_path(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.hardlink("h", "/etc/passwd")), "h", match="absolute")


def test_hardlink_through_a_symlink(box: tuple[Path, Path]) -> None:
    root, outside = box
    refused(root, tm.tar(tm.symlink("l", str(outside)), tm.hardlink("h", "l/secret")), "h",
            match="symlink")


def test_hardlink_to_a_symlink_links_the_symlink_not_its_target(box: tuple[Path, Path]) -> None:
    root, outside = box
    tar = tm.tar(tm.symlink("l", str(outside / "secret")), tm.hardlink("h", "l", mode=0o777))
    apply_tar(root, io.BytesIO(tar), ApplyOptions())
    assert (root / "h").is_symlink()
    assert (root / "h").lstat().st_ino == (root / "l").lstat().st_ino


def test_hardlink_target_in_a_lower_root_cannot_escape_it(box: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    root, outside = box
    lower = outside / "lower"
    try:
        refused(root, tm.tar(tm.hardlink("h", "../secret")), "h", match="climbs",
                lower_roots=[lower])
    finally:
        assert not lower.exists()


# -- whiteouts -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".wh..", "d/.wh...", ".wh."])
def test_whiteout_of_dot_dotdot_or_nothing(box: tuple[Path, Path], name: str) -> None:
    root, _ = box
    (root / "d").mkdir()
    (root / "keep").write_text("k")
    refused(root, tm.tar(tm.file(name)), name, match="whiteout")
    assert (root / "keep").read_text() == "k"


@pytest.mark.parametrize("whiteouts", ["delete", "overlay"])
def test_whiteout_through_a_symlink(box: tuple[Path, Path], whiteouts: str) -> None:
    root, outside = box
    refused(root, tm.tar(tm.symlink("l", str(outside)), tm.file("l/.wh.secret")),
            "l/.wh.secret", match="symlink", whiteouts=whiteouts)


@pytest.mark.parametrize("whiteouts", ["delete", "overlay"])
def test_opaque_marker_through_a_symlink(box: tuple[Path, Path], whiteouts: str) -> None:
    root, outside = box
    refused(root, tm.tar(tm.symlink("l", str(outside)), tm.file("l/.wh..wh..opq")),
            "l/.wh..wh..opq", match="symlink", whiteouts=whiteouts,
            opaque_xattr="user.overlay.opaque")


def test_whiteout_escaping_with_dotdot(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.file("../.wh.canary.txt")), "../.wh.canary.txt", match="climbs")


# -- malformed archives --------------------------------------------------------------


def test_huge_octal_size_with_a_short_stream(box: tuple[Path, Path]) -> None:
    root, _ = box
    data = tm.header("huge", raw_fields={"size": b"77777777777\0"}) + b"tiny" + bytes(508)
    refused(root, data, "huge", match="truncated")


def test_absurd_base256_size(box: tuple[Path, Path]) -> None:
    root, _ = box
    data = tm.tar(tm.header("absurd", raw_fields={"size": tm.base256(1 << 90, 12)}))
    refused(root, data, "absurd", match="absurd size")


def test_negative_base256_size(box: tuple[Path, Path]) -> None:
    root, _ = box
    data = tm.tar(tm.header("neg", raw_fields={"size": tm.base256(-5, 12)}))
    refused(root, data, "neg", match="absurd size")


def test_absurd_pax_size(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.pax({"size": str(1 << 70)}), tm.file("p", b"")), "p",
            match="absurd size")


def test_stream_truncated_inside_file_data(box: tuple[Path, Path]) -> None:
    root, _ = box
    whole = tm.tar(tm.file("first", b"ok"), tm.file("cut", b"x" * 5000))
    refused(root, whole[:1024 + 512 + 1000], "cut", match="truncated")


def test_stream_truncated_inside_a_header(box: tuple[Path, Path]) -> None:
    root, _ = box
    whole = tm.tar(tm.file("first", b"ok"), tm.file("second", b"y"))
    refused(root, whole[:1024 + 100], "first", match="truncated")


def test_bad_header_checksum(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.header("bad", checksum=12345)), "bad", match="checksum")


def test_bad_checksum_field(box: tuple[Path, Path]) -> None:
    root, _ = box
    block = bytearray(tm.header("junk"))
    block[148:156] = b"zzzzzz\0 "
    refused(root, bytes(block) + tm.end(), "junk", match="checksum")


@pytest.mark.parametrize("data", [
    b"99 path=too-long-length\n",
    b"11 path=abc",
    b"x0 path=a\n",
    b"8 =abc\n\n",
    b"9 noequal\n",
], ids=["length-past-end", "no-newline", "no-length", "empty-key", "no-equals"])
def test_malformed_pax_names_the_entry_it_was_for(box: tuple[Path, Path], data: bytes) -> None:
    root, _ = box
    refused(root, tm.tar(tm.pax(data), tm.file("victim", b"1")), "victim", match="PAX")


def test_malformed_pax_numbers(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.pax({"uid": "-1"}), tm.file("v", b"1")), "v", match="uid")
    refused(root, tm.tar(tm.pax({"mtime": "soon"}), tm.file("w", b"1")), "w", match="mtime")


def test_oversized_pax_header_is_refused_before_it_is_read(box: tuple[Path, Path]) -> None:
    root, _ = box
    data = tm.header("PaxHeaders/big", type=b"x", size=64 << 20)
    refused(root, data, "PaxHeaders/big", match="too large")


def test_header_after_a_single_zero_block(box: tuple[Path, Path]) -> None:
    root, _ = box
    data = tm.file("a", b"1") + bytes(512) + tm.file("b", b"2") + tm.end()
    refused(root, data, "a", match="zero block")


def test_unknown_entry_type(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.header("vol", type=b"V")), "vol", match="unsupported")


def test_non_octal_numeric_field(box: tuple[Path, Path]) -> None:
    root, _ = box
    refused(root, tm.tar(tm.header("m", raw_fields={"mode": b"0000-44\0"})), "m", match="mode")
