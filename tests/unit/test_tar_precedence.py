"""Which name an entry has when its headers give several: Go's rules, or a refusal.

Go's archive/tar (what Docker and containerd apply layers with) takes the header's
name with its ustar prefix, then a PAX ``path``, then a GNU long name on top; other
readers (Python's tarfile, libarchive) let PAX win. lamina applies what Go applies
where the overrides agree, and refuses an entry whose overrides disagree, so a layer
never means one thing to Docker and another to a scanner. Tars made by hand
(tests/tarmaker.py), read back through apply and through tar-split.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

import tarmaker as tm
from lamina.archive.apply import ApplyOptions, apply_tar
from lamina.archive.tar.reader import TarReader
from lamina.archive.tar.split import reassemble
from lamina.errors import InvalidArchive

# the C speedups and the pure-Python path must behave alike: every test runs in both
pytestmark = pytest.mark.usefixtures("native_mode")


def names(data: bytes) -> list[tuple[str, str]]:
    return [(e.name, e.linkname) for e in TarReader(io.BytesIO(data))]


def refused(data: bytes, culprit: str, match: str) -> InvalidArchive:
    with pytest.raises(InvalidArchive, match=match) as err:
        names(data)
    assert culprit in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    return err.value


L = b"L"
K = b"K"


# -- GNU long name against PAX path ------------------------------------------------------


@pytest.mark.parametrize("order", ["gnu-first", "pax-first"])
def test_long_name_and_pax_path_that_disagree_are_refused(order: str) -> None:
    gnu = tm.gnu_long(L, "gnu-name")
    pax = tm.pax({"path": "pax-name"})
    metas = (gnu, pax) if order == "gnu-first" else (pax, gnu)
    refused(tm.tar(*metas, tm.file("short", b"x")), "gnu-name", "disagree")


@pytest.mark.parametrize("order", ["gnu-first", "pax-first"])
def test_long_link_and_pax_linkpath_that_disagree_are_refused(order: str) -> None:
    gnu = tm.gnu_long(K, "gnu-target")
    pax = tm.pax({"linkpath": "pax-target"})
    metas = (gnu, pax) if order == "gnu-first" else (pax, gnu)
    refused(tm.tar(tm.file("t"), *metas, tm.symlink("s", "short")), "s", "disagree")


def test_overrides_that_agree_are_applied_and_rebuilt(tmp_path: Path) -> None:
    long = "d/" + "n" * 150
    data = tm.tar(tm.directory("d"), tm.gnu_long(L, long), tm.pax({"path": long}),
                  tm.file("short", b"content"),
                  tm.gnu_long(K, long), tm.pax({"linkpath": long}), tm.hardlink("h", "x"))
    assert names(data)[1:] == [(long, ""), ("h", long)]
    split = io.BytesIO()
    apply_tar(tmp_path, io.BytesIO(data), ApplyOptions(tarsplit=split))
    assert (tmp_path / long).read_bytes() == b"content"
    assert os.path.samefile(tmp_path / "h", tmp_path / long)

    class Getter:
        def get(self, name: str) -> io.BufferedReader:
            return open(tmp_path / name, "rb")

    split.seek(0)
    assert b"".join(reassemble(split, Getter())) == data


def test_gnu_long_name_alone_and_pax_path_alone_win_over_the_header() -> None:
    assert names(tm.tar(tm.gnu_long(L, "long-gnu"), tm.file("short"))) == [("long-gnu", "")]
    assert names(tm.tar(tm.pax({"path": "long-pax"}), tm.file("short"))) == [("long-pax", "")]


@pytest.mark.parametrize("meta, what", [
    (tm.pax({"path": ""}), "PAX path record is empty"),
    (tm.pax({"linkpath": ""}), "PAX linkpath record is empty"),
    (tm.gnu_long(L, ""), "GNU long name is empty"),
    (tm.gnu_long(K, ""), "GNU long link name is empty"),
    (tm.pax({"size": ""}), "PAX size record is empty"),
])
def test_empty_overrides_are_refused(meta: bytes, what: str) -> None:
    # Go keeps the header's value for an empty one; tarfile takes the empty value
    refused(tm.tar(meta, tm.symlink("entry", "target")), "entry", what)


# -- repeated meta headers before one entry ----------------------------------------------


def test_two_different_pax_headers_are_refused() -> None:
    data = tm.tar(tm.pax({"path": "first"}), tm.pax({"mtime": "5"}), tm.file("the-entry"))
    refused(data, "the-entry", "two different PAX headers")


def test_two_different_long_names_are_refused() -> None:
    data = tm.tar(tm.gnu_long(L, "first"), tm.gnu_long(L, "second"), tm.file("e"))
    refused(data, "second", "two different GNU long names")


def test_repeated_identical_meta_headers_are_fine() -> None:
    data = tm.tar(tm.gnu_long(L, "same"), tm.gnu_long(L, "same"), tm.pax({"path": "same"}),
                  tm.pax({"path": "same"}), tm.file("e"))
    assert names(data) == [("same", "")]


# -- PAX global headers ----------------------------------------------------------------


def test_global_header_is_an_entry_and_applies_to_nothing() -> None:
    data = tm.tar(tm.pax({"comment": "made by git archive"}, name="pax_global_header", type=b"g"),
                  tm.file("a"))
    assert names(data) == [("pax_global_header", ""), ("a", "")]


@pytest.mark.parametrize("key", ["path", "linkpath", "size"])
def test_global_header_that_would_rename_or_reframe_is_refused(key: str) -> None:
    data = tm.tar(tm.pax({key: "7"}, name="pax_global_header", type=b"g"), tm.file("a"))
    refused(data, "pax_global_header", f"sets {key}")


def test_global_header_after_an_entrys_meta_headers_is_refused() -> None:
    data = tm.tar(tm.gnu_long(L, "lost"), tm.pax({"comment": "x"}, name="glob", type=b"g"), tm.file("a"))
    refused(data, "glob", "between an entry's meta headers and the entry")


# -- the ustar prefix and the older formats ----------------------------------------------


def test_prefix_counts_whenever_the_magic_is_ustar() -> None:
    # Go goes by the 6-byte magic; the version field does not matter
    for magic in (b"ustar\x0000", b"ustar\x00\x00\x00", b"ustar\x00  "):
        assert names(tm.tar(tm.header("name", prefix=b"pre", magic=magic))) == [("pre/name", "")]


def test_star_prefix_is_131_bytes() -> None:
    block = bytearray(tm.header("n", prefix=b"p" * 131 + b"\0"))
    block[476:488] = b"00000000000\0"  # star's atime right after its prefix
    block[508:512] = b"tar\0"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}".encode() + b"\0 "
    assert names(bytes(block) + tm.end()) == [("p" * 131 + "/n", "")]


def test_gnu_header_times_are_times_not_a_prefix() -> None:
    block = bytearray(tm.header("n", magic=b"ustar  \0", prefix=b"14000000000\0" + b"14000000001\0"))
    entries = list(TarReader(io.BytesIO(bytes(block) + tm.end())))
    assert [(e.name, e.atime_ns) for e in entries] == [("n", 0o14000000000 * 10**9)]


def test_gnu_header_with_a_text_prefix_reads_it_as_go_does() -> None:
    # an old Go writer put a ustar prefix into a GNU header: not numbers, so a prefix
    block = tm.header("n", magic=b"ustar  \0", prefix=b"some/dir")
    assert names(block + tm.end()) == [("some/dir/n", "")]


def test_v7_header_with_ustar_only_fields_is_refused() -> None:
    # Go reads no prefix, names or devices without the ustar magic; tarfile reads a prefix
    refused(tm.tar(tm.header("n", magic=bytes(8), prefix=b"hidden")), "n", "ustar-only fields")
    assert names(tm.tar(tm.header("n", magic=bytes(8)))) == [("n", "")]
