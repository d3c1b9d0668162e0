"""Issue 16, second round, the input-parsing cases: each refused with one line naming
the culprit, as a typed error, leaving no layer; the CLI exits 1 with ``lamina: ...``.

(The name-override cases are in test_tar_precedence.py and the hostile corpus.)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
import tarmaker as tm
from conftest import REPO, require_module, require_root, run_cli
from images_support import Image, MemoryStore, docker_save, layer_tar, oci_layout
from lamina.errors import ImageError, InvalidArchive
from lamina.images import load
from lamina.streams import open_chunks

# the C speedups and the pure-Python path must behave alike: every test runs in both
pytestmark = pytest.mark.usefixtures("native_mode")

# -- data after the end-of-archive blocks ------------------------------------------------


def test_endless_zeros_after_the_tar_stop_the_cli(tmp_path: Path) -> None:
    tar = tmp_path / "x.tar"
    tar.write_bytes(tm.tar(tm.file("f", b"x")))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = (f"cat {tar} /dev/zero | {sys.executable} -m lamina --root {tmp_path / 'root'} "
           "--driver vfs apply L -")
    t = time.monotonic()
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, env=env, timeout=120)
    assert time.monotonic() - t < 60
    err = r.stderr.decode()
    assert r.returncode != 0 and err.count("\n") == 1, err
    assert err.startswith("lamina: stdin: more than 1024 KiB follow the end-of-archive blocks"), err
    assert "L" not in run_cli("ls", root=tmp_path / "root", check=True).stdout.decode().split()


def _with_trailing(tar: bytes, junk: int) -> Iterator[bytes]:
    yield tar
    chunk = b"garbage!" * 8192
    for _ in range(junk // len(chunk)):
        yield chunk


def test_fifty_megabytes_of_trailing_garbage_are_refused_early(tmp_path: Path) -> None:
    store = lamina.open(tmp_path / "s", driver="vfs")
    src = open_chunks(_with_trailing(tm.tar(tm.file("f", b"x")), 50 << 20))
    with pytest.raises(InvalidArchive, match="follow the end-of-archive blocks"):
        store.apply_diff("g", None, src)
    assert not store.exists("g")
    assert not list((store.root / "tarsplit").iterdir())
    store.close()


def test_a_record_of_padding_is_kept_and_rebuilt(tmp_path: Path) -> None:
    data = tm.tar(tm.file("f", b"x" * 700)) + bytes(9216)  # GNU tar's 10 KiB record
    store = lamina.open(tmp_path / "s", driver="vfs")
    store.apply_diff("p", None, io.BytesIO(data))
    with store.diff("p") as out:
        assert out.read() == data
    store.close()


# -- numbers that do not fit --------------------------------------------------------------


@pytest.mark.parametrize("data, culprit, match", [
    (tm.tar(tm.pax({"uid": str(2**40)}), tm.file("big-uid", b"x")), "big-uid", "out of range"),
    (tm.tar(tm.pax({"gid": str(2**63 - 1)}), tm.file("big-gid", b"x")), "big-gid", "out of range"),
    (tm.tar(tm.pax({"uid": "9" * 30}), tm.file("past-64", b"x")), "past-64", "bad PAX uid"),
    (tm.tar(tm.pax({"mtime": "1" * 100_000}), tm.file("digits", b"x")), "digits", "bad PAX mtime"),
    (tm.tar(tm.header("dev", type=b"3", raw_fields={"devmajor": tm.base256(2**40, 8)})), "dev",
     "device number"),
    (tm.tar(tm.header("b256uid", raw_fields={"uid": tm.base256(2**50, 8)})), "b256uid", "out of range"),
    (tm.tar(tm.header("b256mt", raw_fields={"mtime": tm.base256(2**90, 12)})), "b256mt", "mtime field"),
], ids=["pax-uid", "pax-gid", "pax-uid-64bit", "pax-100000-digits", "base256-dev",
        "base256-uid", "base256-mtime"])
def test_numbers_too_large_are_invalid_archive_naming_the_entry(tmp_path: Path, data: bytes,
                                                                culprit: str, match: str) -> None:
    require_root()  # owners and devices are only set as root
    store = lamina.open(tmp_path / "s", driver="vfs")
    with pytest.raises(InvalidArchive, match=match) as err:
        store.apply_diff("n", None, io.BytesIO(data))
    assert err.value.entry == culprit and "\n" not in str(err.value)
    assert not store.exists("n")
    store.close()


# -- messages -----------------------------------------------------------------------------


def test_a_file_that_is_no_tar_is_named_and_called_so(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_bytes(b"this is plain text, not a tar at all\n" * 40)
    r = run_cli("--driver", "vfs", "apply", "L", str(junk), root=tmp_path / "root")
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1
    assert err.startswith(f"lamina: {junk}: not a tar archive"), err
    assert "checksum" not in err


def test_a_zstd_window_over_the_limit_says_which_limit(tmp_path: Path) -> None:
    require_module("zstandard")
    tar = tm.tar(tm.file("f", b"y" * 1000))
    # from a pipe zstd knows no content size, so --long=30 asks for a 1 GiB window
    blob = subprocess.run(["zstd", "-q", "--long=30", "-c"], input=tar, capture_output=True,
                          check=True).stdout
    src = tmp_path / "big-window.tar.zst"
    src.write_bytes(blob)
    r = run_cli("--driver", "vfs", "apply", "L", str(src), root=tmp_path / "root")
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1
    assert "needs a 1024 MiB window, over the 128 MiB limit" in err and "damaged" not in err, err


# -- names that are not UTF-8, printed as Docker prints them ---------------------------------


def test_changes_of_names_that_are_not_utf8(tmp_path: Path) -> None:
    root = tmp_path / "root"
    base = tmp_path / "base.tar"
    base.write_bytes(tm.tar(tm.file(b"bad-\xff-name", b"1"), tm.file("ok", b"2")))
    assert run_cli("--driver", "vfs", "apply", "base", str(base), root=root).returncode == 0
    text = run_cli("--driver", "vfs", "changes", "base", root=root, check=True).stdout
    assert text.decode("utf-8").splitlines() == ["A /bad-\ufffd-name", "A /ok"]
    out = run_cli("--driver", "vfs", "--json", "changes", "base", root=root, check=True).stdout
    doc = json.loads(out.decode("utf-8"))  # valid UTF-8: no lone surrogates in the JSON
    assert "\\udc" not in out.decode() and [c["Path"] for c in doc] == ["/bad-\ufffd-name", "/ok"]


# -- image documents ---------------------------------------------------------------------


def _manifest_archive(tmp_path: Path, edit: object) -> Path:
    """A docker-save archive whose manifest.json is replaced by ``edit(manifest)``."""
    import tarfile

    img = Image([layer_tar({"a": b"1"})], ["victim:1"])
    src = docker_save(tmp_path / "a.tar", [img])
    out = tmp_path / "b.tar"
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            if m.name == "manifest.json":
                data = edit(json.loads(data))  # type: ignore[operator]
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
    return out


def test_repotags_as_a_string_is_refused(tmp_path: Path) -> None:
    def edit(doc: list) -> bytes:  # type: ignore[type-arg]
        doc[0]["RepoTags"] = "alpine:latest"
        return json.dumps(doc).encode()

    with pytest.raises(ImageError, match="RepoTags is not a list of names"):
        load(MemoryStore(tmp_path / "s"), _manifest_archive(tmp_path, edit))


def test_deeply_nested_manifest_is_an_image_error(tmp_path: Path) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(ImageError, match="nested too deeply"):
        load(MemoryStore(tmp_path / "s"), _manifest_archive(tmp_path, lambda _doc: deep))


def test_oci_descriptor_size_must_be_a_number(tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "oci", [Image([layer_tar({"a": b"1"})], ["v:1"])], "none")
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["size"] = "12"
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="size of manifest .* is a str, not a int"):
        load(MemoryStore(tmp_path / "s"), layout)


def test_oci_blob_symlinked_outside_the_layout_says_so(tmp_path: Path) -> None:
    img = Image([layer_tar({"a": b"1"})], ["v:1"])
    layout = oci_layout(tmp_path / "oci", [img], "none")
    blob = next(p for p in (layout / "blobs" / "sha256").iterdir() if p.read_bytes().startswith(b"a\0"))
    outside = tmp_path / "elsewhere"
    outside.write_bytes(blob.read_bytes())
    blob.unlink()
    blob.symlink_to(outside)
    with pytest.raises(ImageError, match="symlink that leads outside the layout") as err:
        load(MemoryStore(tmp_path / "s"), layout)
    assert "missing" not in str(err.value)


def test_docker_save_layer_linked_outside_the_archive_says_so(tmp_path: Path) -> None:
    import tarfile

    img = Image([layer_tar({"a": b"1"})], ["v:1"])
    src = docker_save(tmp_path / "a.tar", [img])
    out = tmp_path / "b.tar"
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        for m in tin.getmembers():
            if m.name.endswith("/layer.tar"):
                link = tarfile.TarInfo(m.name)
                link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
                tout.addfile(link)
            else:
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
    with pytest.raises(ImageError, match=r"layer 1 \(.*/layer.tar\) is a link that leads outside the archive"):
        load(MemoryStore(tmp_path / "s"), out)


def test_deeply_nested_registry_manifest_is_a_registry_error() -> None:
    from lamina.registry.manifests import parse_image
    from lamina.registry.transport import RegistryError

    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(RegistryError, match="nested too deeply"):
        parse_image(deep, "application/vnd.oci.image.manifest.v1+json", "sha256:" + "0" * 64, "m")


def test_deeply_nested_tar_split_record_is_invalid_archive() -> None:
    from lamina.archive.tar.split import reassemble

    deep = b"[" * 200_000 + b"]" * 200_000 + b"\n"
    with pytest.raises(InvalidArchive, match="tar-split record 1"):
        list(reassemble(io.BytesIO(deep), None))  # type: ignore[arg-type]
